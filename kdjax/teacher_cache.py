"""Teacher logits computed once per (training example, augmentation view), then looked up by the train step.

Why: a KD step runs the frozen teacher forward on every batch, and the teacher is usually the larger network, so it
often costs more than the student's whole step. When the train-time augmentation picks one of finitely many views
per example (`kdjax.data.augment.DiscreteAugmentation`: none 1 view, flip 2, the CIFAR crop+flip 162), the
teacher's logits for every (view, example) can be computed once and the step only gathers them.

The same views, by construction: the table is built with the augmentation's own `apply`, the run's normalisation
and compute dtype, and batches of the run's global batch size with the same sharding, and the step draws its view
ids with the same `sample` (same key) that renders its student's images. The logits agree with those the step would
compute to float32 rounding, not bitwise: the same arithmetic compiled into two XLA programs rounds differently in
the last bit (up to 5e-6 relative in `tests/test_teacher_cache.py`, which also checks that a cached KD run ends with
the same student as an uncached one, to the tolerance of the 8-vs-1-device test).

Cost and sharing: building costs `num_views` epochs of teacher forward passes, so on one run it pays only when the
run is longer than that (flip: after 2 epochs; crop+flip: after 162). Runs that share teacher and data (the cells
and seeds of a sweep, repeats) share the table: it is saved under the data cache dir, keyed by a hash of the
teacher's structure and variables, the training images and labels, the augmentation, dtype, batch size and device
count, and the next run loads it instead of recomputing. Memory: num_views x examples x classes values of the
teacher's logit dtype (CIFAR-10 crop+flip in float32: 162 x 50,000 x 10 x 4 B = 324 MB; CIFAR-100: 3.2 GB),
replicated on each device.

Refused (with a message) where it cannot be exact: augmentations without a finite set of views (random-resized
crops; mixup would be another), and loss terms that use the teacher's feature maps (only logits are cached: the
feature maps of 162 views of a dataset would not fit).
"""
import dataclasses
import hashlib
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kdjax import mesh as mesh_lib
from kdjax.data import augment
from kdjax.data import cache as cache_lib
from kdjax.data import loader
from kdjax.errors import UserError

# Bump when the table's layout or the way it is computed changes (2: teachers see their own normalisation; 3: the
# key holds the teacher's structure).
_VERSION = 3


@dataclasses.dataclass(frozen=True)
class CachedTeacher:
  """Stands in for `steps.Teacher` in the train step: its argument is the (views, examples, classes) table."""
  sample_views: Callable[[jax.Array, int], jax.Array]

  def outputs(self, table, images, batch, key):
    """(logits, no features) of the views this step's `key` draws for the batch's examples."""
    del images
    views = self.sample_views(key, batch['index'].shape[0])
    return table[views, batch['index']], None


def check_cacheable(augment_name: str, feature_terms: list[str]) -> augment.DiscreteAugmentation:
  """The augmentation, if its teacher outputs can be cached exactly; else a UserError naming the fix."""
  pipeline = augment.get_augmentation(augment_name)
  if not isinstance(pipeline, augment.DiscreteAugmentation):
    finite = [name for name, p in augment.AUGMENTATIONS.items() if isinstance(p, augment.DiscreteAugmentation)]
    raise UserError(f'teacher.cache needs an augmentation with a finite set of views ({", ".join(finite)}); '
                    f'data.augment={augment_name} draws continuous crops, so its teacher outputs cannot be '
                    'enumerated: set --config.teacher.cache=False')
  if feature_terms:
    raise UserError(f'teacher.cache keeps only the teacher\'s logits, but loss term(s) {", ".join(feature_terms)} '
                    'use its feature maps: set --config.teacher.cache=False')
  return pipeline


def _fingerprint(*trees) -> str:
  """sha256 of the arrays' bytes, shapes and dtypes (this process's copy of each replicated array).

  RNG keys (a dropout layer's stream) are left out: the teacher runs in inference mode, where they change nothing,
  and key arrays have no bytes to read.
  """
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(trees):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      continue
    host = np.asarray(leaf.addressable_data(0)) if isinstance(leaf, jax.Array) else np.asarray(leaf)
    digest.update(f'{host.shape}{host.dtype}'.encode())
    digest.update(np.ascontiguousarray(host).tobytes())
  return digest.hexdigest()[:20]


