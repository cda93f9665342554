"""From a phase's `losses` config to one function `(student_out, teacher_out, labels, adapters) -> (loss, terms)`.

Each loss *term* is an entry of `TERMS`: which arguments it takes (with defaults and checks), whether it needs the
teacher, and how it maps model outputs to a `kdjax.losses` function. Outputs are `(logits, features)` pairs, so a
term chooses which feature map feeds it by index. Feature terms whose student and teacher channel counts differ get
a learned 1x1 adapter (FitNets' regressor), kept in a separate `Adapters` module next to the student and trained
with it.
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax import losses
from kdjax.errors import UserError


def _positive(name):
  return lambda v: None if v > 0 else f'`{name}` must be > 0, got {v}'


def _unit_interval(name):
  return lambda v: None if 0 <= v <= 1 else f'`{name}` must be in [0, 1], got {v}'


@dataclasses.dataclass(frozen=True)
class Term:
  """A loss term kind: `compute(args, student_out, teacher_out, labels, adapters)` returns a scalar."""
  compute: Callable[..., jax.Array]
  defaults: dict[str, Any]
  needs_teacher: bool
  checks: dict[str, Callable[[Any], str | None]] = dataclasses.field(default_factory=dict)
  uses_features: bool = False


def _adapted(args, student_out, teacher_out, adapters):
  """The student feature map `args.student_stage`, mapped by its adapter if it has one, and the teacher's."""
  student = student_out[1][args['student_stage']]
  teacher = teacher_out[1][args['teacher_stage']]
  key = adapter_key(args)
  if adapters is not None and key in adapters.maps:
    student = adapters.maps[key](student)
  return student, teacher


def _feature_term(loss_fn, **extra_defaults):
  return Term(
      compute=lambda a, s, t, y, ad: loss_fn(*_adapted(a, s, t, ad),
                                             **{k: a[k] for k in extra_defaults}),
      defaults=dict(student_stage=-1, teacher_stage=-1, adapter='auto', **extra_defaults),
      needs_teacher=True, uses_features=True)


def _logit_term(loss_fn, with_labels=False, checks=None, **defaults):
  def compute(a, s, t, y, ad):
    if with_labels:
      return loss_fn(s[0], t[0], y, **a)
    return loss_fn(s[0], t[0], **a)
  return Term(compute=compute, defaults=defaults, needs_teacher=True, checks=checks or {})


TERMS: dict[str, Term] = {
    'ce': Term(compute=lambda a, s, t, y, ad: losses.cross_entropy(s[0], y, **a),
               defaults=dict(label_smoothing=0.0), needs_teacher=False,
               checks=dict(label_smoothing=_unit_interval('label_smoothing'))),
    'hinton_kd': _logit_term(losses.hinton_kd, with_labels=True, alpha=0.5, temperature=4.0,
                             checks=dict(alpha=_unit_interval('alpha'), temperature=_positive('temperature'))),
    'kd': _logit_term(losses.kd_divergence, temperature=4.0, checks=dict(temperature=_positive('temperature'))),
    'feature_mse': _feature_term(losses.feature_mse),
}


def check_term(term_cfg, path: str) -> None:
  """UserError unless `term_cfg` names a known term kind with known, valid arguments."""
  if 'kind' not in term_cfg:
    raise UserError(f'config `{path}` has no `kind`; choose one of: {", ".join(sorted(TERMS))}')
  if term_cfg.kind not in TERMS:
    raise UserError(f'config `{path}.kind` is {term_cfg.kind!r}; choose one of: {", ".join(sorted(TERMS))}')
  term = TERMS[term_cfg.kind]
  if term_cfg.get('weight', 1.0) < 0:
    raise UserError(f'config `{path}.weight` must be >= 0, got {term_cfg.weight}')
  for key, value in term_cfg.items():
    if key in ('kind', 'weight'):
      continue
    if key not in term.defaults:
      from kdjax.config import closest_key_hint
      raise UserError(f'config `{path}.{key}` is not an argument of loss `{term_cfg.kind}`'
                      f'{closest_key_hint(key, term.defaults)}; it takes: {", ".join(term.defaults) or "nothing"}')
    check = term.checks.get(key)
    problem = check(value) if check else None
    if problem:
      raise UserError(f'config `{path}`: {problem}')


def term_args(term_cfg) -> dict[str, Any]:
  term = TERMS[term_cfg.kind]
  return {k: term_cfg.get(k, v) for k, v in term.defaults.items()}


def adapter_key(args) -> str:
  return f's{args["student_stage"]}_t{args["teacher_stage"]}'


class Adapters(nnx.Module):
  """Learned 1x1 maps from student to teacher channels, one per (student stage, teacher stage) pair that needs one.

  A 1x1 convolution on NHWC maps equals a Dense on the last axis, so one `nnx.Linear` serves conv and MLP features.
  """

  def __init__(self, shapes: dict[str, tuple[int, int]], *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.maps = nnx.Dict({key: nnx.Linear(c_in, c_out, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                                          rngs=rngs)
                          for key, (c_in, c_out) in sorted(shapes.items())})


def adapter_shapes(phases, student_channels, teacher_channels) -> dict[str, tuple[int, int]]:
  """The adapters all phases' feature terms need: {key: (student channels, teacher channels)}."""
  shapes = {}
  for ph in phases:
    for term_cfg in ph.losses.values():
      if not TERMS[term_cfg.kind].uses_features:
        continue
      args = term_args(term_cfg)
      c_in = _stage(student_channels, args['student_stage'], 'student')
      c_out = _stage(teacher_channels, args['teacher_stage'], 'teacher')
      if args['adapter'] is True or (args['adapter'] == 'auto' and c_in != c_out):
        shapes[adapter_key(args)] = (c_in, c_out)
      elif c_in != c_out:
        raise UserError(f'feature loss: student stage {args["student_stage"]} has {c_in} channels, teacher stage '
                        f'{args["teacher_stage"]} has {c_out}; set adapter=\'auto\' to learn a 1x1 adapter')
  return shapes


def _stage(channels, index, who):
  if not -len(channels) <= index < len(channels):
    raise UserError(f'feature loss: {who} stage {index} does not exist; the {who} has stages '
                    f'0..{len(channels) - 1}')
  return channels[index]


def build_objective(losses_cfg) -> tuple[Callable, tuple[str, ...]]:
  """One function computing the weighted sum of a phase's terms and each term's value."""
  terms = [(name, TERMS[t.kind], term_args(t), float(t.weight)) for name, t in sorted(losses_cfg.items())]

  def objective(student_out, teacher_out, labels, adapters):
    values = {name: term.compute(args, student_out, teacher_out, labels, adapters)
              for name, term, args, _ in terms}
    total = sum(weight * values[name] for name, _, _, weight in terms)
    return total, values

  return objective, tuple(name for name, *_ in terms)
