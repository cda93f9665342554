"""An ensemble of classifiers that presents itself as one model (mean of the members' logits).

Two distillation set-ups need it. A multi-teacher run (`teacher.workdir=runs/t1,runs/t2`, built by `kdjax.teachers`)
distils from the average of several teachers (Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network",
2015, distil an ensemble into one net; You et al., "Learning from Multiple Teacher Networks", KDD 2017, average the
teachers' outputs). An online/mutual run trains several students together (Zhang et al., "Deep Mutual Learning",
CVPR 2018; Lan et al., "Knowledge Distillation by On-the-Fly Native Ensemble", NeurIPS 2018) and reports the
accuracy of their average. `Ensemble` gives the average through the ordinary `model(x, train=...)` call, so the
trainer's evaluation and teacher code need no special case, and `member_logits` gives each member's logits for
losses that treat members separately.

Averaging logits (not probabilities) keeps the output a logit, so temperature scaling and the KD losses apply to it
unchanged; softmax of the mean logit is the normalised geometric mean of the members' distributions. Use
`member_logits` for any other combination.

Contract differences (see `kdjax.models`): the parameters live under `members/<i>/...` (each member is a full model
under `self.members`, an `nnx.List`), not under `stages`/`head`, so an ensemble has no `stages` or `head` attribute
and **stage-wise freezing (`trainable='^stages/...'`) and head swapping do not apply to it**; a trainable pattern
has to name members (`^members/0/`). `features` and `stage_channels` are those of the *first* member, so feature
losses against an ensemble teacher compare with member 0's maps only.
"""

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.errors import UserError
from kdjax.models.registry import create_model, register_model


class Ensemble(nnx.Module):
  """Members given as registered model names (built here) or as already-built modules, in any mix.

  Args:
    members: model names and/or modules; at least one. Every member must produce logits of the same shape.
    num_classes, image_shape, rngs, dtype: passed to `create_model` for each named member (required when any member
      is a name). The members are built one after another from the same `rngs`, so two members of the same
      architecture start from different initialisations.
    member_kwargs: architecture keywords for the named members: one mapping applied to every named member, or a
      sequence with one mapping (or None) per entry of `members`.
  """

  def __init__(
    self,
    members: Sequence[str | nnx.Module],
    *,
    num_classes: int | None = None,
    image_shape: tuple[int, int, int] | None = None,
    rngs: nnx.Rngs | None = None,
    dtype: Any = jnp.float32,
    member_kwargs: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
  ):
    if isinstance(members, (str, nnx.Module)) or not members:
      raise UserError('an ensemble needs a non-empty list of members (model names or modules), e.g. '
                      "members=('cnn2', 'cnn3')")
    kwargs_per_member = _per_member_kwargs(member_kwargs, len(members))
    built = []
    for member, kwargs in zip(members, kwargs_per_member):
      if isinstance(member, str):
        if num_classes is None or image_shape is None or rngs is None:
          raise UserError(f'building ensemble member {member!r} by name needs num_classes, image_shape and rngs')
        member = create_model(member, num_classes=num_classes, image_shape=image_shape, rngs=rngs, dtype=dtype,
                              **kwargs)
      elif not isinstance(member, nnx.Module):
        raise UserError(f'ensemble members must be model names or nnx modules, got {member!r}')
      elif kwargs:
        raise UserError('member_kwargs only apply to members given by name; build module members with their own '
                        'arguments')
      built.append(member)
    self.members = nnx.List(built)

  @property
  def stage_channels(self) -> tuple[int, ...]:
    """The first member's stage channels (its features are the ensemble's features)."""
    return tuple(self.members[0].stage_channels)

  def member_outputs(self, x: jax.Array, *, train: bool) -> tuple[tuple[jax.Array, tuple[jax.Array, ...]], ...]:
    """Each member's `(logits, features)`, in member order."""
    return tuple(member(x, train=train) for member in self.members)

  def member_logits(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Each member's float32 logits stacked on a new leading axis: (num_members, N, num_classes)."""
    return _stack_logits([logits for logits, _ in self.member_outputs(x, train=train)])

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """(mean of the members' logits, first member's features); every member runs once."""
    outputs = self.member_outputs(x, train=train)
    logits = _stack_logits([member_logits for member_logits, _ in outputs])
    return jnp.mean(logits, axis=0), outputs[0][1]


def _stack_logits(logits: list[jax.Array]) -> jax.Array:
  shapes = {tuple(l.shape) for l in logits}
  if len(shapes) != 1:
    raise UserError(f'ensemble members disagree on the logits shape ({sorted(shapes)}); give every member the same '
                    'num_classes')
  return jnp.stack([l.astype(jnp.float32) for l in logits])


def _per_member_kwargs(member_kwargs, count: int) -> list[dict[str, Any]]:
  """Normalises `member_kwargs` (None, one shared mapping, or one entry per member) to one dict per member."""
  if member_kwargs is None:
    return [{}] * count
  if isinstance(member_kwargs, Mapping):
    return [dict(member_kwargs)] * count
  member_kwargs = list(member_kwargs)
  if len(member_kwargs) != count or not all(k is None or isinstance(k, Mapping) for k in member_kwargs):
    raise UserError(f'member_kwargs must be one mapping for all members or a list of {count} mappings (or None), '
                    f'one per member; got {member_kwargs!r}')
  return [dict(k or {}) for k in member_kwargs]


def create_ensemble(
  members: Sequence[str | nnx.Module],
  *,
  num_classes: int,
  image_shape: tuple[int, int, int],
  rngs: nnx.Rngs,
  dtype: Any = jnp.float32,
  member_kwargs: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
) -> Ensemble:
  """The registry entry 'ensemble': `create_model('ensemble', members=('cnn2', 'cnn3'), num_classes=..., ...)`."""
  return Ensemble(members, num_classes=num_classes, image_shape=image_shape, rngs=rngs, dtype=dtype,
                  member_kwargs=member_kwargs)


register_model('ensemble', create_ensemble)
