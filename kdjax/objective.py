"""From a phase's `losses` config to one function `(student_out, teacher_out, labels, adapters, epoch, ...)`
returning `(loss, terms, memory)`.

Each loss *term* is an entry of `TERMS`: which arguments it takes (with defaults and checks), whether it needs the
teacher, and how it maps model outputs to a `kdjax.losses` function. Outputs are `(logits, features)` pairs, so a
term chooses which feature map feeds it by index. Feature terms whose student and teacher channel counts differ get
a learned adapter (FitNets' regressor: a 1x1 map, or the reference code's conv-BN-ReLU), kept in a separate
`Adapters` module next to the student and trained with it.

A term may keep *memory* across steps (CRD's banks of past embeddings, one row per training example): it declares
`init_memory`, its `compute` also takes the memory, the batch's example indices and a key, and returns the updated
memory, which the train step keeps in the train state (so it is checkpointed, resumed and sharded like the rest).
"""
import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from kdjax import losses
from kdjax import registries
from kdjax.errors import UserError


def _positive(name):
  return lambda v: None if v > 0 else f'`{name}` must be > 0, got {v}'


def _unit_interval(name):
  return lambda v: None if 0 <= v <= 1 else f'`{name}` must be in [0, 1], got {v}'


@dataclasses.dataclass(frozen=True)
class Term:
  """A loss term kind: `compute(args, student_out, teacher_out, labels, adapters, epoch)` returns a scalar.

  `epoch` is the phase's progress in epochs (a float32 array: 0 at the phase's first step), the unit papers state
  schedules in, so a term's schedule does not depend on the dataset's size, the batch size or earlier phases."""
  compute: Callable[..., jax.Array]
  defaults: dict[str, Any]
  needs_teacher: bool
  checks: dict[str, Callable[[Any], str | None]] = dataclasses.field(default_factory=dict)
  uses_features: bool = False
  same_channels: bool = False   # the loss compares channel by channel, so an adapter is needed when they differ
  # Stateful terms: (args, num_examples, key) -> the term's memory; compute then takes (..., memory, index, key)
  # and returns (value, new memory).
  init_memory: Callable[..., dict] | None = None
  # Terms with learned heads of their own (instead of an adapter): (name, args, student channels, teacher
  # channels) -> {adapter key: (in, out, regressor)}.
  heads: Callable[..., dict[str, tuple[int, int, str]]] | None = None


def _global_pool(x):
  """(N, C) float32: the mean over H, W of an NHWC map (a bfloat16 mean would round what the losses cast back)."""
  x = x.astype(jnp.float32)
  return x.mean(axis=(1, 2)) if x.ndim == 4 else x


def _uses_adapter(args, student_channels: int, teacher_channels: int) -> bool:
  """Whether a feature term maps the student's map through an adapter: by its own `adapter` setting. Adapters are
  shared by key (the stage pair), so another term's adapter on the same pair must not leak into a 'never' term."""
  return args['adapter'] == 'always' or (args['adapter'] == 'auto' and student_channels != teacher_channels)


def _adapted(args, student_out, teacher_out, adapters):
  """The student feature map `args.student_stage`, mapped by its adapter if the term uses one, and the teacher's."""
  student = student_out[1][args['student_stage']]
  teacher = teacher_out[1][args['teacher_stage']]
  if _uses_adapter(args, student.shape[-1], teacher.shape[-1]):
    student = adapters.maps[adapter_key(args)](student)
  if args.get('pool') == 'avg':
    student, teacher = _global_pool(student), _global_pool(teacher)
  return student, teacher


def feature_term(loss_fn, *, same_channels=False, pool=None, **extra_defaults):
  """A term on one student and one teacher feature map (by stage index; -1 = the last, the head's input):
  `loss_fn(student_map, teacher_map, **extra)`. Its arguments are `student_stage`, `teacher_stage`, `adapter`
  ('auto' with `same_channels`: a learned map where channel counts differ; else 'never'), `regressor` (what that
  map is, see `REGRESSORS`), `pool` when given ('avg': global average pooling of both maps first) and
  `extra_defaults`, which configs may set."""
  defaults = dict(student_stage=-1, teacher_stage=-1, adapter='auto' if same_channels else 'never',
                  regressor='linear', **extra_defaults)
  if pool is not None:
    defaults['pool'] = pool
  return Term(
      compute=lambda a, s, t, y, ad, epoch: loss_fn(*_adapted(a, s, t, ad), **{k: a[k] for k in extra_defaults}),
      defaults=defaults, needs_teacher=True, uses_features=True, same_channels=same_channels, checks=_ADAPTER)