def build_table(teacher, teacher_vars, dataset: loader.ResidentDataset, pipeline: augment.DiscreteAugmentation,
                preprocess, batch_size: int) -> np.ndarray:
  """(views, examples, classes) teacher logits on the host, computed in batches shaped and sharded like the step's."""
  sharding = mesh_lib.batch_sharded(dataset.mesh)
  num_batches = -(-dataset.num_examples // batch_size)
  rows = np.arange(num_batches * batch_size) % dataset.num_examples  # the last batch wraps around; cut below
  order = mesh_lib.host_to_mesh(rows.astype(np.int32), mesh_lib.replicated(dataset.mesh))

  @jax.jit
  def logits_of(variables, images, labels, order, index, view):
    batch = loader.gather_batch(images, labels, order, index, batch_size=batch_size, sharding=sharding)
    x = augment.eval_transform(batch['image'], image_size=preprocess.image_size)
    x = preprocess.normalize(pipeline.apply(x, jnp.full((batch_size,), view, jnp.int32)))
    return teacher.forward(variables, x)[0]

  # Assembled on the host: joining sharded batches on the device would add a collective per batch, and long
  # streams of collectives abort on simulated CPU devices (benchmarks/README.md). One fetch per view keeps the
  # view's batches dispatched asynchronously.
  table = None
  for view in range(pipeline.num_views):
    parts = [logits_of(teacher_vars, dataset.images, dataset.labels, order, i, view) for i in range(num_batches)]
    logits = np.concatenate([_local(p) for p in parts])[:dataset.num_examples]
    if table is None:
      table = np.empty((pipeline.num_views,) + logits.shape, logits.dtype)
    table[view] = logits
  return table


def _local(array: jax.Array) -> np.ndarray:
  """The whole of a batch-sharded array, from this process's shards (one process: all of them)."""
  if array.is_fully_addressable:
    return np.asarray(array)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _structure(graphdef) -> str:
  """The teacher's module structure with its static settings (strides, an `InputRenormalized` map's scale and
  shift, ...): what, besides its variables, decides its outputs. Function addresses are dropped from the repr, so
  the same model gives the same text in every process."""
  return re.sub(r' at 0x[0-9a-f]+', '', repr(graphdef))


def table_key(teacher, teacher_vars, dataset: loader.ResidentDataset, augment_name: str, preprocess,
              batch_size: int) -> str:
  """What the table depends on: the teacher (structure and variables), the training data, the views and the way
  the step computes them (normalisation, dtype, batch size, device count)."""
  return cache_lib.digest(_VERSION, _structure(teacher.graphdef), _fingerprint(teacher_vars),
                          _fingerprint(dataset.images, dataset.labels), augment_name, preprocess.image_size,
                          preprocess.mean, preprocess.std, jnp.dtype(preprocess.dtype).name, batch_size,
                          jax.device_count())


def _read_table(path: str) -> np.ndarray | None:
  """The saved table, or None where this process has none or cannot read it (a damaged disk: the table is
  published whole, see `cache.publish`). An unreadable one is rebuilt for this run, with a warning naming it."""
  if not os.path.exists(path):
    return None
  try:
    return np.load(path)
  except (OSError, ValueError) as error:
    logging.warning('teacher cache: %s cannot be read (%s: %s); building the table for this run instead. Delete '
                    'its folder to let the next run save a fresh one', path, type(error).__name__, error)
    return None


def load_or_build(teacher, teacher_vars, dataset: loader.ResidentDataset, augment_name: str, preprocess,
                  batch_size: int, cache_dir: str | None) -> tuple[CachedTeacher, jax.Array]:
  """The cached teacher and its table: loaded when a run with the same teacher and data saved it, else built."""
  pipeline = augment.get_augmentation(augment_name)
  key = table_key(teacher, teacher_vars, dataset, augment_name, preprocess, batch_size)
  folder = os.path.join(cache_lib.cache_root(cache_dir), 'teacher_outputs', key)
  path = os.path.join(folder, 'logits.npy')
  cached = CachedTeacher(sample_views=pipeline.sample)
  # Load only where every process reads the table (a per-host cache dir may hold it on some hosts only): building
  # runs collectives, so the processes must all build or all load.
  table = _read_table(path)
  if mesh_lib.all_processes(table is not None):
    logging.info('teacher cache: loaded %s', path)
  else:
    logging.info('teacher cache: %d views x %d examples (%d epochs of teacher forward passes, once)',
                 pipeline.num_views, dataset.num_examples, pipeline.num_views)
    table = build_table(teacher, teacher_vars, dataset, pipeline, preprocess, batch_size)
    if not os.path.exists(path):  # every process that lacks it (publish settles races on a shared filesystem)
      with cache_lib.publish(folder) as temp:
        np.save(os.path.join(temp, 'logits.npy'), table)
  return cached, mesh_lib.replicate(table, dataset.mesh)
