"""CLU metric collections computed inside the jitted steps; only their reduced values ever reach the host."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k highest logits (k is clipped to the class count).

  Ties rank as `argmax` breaks them (the lower class first), so a model with constant logits scores the share of
  class 0, not 100%; a row with a NaN logit is never right.
  """
  k = min(k, logits.shape[-1])
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  lower_class = jnp.arange(logits.shape[-1]) < labels[:, None]
  ahead = (logits > label_logit) | ((logits == label_logit) & lower_class)
  return ((jnp.sum(ahead, axis=-1) < k) & ~jnp.any(jnp.isnan(logits), axis=-1)).astype(jnp.float32)


def collection(names) -> type[metrics.Collection]:
  """A CLU collection averaging each named output (per-example values are weighted by example)."""
  return _collection_class(tuple(sorted(names)))


@functools.lru_cache(maxsize=None)
def _collection_class(names: tuple[str, ...]) -> type[metrics.Collection]:
  # One class per set of names for the whole process. With a new class made at every trace, merging a phase's
  # metrics intermittently met a collection of another phase's fields ("'_InlineCollection' object has no
  # attribute 'ce'", seen twice in multi-phase runs); our reading is that a freed class's address was reused while
  # a jit cache still keyed on it. Classes that live as long as the process cannot be confused that way.
  return metrics.Collection.create(**{name: metrics.Average.from_output(name) for name in names})


def classification_outputs(logits, labels, teacher_logits=None) -> dict[str, jax.Array]:
  outputs = {'top1': top_k_correct(logits, labels, 1), 'top5': top_k_correct(logits, labels, 5)}
  if teacher_logits is not None:
    # argmax of a NaN row is 0: a diverged student would "agree" wherever the teacher predicts class 0. A row with
    # a NaN on either side never agrees, as top_k_correct never counts it right.
    finite = ~jnp.isnan(logits).any(-1) & ~jnp.isnan(teacher_logits).any(-1)
    same = jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)
    outputs['agreement'] = (same & finite).astype(jnp.float32)
  return outputs


def empty_like(collection, sharding):
  """An empty collection of `collection`'s type placed with `sharding`: a jitted loop's accumulator must be placed
  like the program's output accumulator, or the program compiles a second time for it."""
  return jax.device_put(type(collection).empty(), sharding)


def accumulate(total, new):
  """total.merge(new) in total's dtypes (a loop carrying the accumulator must keep its types fixed)."""
  return jax.tree.map(lambda merged, old: merged.astype(old.dtype), total.merge(new), total)


def to_json(collection) -> dict:
  """A collection's accumulated values as JSON (names and leaves; float32 values are exact as Python floats), for a
  checkpoint's meta. It reads the collection from the devices: call it where the loop syncs anyway."""
  leaves = jax.tree.leaves(jax.device_get(collection))
  return dict(names=_names(collection), leaves=[value.tolist() for value in leaves])


def from_json(empty, record: dict, sharding):
  """`to_json`'s values back in a collection shaped like `empty` and placed with `sharding`; None when the record
  holds other metrics."""
  leaves, treedef = jax.tree.flatten(jax.device_get(empty))
  if record.get('names') != _names(empty) or len(record.get('leaves', ())) != len(leaves):
    return None
  values = [np.asarray(value, dtype=leaf.dtype).reshape(np.shape(leaf))
            for value, leaf in zip(record['leaves'], leaves)]
  return jax.device_put(jax.tree.unflatten(treedef, values), sharding)


def _names(collection) -> list[str]:
  return sorted(f.name for f in dataclasses.fields(collection))