def logit_term(loss_fn, with_labels=False, checks=None, **defaults):
  """A term on the logits: `loss_fn(student_logits, teacher_logits[, labels], **args)`; `defaults` are its
  arguments (configs may set them), `checks` {argument: value -> error message or None}."""
  def compute(a, s, t, y, ad, epoch):
    return loss_fn(s[0], t[0], y, **a) if with_labels else loss_fn(s[0], t[0], **a)
  return Term(compute=compute, defaults=defaults, needs_teacher=True, checks=checks or {})


def _dkd(a, s, t, y, ad, epoch):
  """Decoupled KD with its linear warm-up of the loss weight over the phase's first `warmup_epochs` epochs (the
  paper's 20 on CIFAR-100), whatever the dataset's size and batch size."""
  args = {k: v for k, v in a.items() if k != 'warmup_epochs'}
  return losses.linear_warmup(epoch, a['warmup_epochs']) * losses.dkd(s[0], t[0], y, **args)


def _crd_heads(name: str) -> tuple[str, str]:
  return f'crd_{name}_student', f'crd_{name}_teacher'


def _crd(a, s, t, y, ad, epoch, memory, index, key):
  """CRD (Tian et al. 2020): project both pooled feature maps to `embed_dim` with learned heads, contrast each
  side's embedding with the other side's bank (its own example's row against `negatives` random rows of other
  classes, see `losses.crd_nce`), then write the batch's embeddings and labels into the banks (momentum update)."""
  student_head, teacher_head = _crd_heads(a['name'])
  # The heads compute in the run's dtype; the embeddings (and the banks they are written to) are float32.
  student = losses.l2_normalize(ad.maps[student_head](_global_pool(s[1][a['student_stage']])).astype(jnp.float32))
  teacher = losses.l2_normalize(ad.maps[teacher_head](_global_pool(t[1][a['teacher_stage']])).astype(jnp.float32))
  others = jax.random.randint(key, (student.shape[0], a['negatives']), 0, memory['student'].shape[0])
  rows = jnp.concatenate([index[:, None], others], axis=1)
  # The example's own row is never a negative; rows not yet written (label -1) count whatever their class.
  valid = (others != index[:, None]) & (memory['labels'][others] != y[:, None])
  value = losses.crd_nce(student, teacher, memory['student'][rows], memory['teacher'][rows], valid=valid,
                         nce_t=a['nce_t'])
  new_memory = {'student': losses.update_memory(memory['student'], index, student, momentum=a['momentum']),
                'teacher': losses.update_memory(memory['teacher'], index, teacher, momentum=a['momentum']),
                'labels': memory['labels'].at[index].set(y.astype(memory['labels'].dtype))}
  return value, new_memory


def _crd_head_shapes(name, a, student_channels, teacher_channels):
  """Two embedding heads, one per side, into the same `embed_dim` space: linear maps, with a bias where
  `head_bias` (the reference code's `Embed` is an `nn.Linear` with one; kdjax's default has none, as its recorded
  CRD runs had)."""
  student_head, teacher_head = _crd_heads(name)
  kind = 'affine' if a['head_bias'] else 'linear'
  return {student_head: (student_channels, a['embed_dim'], kind), teacher_head: (teacher_channels, a['embed_dim'],
                                                                                kind)}


def _crd_memory(a, num_examples, key):
  """Both banks start as random unit rows (the reference implementation starts from uniform noise); `labels` holds
  each row's class once the row has been written (-1 before), so negatives of the anchor's class can be left out."""
  student_key, teacher_key = jax.random.split(key)
  bank = lambda k: losses.l2_normalize(jax.random.normal(k, (num_examples, a['embed_dim']), jnp.float32))
  return {'student': bank(student_key), 'teacher': bank(teacher_key),
          'labels': jnp.full((num_examples,), -1, jnp.int32)}


_TEMPERATURE = dict(temperature=_positive('temperature'))
_ADAPTER = dict(adapter=lambda v: None if v in ('auto', 'always', 'never') else
                f"`adapter` must be 'auto' (where channels differ), 'always' or 'never', got {v!r}",
                regressor=lambda v: None if v in REGRESSORS else
                f"`regressor` must be one of {', '.join(sorted(REGRESSORS))}, got {v!r}")

TERMS: dict[str, Term] = {
    'ce': Term(compute=lambda a, s, t, y, ad, epoch: losses.cross_entropy(s[0], y, **a),
               defaults=dict(label_smoothing=0.0), needs_teacher=False,
               checks=dict(label_smoothing=_unit_interval('label_smoothing'))),
    'hinton_kd': logit_term(losses.hinton_kd, with_labels=True, alpha=0.5, temperature=4.0,
                             checks=dict(alpha=_unit_interval('alpha'), **_TEMPERATURE)),
    'kd': logit_term(losses.kd_divergence, temperature=4.0, checks=_TEMPERATURE),
    'dkd': Term(compute=_dkd, defaults=dict(alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=0.0),
                needs_teacher=True,
                checks=dict(warmup_epochs=lambda v: None if v >= 0 else f'`warmup_epochs` must be >= 0, got {v}',
                            **_TEMPERATURE)),
    'dist': logit_term(losses.dist, beta=1.0, gamma=1.0, temperature=1.0, checks=_TEMPERATURE),
    'lskd': logit_term(losses.logit_standardized_kd, temperature=2.0, checks=_TEMPERATURE),
    'feature_mse': feature_term(losses.feature_mse, same_channels=True),   # FitNets hints / stage matching
    'sp': feature_term(losses.similarity_preserving),
    'at': feature_term(losses.attention_transfer, p=2),
    'rkd': feature_term(losses.relational_kd, pool='avg', distance_weight=25.0, angle_weight=50.0),
    'pkt': feature_term(losses.pkt, pool='avg'),
    # Contrastive representation distillation, with its memory banks in the train state (see `_crd`).
    'crd': Term(compute=_crd, defaults=dict(student_stage=-1, teacher_stage=-1, embed_dim=128, negatives=4096,
                                            nce_t=0.07, momentum=0.5, head_bias=False),
                needs_teacher=True, uses_features=True, init_memory=_crd_memory, heads=_crd_head_shapes,
                checks=dict(embed_dim=_positive('embed_dim'), negatives=_positive('negatives'),
                            nce_t=_positive('nce_t'), momentum=_unit_interval('momentum'),
                            head_bias=lambda v: None if isinstance(v, bool) else
                            f'`head_bias` must be True or False, got {v!r}')),
}


_ORIGINS: dict[str, str] = {kind: __file__ for kind in TERMS}  # kind -> the file that registered it


def register_term(kind: str, term: Term) -> Term:
  """Adds a loss term kind that configs can name (`loss_term(kind, weight=..., ...)`); returns `term`.

  Build it with `logit_term(fn, ...)` for a function of (student logits, teacher logits[, labels]) or
  `feature_term(fn, ...)` for one of (student map, teacher map), or a `Term` of your own. A kind another file
  registered raises `ValueError` (see `kdjax.registries`)."""
  registries.add(TERMS, _ORIGINS, kind, term, what='loss term kind', origin=registries.caller_file())
  return term


def check_term(term_cfg, path: str) -> None:
  """UserError unless `term_cfg` names a known term kind with known, valid arguments."""
  if not hasattr(term_cfg, 'keys'):
    raise UserError(f'config `{path}` must be a loss term like loss_term("ce", weight=1.0), got {term_cfg!r}; '
                    'fix or remove it')
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
  missing = [key for key in term.defaults if key not in term_cfg]
  if missing:  # `loss_term` fills every argument: this term was made for another kind, then its kind changed
    kept = ', '.join(f'{k}={term_cfg[k]!r}' for k in term_cfg if k not in ('kind', 'weight')) or 'none'
    logging.warning('config `%s` is a %s term without its argument(s) %s (defaults used): its kind was changed '
                    'after it was made, so the arguments it kept (%s) are another kind\'s values; set them '
                    'explicitly (or make the term with loss_term(%r, ...) in the config)', path, term_cfg.kind,
                    ', '.join(missing), kept, term_cfg.kind)


def term_args(term_cfg) -> dict[str, Any]:
  term = TERMS[term_cfg.kind]
  return {k: term_cfg.get(k, v) for k, v in term.defaults.items()}


def adapter_key(args) -> str:
  """One adapter per (student stage, teacher stage, regressor): terms on the same maps share it."""
  suffix = '' if args.get('regressor', 'linear') == 'linear' else f'_{args["regressor"]}'
  return f's{args["student_stage"]}_t{args["teacher_stage"]}{suffix}'


class ConvBNReLURegressor(nnx.Module):
  """FitNets' regressor as RepDistiller and mdistiller build it for maps of one spatial size (their `ConvReg`): a
  1x1 convolution, BatchNorm, ReLU.

  The references run it in training only, where BatchNorm normalises with the batch's statistics; its running
  averages are never read, so none are kept here (the batch's mean and variance, then a learned scale and shift).
  The convolution has no bias: the normalisation would subtract it again."""

  def __init__(self, c_in: int, c_out: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.conv = nnx.Linear(c_in, c_out, use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.scale = nnx.Param(jnp.ones((c_out,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((c_out,), jnp.float32))

  def __call__(self, x):
    y = self.conv(x).astype(jnp.float32)
    axes = tuple(range(y.ndim - 1))  # the batch and, for maps, H and W: all but the channels
    y = (y - y.mean(axes)) * jax.lax.rsqrt(y.var(axes) + 1e-5) * self.scale.get_value() + self.bias.get_value()
    return jax.nn.relu(y).astype(x.dtype)


# What a feature term's `regressor` (its adapter) is: (in channels, out channels, rngs, dtype) -> module. `linear` is
# a learned 1x1 map (a 1x1 convolution on NHWC maps equals a Dense on the last axis, so one `nnx.Linear` serves conv
# and MLP features); `affine` adds a bias; `conv_bn_relu` is the reference code's FitNets regressor.
REGRESSORS: dict[str, Callable[..., nnx.Module]] = {
    'linear': lambda c_in, c_out, rngs, dtype: nnx.Linear(c_in, c_out, use_bias=False, dtype=dtype,
                                                          param_dtype=jnp.float32, rngs=rngs),
    'affine': lambda c_in, c_out, rngs, dtype: nnx.Linear(c_in, c_out, use_bias=True, dtype=dtype,
                                                          param_dtype=jnp.float32, rngs=rngs),
    'conv_bn_relu': lambda c_in, c_out, rngs, dtype: ConvBNReLURegressor(c_in, c_out, rngs=rngs, dtype=dtype),
}


class Adapters(nnx.Module):
  """The learned maps of feature terms: adapters from student to teacher channels, one per (student stage,
  teacher stage, regressor) that a term needs, and CRD's embedding heads. `shapes` is `adapter_shapes`'s
  {key: (in channels, out channels, regressor)}."""

  def __init__(self, shapes: dict[str, tuple[int, int, str]], *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.maps = nnx.Dict({key: REGRESSORS[kind](c_in, c_out, rngs, dtype)
                          for key, (c_in, c_out, kind) in sorted(shapes.items())})


def adapter_shapes(phases, student_channels, teacher_channels) -> dict[str, tuple[int, int, str]]:
  """The adapters all phases' feature terms need: {key: (student channels, teacher channels, regressor)}."""
  shapes, heads_of = {}, {}
  for ph in phases:
    for name, term_cfg in ph.losses.items():
      if not TERMS[term_cfg.kind].uses_features:
        continue
      args = term_args(term_cfg)
      c_in = _stage(student_channels, args['student_stage'], 'student')
      c_out = _stage(teacher_channels, args['teacher_stage'], 'teacher')
      if TERMS[term_cfg.kind].heads is not None:
        # Heads (and CRD's memory banks) belong to the term's name: two phases may share them, but only for the
        # same maps and sizes, or one phase would silently start from heads trained on other maps.
        setting = dict(student_stage=args['student_stage'] % len(student_channels),  # -1 is the last stage
                       teacher_stage=args['teacher_stage'] % len(teacher_channels), embed_dim=args['embed_dim'],
                       head_bias=args['head_bias'])
        if heads_of.setdefault(name, setting) != setting:
          raise UserError(f'loss term `{name}` ({term_cfg.kind}) is set to {heads_of[name]} in one phase and '
                          f'{setting} in another; its learned heads and memory are kept by name, so give the '
                          'terms of different maps different names')
        shapes.update(TERMS[term_cfg.kind].heads(name, args, c_in, c_out))
      elif _uses_adapter(args, c_in, c_out):
        shapes[adapter_key(args)] = (c_in, c_out, args['regressor'])
      elif c_in != c_out and TERMS[term_cfg.kind].same_channels:
        raise UserError(f'feature loss: student stage {args["student_stage"]} has {c_in} channels, teacher stage '
                        f'{args["teacher_stage"]} has {c_out}; set adapter=\'auto\' to learn a 1x1 adapter')
  return shapes


def phase_adapter_pattern(ph, student_channels, teacher_channels) -> str:
  """A regex over adapter paths selecting the adapters (and CRD heads) phase `ph`'s terms use.

  A phase's optimizer trains only these: the others belong to other phases, and with weight decay they would drift
  from their initial values while nothing uses them.
  """
  keys = adapter_shapes([ph], student_channels, teacher_channels)
  return '^maps/(' + '|'.join(re.escape(k) for k in sorted(keys)) + ')/' if keys else NO_ADAPTERS


NO_ADAPTERS = '(?!)'  # a regex that matches no path


def _stage(channels, index, who):
  if not -len(channels) <= index < len(channels):
    raise UserError(f'feature loss: {who} stage {index} does not exist; the {who} has stages '
                    f'0..{len(channels) - 1}')
  return channels[index]


def init_memory(phases, num_examples: int, key: jax.Array) -> dict:
  """The memory of every stateful term of every phase, by term name: {name: {bank: (num_examples, ...) array}}.

  `key` is the run's memory stream (`rng.stream(seed, 'memory')`); each term draws from its own fold of it."""
  memory = {}
  for ph in phases:
    for name, term_cfg in sorted(ph.losses.items()):
      term = TERMS[term_cfg.kind]
      if term.init_memory is not None and name not in memory:
        term_key = jax.random.fold_in(key, len(memory))
        memory[name] = term.init_memory(_named_args(name, term_cfg), num_examples, term_key)
  return memory


def _named_args(name, term_cfg):
  args = term_args(term_cfg)
  return {**args, 'name': name} if TERMS[term_cfg.kind].init_memory is not None else args


def loss_arguments(losses_cfg) -> dict[str, dict[str, jax.Array]]:
  """The phase's float loss arguments and term weights as float32 arrays: {term: {argument or 'weight': value}}.

  They travel in the train state (`TrainState.loss_args`) instead of being baked into the compiled step as
  constants, so runs that differ only in them (the alpha x temperature cells of a sweep, its seeds) compile to the
  same XLA program, which JAX's persistent compilation cache then shares. Integer and string arguments (stages,
  sizes) shape the program and stay static.
  """
  return {name: {**{k: jnp.float32(v) for k, v in term_args(t).items() if isinstance(v, float)},
                 'weight': jnp.float32(t.weight)}
          for name, t in sorted(losses_cfg.items())}


def _stage_shapes(student_out, teacher_out) -> str:
  """The stage maps' shapes (without the batch) of each model, for an error message."""
  shapes = lambda out: ', '.join(f'{i}: {tuple(f.shape[1:])}' for i, f in enumerate(out[1]))
  text = f'The student\'s stage maps are {shapes(student_out)}'
  return text if teacher_out is None else f'{text}; the teacher\'s {shapes(teacher_out)}'


def build_objective(losses_cfg) -> tuple[Callable, tuple[str, ...]]:
  """One function computing the weighted sum of a phase's terms, each term's value, and the terms' new memory.

  `objective(student_out, teacher_out, labels, adapters, epoch, memory=None, index=None, key=None, loss_args=None)`
  returns `(total, values, memory)`. `memory`, `index` (the batch's example indices) and `key` are needed only by
  stateful terms, whose memory comes back updated (the others' is passed through). `loss_args` (see
  `loss_arguments`) replaces the config's float arguments and weights by traced values; without it they are
  constants.
  """
  terms = [(name, TERMS[t.kind], _named_args(name, t), float(t.weight)) for name, t in sorted(losses_cfg.items())]

  def objective(student_out, teacher_out, labels, adapters, epoch, memory=None, index=None, key=None,
                loss_args=None):
    values, memory, total = {}, dict(memory or {}), 0.0
    for position, (name, term, args, weight) in enumerate(terms):
      if loss_args is not None:
        traced = dict(loss_args[name])
        weight = traced.pop('weight')
        args = {**args, **traced}
      try:
        if term.init_memory is None:
          values[name] = term.compute(args, student_out, teacher_out, labels, adapters, epoch)
        else:
          values[name], memory[name] = term.compute(args, student_out, teacher_out, labels, adapters, epoch,
                                                    memory[name], index, jax.random.fold_in(key, position))
      except losses.ShapeError as error:  # raised while tracing: the models' shapes, not the data, are at fault
        raise UserError(f'loss term `{name}` cannot compare the outputs the config feeds it ({error}) '
                        f'{_stage_shapes(student_out, teacher_out)}: set its student_stage / teacher_stage (or '
                        f'`adapter`; `losses.{name}` in the phase) to maps that fit, or choose another '
                        'student') from None
      total = total + weight * values[name]
    return total, values, memory

  return objective, tuple(name for name, *_ in terms)
