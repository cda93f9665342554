"""The config schema: every key a run understands, its default, and the checks that turn mistakes into one line.

Experiment files in `configs/` start from `base_config()` and override values; because the base is the full schema,
a key that is not in it is a typo, and we say which valid key is closest. `validate` checks values (ranges, the
phase schedule, the loss terms' arguments) before any data is loaded, so a bad config fails in a second, not after
the dataset is decoded.
"""
import copy
import difflib
import json
import os
import re
from typing import Any, Callable, Iterable

import ml_collections

from kdjax import plugins as plugins_lib
from kdjax.errors import UserError


def optimizer(name='sgd', learning_rate=0.1, **overrides) -> ml_collections.ConfigDict:
  """One phase's optimizer and learning-rate schedule (see `kdjax.optim` for the registries)."""
  cfg = ml_collections.ConfigDict(dict(
      name=name,               # sgd | adam | adamw
      learning_rate=learning_rate,  # peak learning rate
      momentum=0.9,            # sgd only
      nesterov=False,          # sgd only
      weight_decay=0.0,        # sgd, adam: L2 added to the gradient (as torch's); adamw: decoupled decay
      schedule='cosine',       # constant | cosine | linear | onecycle | piecewise
      pct_start=0.3,           # onecycle: the share of steps rising to the peak (torch OneCycleLR's default)
      # sgd + onecycle: (base, max) momentum cycled against the rate, max -> base while it rises, back to max as it
      # falls, e.g. (0.85, 0.95) as torch's OneCycleLR does by default; () keeps `momentum` fixed.
      cycle_momentum=(),
      warmup_epochs=0.0,       # linear warm-up from 0 before the schedule
      boundaries_epochs=(),    # piecewise: epochs at which the rate is multiplied by decay_factor
      decay_factor=0.1,        # piecewise only
      grad_clip_norm=0.0,      # 0 = no clipping
  ))
  cfg.update(overrides)
  return cfg


def loss_term(kind: str, weight: float = 1.0, **args) -> ml_collections.ConfigDict:
  """One weighted loss term; `kind` names an entry of `kdjax.objective.TERMS`, `args` its arguments.

  Every argument of the kind is filled in with its default, so each one can be overridden from the command line
  (`--config.phases.train.losses.ce.label_smoothing=0.1`) even when the config file did not set it.
  """
  from kdjax import objective  # late: objective imports jax
  defaults = objective.TERMS[kind].defaults if kind in objective.TERMS else {}
  return ml_collections.ConfigDict(dict(kind=kind, weight=weight, **{**defaults, **args}))


def phase(epochs: float, losses: dict, opt: ml_collections.ConfigDict | None = None,
          trainable: str = '.*', frozen_bn: bool = True, frozen_eval: bool = False) -> ml_collections.ConfigDict:
  """One phase of a run: what trains (a regex over student parameter paths), on which losses, for how long.

  A plain training run is one phase; stage-wise distillation is several. Parameters whose path (e.g.
  `stages/2/conv1/kernel`) does not match `trainable` are frozen: neither they nor their BatchNorm statistics
  change during the phase (`frozen_bn`). With `frozen_eval`, the stages (and head) with no trainable parameter
  also run in inference mode, as `.eval()` on a frozen PyTorch backbone: BatchNorm normalises with the running
  statistics the evaluation will use, instead of each batch's, and dropout is off.
  """
  # Copies: ConfigDict stores sub-dicts by reference, so phases built from one `opt` would share it and
  # `--config.phases.classifier.optimizer.learning_rate=...` would change every phase.
  return ml_collections.ConfigDict(dict(
      epochs=float(epochs), trainable=trainable, frozen_bn=frozen_bn, frozen_eval=frozen_eval,
      losses=ml_collections.ConfigDict(copy.deepcopy(dict(losses))),
      optimizer=copy.deepcopy(opt) if opt is not None else optimizer()))


def use_plugins(cfg: ml_collections.ConfigDict, *modules: str) -> ml_collections.ConfigDict:
  """Import `modules` (which register models or loss terms) and record them in `cfg.plugins`, so the run's
  config.json and export name them for whatever rebuilds its models later (`kdjax.plugins`). Returns `cfg`."""
  plugins_lib.load(modules)
  cfg.plugins = tuple(dict.fromkeys((*cfg.plugins, *modules)))
  return cfg


def base_config() -> ml_collections.ConfigDict:
  """The full schema with defaults: a CE run of `cnn2` on the bundled digits."""
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  cfg.suite = 'single'         # kdjax.suites.SUITES: single | kd_comparison | repeats | sweep
  cfg.plugins = ()             # modules registering the config's own models / loss terms (see use_plugins)
  cfg.data = ml_collections.ConfigDict(dict(
      dataset='digits',        # tfds name, image-folder path or .tar.gz path
      train_split='train',     # tfds-style slicing works for every source: 'train[:25%]'
      eval_split='test',       # the split that picks the best checkpoint
      heldout_split='',        # optional second evaluation split (e.g. 'train[25%:]' in subset mode)
      image_size=0,            # 0 = keep the stored size; else resize to image_size x image_size when loading
      augment='crop_flip',     # kdjax.data.augment.AUGMENTATIONS
      normalize=True,          # per-channel mean/std of the training split
      cache_dir='',            # '' = ~/.cache/kdjax
      data_dir='',             # tfds data_dir; '' = tfds default
      on_corrupt='error',      # error | skip (unreadable image files)
  ))
  # The student model: `name` in kdjax.models.MODELS; every other key is passed to its constructor
  # (e.g. hidden=64 for mlp2), so a config adds the architecture arguments it wants to expose to overrides.
  cfg.student = ml_collections.ConfigDict(dict(name='cnn2'))
  cfg.teacher = ml_collections.ConfigDict(dict(
      # a finished teacher run's workdir, or several comma-separated ('runs/t1,runs/t2'): the teacher is then their
      # ensemble (mean of the logits, first run's features; each run's own model; same classes); '' = no teacher
      workdir='',
      name='resnet18_cifar',   # the teacher's model (kd_comparison trains it; must match a single teacher run;
                               # ensemble members whose run records no model use it)
      epochs=10.0,             # kd_comparison: the teacher run's budget
      checkpoint='best',       # best | last: the teacher run's best (eval top-1) or final checkpoint
      cache=False,             # look the teacher's logits up per (example, augmentation view) instead of running
                               # it every step: exact; for none/flip/crop_flip and logit losses (kdjax.teacher_cache)
  ))
  cfg.init = ml_collections.ConfigDict(dict(
      workdir='',              # start the student from this run's best checkpoint (or an imported model)
      keep_fresh='',           # regex of parameters left freshly initialised, e.g. '^head/' for other classes
      checkpoint='best',       # best | last: which checkpoint of that run
  ))
  cfg.compute_dtype = 'float32'  # float32 | bfloat16 (parameters stay float32)
  cfg.batch_size = 128         # global, split over all devices
  cfg.eval_batch_size = 512
  cfg.schedule = ('train',)    # the phases, in order
  cfg.phases = ml_collections.ConfigDict(dict(
      train=phase(10, {'ce': loss_term('ce')})))
  cfg.eval_every_epochs = 1.0
  # > 0: summary.json reports the training seconds and epochs to this eval top-1 (compile, evaluation and
  # checkpoints excluded; a resumed run adds up its invocations up to the checkpoint it resumed from).
  cfg.target_top1 = 0.0
  cfg.log_every_steps = 50
  cfg.checkpoint_every_steps = 0  # 0 = checkpoint at every evaluation and at the end of each phase
  cfg.keep_checkpoints = 2
  cfg.nonfinite = 'stop'       # stop | skip: what a NaN/Inf loss or gradient does
  cfg.repeats = ml_collections.ConfigDict(dict(seeds=(0, 1, 2)))   # suites 'repeats' and 'sweep'
  # suite 'sweep': axes as 'dotted.key=v1,v2;other.key=v3,v4' (values parsed as Python literals), crossed with
  # repeats.seeds; e.g. 'phases.train.losses.kd.alpha=0.1,0.5;phases.train.losses.kd.temperature=1,4'.
  # best_cell_seeds: extra seeds on which the winning cell is rerun afterwards, e.g. (1, 2) with repeats.seeds=(0,).
  cfg.sweep = ml_collections.ConfigDict(dict(grid='', best_cell_seeds=()))
  return cfg


# ---------------------------------------------------------------------------------------------------------------
# Checks.

_CHOICES = {
    'suite': lambda: __import__('kdjax.suites', fromlist=['SUITES']).SUITES,
    'compute_dtype': lambda: ('float32', 'bfloat16'),
    'nonfinite': lambda: ('stop', 'skip'),
    'data.on_corrupt': lambda: ('error', 'skip'),
    'teacher.checkpoint': lambda: __import__('kdjax.checkpoint', fromlist=['CHECKPOINT_CHOICES']).CHECKPOINT_CHOICES,
    'init.checkpoint': lambda: __import__('kdjax.checkpoint', fromlist=['CHECKPOINT_CHOICES']).CHECKPOINT_CHOICES,
    'data.augment': lambda: __import__('kdjax.data.augment', fromlist=['AUGMENTATIONS']).AUGMENTATIONS,
}


def config_args(arg: str | None, *known: str, exclusive: Iterable[Iterable[str]] = ()) -> list[str]:
  """The comma-separated arguments of `--config file.py:arg`, each required to match one of the `known` patterns
  (regexes, matched whole), at most one of each `exclusive` group of patterns: a mistyped argument (`:dkdd`) or
  two that contradict each other (`:kd,dkd`) must stop the command, not run some recipe."""
  args = [a.strip() for a in (arg or '').split(',') if a.strip()]
  unknown = [a for a in args if not any(re.fullmatch(pattern, a) for pattern in known)]
  if unknown:
    choices = ', '.join(known) if known else 'none: use the file without `:arg`'
    raise UserError(f'config argument(s) {", ".join(map(repr, unknown))} not understood; this config file takes '
                    f'{choices} (comma-separated)')
  for group in exclusive:
    clashing = [a for a in args if any(re.fullmatch(pattern, a) for pattern in group)]
    if len(clashing) > 1:
      raise UserError(f'config arguments {", ".join(map(repr, clashing))} exclude each other; pick one')
  return args


def default_workdir(config_file: str, arg: str | None = '') -> str:
  """Where `--config config_file[:arg]` runs without --workdir: workdirs/<config name>, then its comma-separated
  arguments in sorted order, joined by `_` (`cifar10_teacher.py:resnet20_cpu` -> workdirs/cifar10_teacher_resnet20_cpu;
  `:kd,cifar10` and `:cifar10,kd` -> ..._cifar10_kd). Each variant of a config is its own experiment, so a smoke
  run never lands where the full run, or a student looking for its teacher, expects the real one; configs name
  their teachers' workdirs with this function too."""
  name = os.path.splitext(os.path.basename(config_file))[0]
  args = sorted(re.sub(r'[^A-Za-z0-9._-]+', '-', part.strip()) for part in (arg or '').split(',') if part.strip())
  return os.path.join('workdirs', '_'.join([name, *args]))


def single_run(cfg: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """One run of a suite: a copy with `suite='single'`, the suite-only keys (`repeats`, `sweep`) at their defaults,
  and `overrides` set. Resetting those keys keeps a run's recorded config independent of the suite around it, so
  adding seeds or cells to a finished suite reuses its runs instead of refusing their workdirs."""
  child = copy.deepcopy(cfg)
  defaults = base_config()
  with child.unlocked():
    child.suite = 'single'
    child.repeats = defaults.repeats
    child.sweep = defaults.sweep
    for key, value in overrides.items():
      child[key] = value
  return child


def flat_keys(cfg: Any, prefix: str = '') -> list[str]:
  """All dotted keys of a (nested) ConfigDict."""
  keys = []
  for key, value in cfg.items():
    path = f'{prefix}{key}'
    keys.append(path)
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(flat_keys(value, path + '.'))
  return keys


def closest_key_hint(key: str, valid: Iterable[str]) -> str:
  """' (did you mean `x`?)' for the valid key closest to `key`, or ''."""
  match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
  return f' (did you mean `{match[0]}`?)' if match else ''


def unknown_key_error(key: str, cfg: ml_collections.ConfigDict) -> UserError:
  """The error for a dotted key that is not in `cfg`, suggesting a sibling first, then any key."""
  parent = key.rpartition('.')[0]
  valid = flat_keys(cfg)
  siblings = [k for k in valid if k.rpartition('.')[0] == parent]
  hint = closest_key_hint(key, siblings) or closest_key_hint(key, valid)
  return UserError(f'config key `{key}` does not exist{hint}; see kdjax/config.py for the schema')


def _check_known_keys(cfg, schema, prefix=''):
  """Every key of `cfg` must exist in `schema` (free-form sections excepted)."""
  for key, value in cfg.items():
    path = f'{prefix}{key}'
    if key not in schema:
      raise UserError(f'config key `{path}` does not exist'
                      f'{closest_key_hint(path, [prefix + k for k in schema.keys()])}; '
                      'see kdjax/config.py for the schema')
    if isinstance(value, ml_collections.ConfigDict) and isinstance(schema[key], ml_collections.ConfigDict):
      if path in ('phases', 'student'):
        continue  # checked by _check_phases / the model's constructor
      _check_known_keys(value, schema[key], path + '.')
    elif type(schema[key]) is float and isinstance(value, int) and not isinstance(value, bool):
      continue
    elif schema[key] is not None and not isinstance(value, type(schema[key])):
      raise UserError(f'config `{path}` must be of type {type(schema[key]).__name__}, got {value!r}')


def _check_phases(cfg):
  from kdjax import objective  # late: objective imports losses and jax
  template = phase(1, {})
  if not cfg.schedule:
    raise UserError('config `schedule` is empty; list the phases to run, e.g. `schedule=("train",)`')
  for name in cfg.schedule:
    if name not in cfg.phases:
      raise UserError(f'config `schedule` names phase `{name}` which is not in `phases` '
                      f'({", ".join(cfg.phases.keys())}); add it or fix the name')
  # A phase left out of `schedule` is not run (still checked): `--config.schedule='("stage0","classifier")'` runs part
  # of a config's schedule from the command line, where a phase cannot be deleted.
  for name, ph in cfg.phases.items():
    if not isinstance(ph, ml_collections.ConfigDict):
      raise UserError(f'config `phases.{name}` is {ph!r}, not a phase; build it with kdjax.config.phase(...)')
    _check_known_keys({k: v for k, v in ph.items() if k != 'losses'}, template, f'phases.{name}.')
    _check_regex(f'phases.{name}.trainable', ph.trainable)
    if not ph.losses:
      raise UserError(f'phase `{name}` has no losses; add one, e.g. `losses={{"ce": loss_term("ce")}}`')
    for term_name, term in ph.losses.items():
      if term_name in RESERVED_TERM_NAMES:  # each term's value is logged under its name, beside these metrics
        raise UserError(f'config `phases.{name}.losses.{term_name}`: {term_name!r} names a logged metric '
                        f'({", ".join(RESERVED_TERM_NAMES)}); call the term something else, e.g. {term_name}_term')
      objective.check_term(term, f'phases.{name}.losses.{term_name}')
    for key, fn in (('name', lambda: __import__('kdjax.optim', fromlist=['OPTIMIZERS']).OPTIMIZERS),
                    ('schedule', lambda: __import__('kdjax.optim', fromlist=['SCHEDULES']).SCHEDULES)):
      choices = fn()
      if ph.optimizer[key] not in choices:
        raise UserError(f'config `phases.{name}.optimizer.{key}` is {ph.optimizer[key]!r}; '
                        f'choose one of: {", ".join(sorted(choices))}')
    opt = ph.optimizer
    outside = [b for b in opt.boundaries_epochs if not opt.warmup_epochs <= b <= ph.epochs]
    if opt.schedule == 'piecewise' and outside:
      raise UserError(f'config `phases.{name}.optimizer.boundaries_epochs` {tuple(opt.boundaries_epochs)}: {outside} '
                      f'lie outside the phase after its warm-up ({opt.warmup_epochs:g} to {ph.epochs:g} epochs); '
                      'give decay epochs of the phase, after the warm-up')
    _check_cycle_momentum(opt, f'phases.{name}.optimizer')


def _check_cycle_momentum(opt, where: str) -> None:
  cycle = tuple(opt.cycle_momentum)
  if not cycle:
    return
  if len(cycle) != 2 or not 0 <= cycle[0] <= cycle[1] < 1:
    raise UserError(f'config `{where}.cycle_momentum` is {cycle}; give (base, max) with 0 <= base <= max < 1, e.g. '
                    "'(0.85,0.95)' (torch OneCycleLR's), or () for a fixed momentum")
  if (opt.name, opt.schedule) != ('sgd', 'onecycle'):
    raise UserError(f'config `{where}.cycle_momentum` cycles the momentum of sgd with the onecycle schedule, this '
                    f'phase runs {opt.name} with {opt.schedule}; set schedule=onecycle and name=sgd, or '
                    'cycle_momentum=()')


def _at_least(low, strict=False):
  return lambda v: (v > low) if strict else (v >= low)


# The train step's own metrics (kdjax.steps.metric_names), which a loss term's name would collide with.
RESERVED_TERM_NAMES = ('loss', 'top1', 'top5', 'agreement')

# Numeric ranges, by dotted key; `phases.*.` keys apply to every phase.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    'batch_size': (_at_least(1), '>= 1'),
    'eval_batch_size': (_at_least(1), '>= 1'),
    'eval_every_epochs': (_at_least(0, strict=True), '> 0'),
    'target_top1': (lambda v: 0 <= v <= 1, 'in [0, 1] (0 = none)'),
    'log_every_steps': (_at_least(1), '>= 1'),
    'checkpoint_every_steps': (_at_least(0), '>= 0'),
    'keep_checkpoints': (_at_least(1), '>= 1'),
    'data.image_size': (_at_least(0), '>= 0 (0 keeps the stored size)'),
    'teacher.epochs': (_at_least(0, strict=True), '> 0'),
    'phases.*.epochs': (_at_least(0, strict=True), '> 0'),
    'phases.*.optimizer.learning_rate': (_at_least(0), '>= 0'),
    'phases.*.optimizer.momentum': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'phases.*.optimizer.weight_decay': (_at_least(0), '>= 0'),
    'phases.*.optimizer.warmup_epochs': (_at_least(0), '>= 0'),
    'phases.*.optimizer.decay_factor': (_at_least(0, strict=True), '> 0'),
    'phases.*.optimizer.pct_start': (lambda v: 0 < v < 1, 'in (0, 1)'),
    'phases.*.optimizer.grad_clip_norm': (_at_least(0), '>= 0'),
}


def _check_ranges(cfg) -> None:
  for pattern, (ok, expected) in RANGES.items():
    for key in flat_keys(cfg):
      parts, wanted = key.split('.'), pattern.split('.')
      if len(parts) != len(wanted) or any(w not in ('*', p) for w, p in zip(wanted, parts)):
        continue
      value = cfg
      for part in parts:
        value = value[part]
      if not ok(value):
        raise UserError(f'config `{key}` must be {expected}, got {value!r}')


def differing_keys(current: dict, recorded: dict) -> list[str]:
  """The dotted keys where two configs (as JSON dicts) differ. A key the recorded config lacks counts as equal when
  the current value is its default (a loss term's argument: its kind's default): runs recorded before kdjax added a
  key stay resumable and reusable."""
  defaults, template = _flat_json(json.loads(base_config().to_json_best_effort())), _flat_json(
      json.loads(phase(1, {}).to_json_best_effort()))
  now, before = _flat_json(current), _flat_json(recorded)

  def default(key):
    parts = key.split('.')
    if parts[0] != 'phases':
      return defaults.get(key)
    if len(parts) == 5 and parts[2] == 'losses':  # a loss term's argument: its kind's default
      from kdjax import objective  # late: objective imports jax
      term = objective.TERMS.get(json.loads(now.get('.'.join(parts[:4]) + '.kind', 'null')))
      return json.dumps(term.defaults[parts[4]], sort_keys=True) if term and parts[4] in term.defaults else None
    return template.get('.'.join(parts[2:]))

  return sorted(key for key in now.keys() | before.keys() if now.get(key) != before.get(key)
                and not (key not in before and now[key] == default(key)))


def _flat_json(tree, prefix='') -> dict[str, str]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flat_json(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = json.dumps(value, sort_keys=True)
  return out


def teacher_workdirs(cfg) -> list[str]:
  """The teacher runs `teacher.workdir` names: one, or several separated by commas (an ensemble teacher)."""
  return [workdir.strip() for workdir in cfg.teacher.workdir.split(',') if workdir.strip()]


def uses_teacher(cfg) -> bool:
  """Whether a phase the schedule runs has a loss that needs the teacher."""
  from kdjax import objective
  return any(objective.TERMS[t.kind].needs_teacher for name in cfg.schedule for t in cfg.phases[name].losses.values())


def _check_no_shared_nodes(cfg, prefix='', seen=None) -> None:
  """No sub-config sits at two places: an override through one path would silently change the other too."""
  seen = {} if seen is None else seen
  for key, value in cfg.items():
    if isinstance(value, ml_collections.ConfigDict):
      path = f'{prefix}{key}'
      if id(value) in seen:
        raise UserError(f'config `{seen[id(value)]}` and `{path}` are one shared object, so overriding one would '
                        'change both; give each its own (call optimizer(...) / loss_term(...) once per place, or '
                        'copy.deepcopy it)')
      seen[id(value)] = path
      _check_no_shared_nodes(value, path + '.', seen)


def _check_seeds(cfg) -> None:
  for key, seeds, at_least_one in (('repeats.seeds', tuple(cfg.repeats.seeds), True),
                                   ('sweep.best_cell_seeds', tuple(cfg.sweep.best_cell_seeds), False)):
    if len(set(seeds)) != len(seeds) or (at_least_one and not seeds):
      raise UserError(f'config `{key}` is {seeds}; give distinct seeds' +
                      (', at least one, e.g. (0, 1, 2)' if at_least_one else ''))


def _check_sweep_cells(cfg, num_devices: int) -> None:
  """Every cell of the grid as the run it will be: a bad value in the last cell must not cost the cells before."""
  from kdjax import sweep
  for assignment in sweep.grid_assignments(cfg):
    try:
      validate(sweep.cell_config(cfg, assignment, cfg.repeats.seeds[0]), num_devices)
    except (UserError, TypeError, ValueError) as error:
      raise UserError(f'sweep cell {sweep.cell_name(assignment)}: {error}') from None


def _check_regex(key: str, pattern: str) -> None:
  try:
    re.compile(pattern)
  except re.error as error:
    raise UserError(f'config `{key}` {pattern!r} is not a regular expression ({error}); write one over parameter '
                    "paths, e.g. '^stages/(0|1)/' or '^head/'") from None


def validate(cfg: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raise a UserError naming the fix for the first problem in `cfg`."""
  _check_known_keys(cfg, base_config())
  plugins_lib.load(cfg.plugins)  # before their model names and loss kinds are checked
  _check_regex('init.keep_fresh', cfg.init.keep_fresh)
  _check_no_shared_nodes(cfg)
  for key, choices_fn in _CHOICES.items():
    value = cfg
    for part in key.split('.'):
      value = value[part]
    choices = choices_fn()
    if value not in choices:
      raise UserError(f'config `{key}` is {value!r}; choose one of: {", ".join(sorted(choices))}')
  _check_ranges(cfg)
  for key in ('batch_size', 'eval_batch_size'):
    if cfg[key] % num_devices:
      raise UserError(f'config `{key}`={cfg[key]} must be a positive multiple of the device count '
                      f'({num_devices}); set --config.{key}={max(num_devices, cfg[key] // num_devices * num_devices)}')
  _check_phases(cfg)
  from kdjax.data import splits  # late, like objective: keep `import kdjax.config` light
  from kdjax.models import registry
  student_args = {k: v for k, v in cfg.student.items() if k != 'name'}
  try:
    registry.check_model(cfg.student.name, student_args)
  except UserError as error:
    if cfg.student.name not in registry.MODELS:
      raise
    # Typically `--config.student.name=other` on a config that sets arguments of its own model.
    raise UserError(f'{error}. A --config override cannot remove a `student.*` key the config file sets: choose '
                    'this model in a config file of your own, whose get_config() can call this one and replace '
                    '`cfg.student`') from None
  for key in ('train_split', 'eval_split', 'heldout_split'):
    if cfg.data[key]:
      splits.parse_split(cfg.data[key])
  _check_seeds(cfg)
  if cfg.suite == 'sweep':
    _check_sweep_cells(cfg, num_devices)
  if cfg.suite in ('single', 'repeats', 'sweep') and uses_teacher(cfg) and not teacher_workdirs(cfg):
    raise UserError('the losses need a teacher but `teacher.workdir` is empty; '
                    'set --config.teacher.workdir=DIR of a finished teacher run')
  if cfg.teacher.cache and uses_teacher(cfg):
    from kdjax import objective, teacher_cache
    teacher_cache.check_cacheable(cfg.data.augment, [
        f'phases.{name}.losses.{term}' for name in cfg.schedule for term, t in cfg.phases[name].losses.items()
        if objective.TERMS[t.kind].uses_features])


def stagewise(num_stages: int, stage_epochs: float, classifier_epochs: float, stage_optimizer, classifier_optimizer,
              *, freeze_earlier: bool = True, finetune_backbone: bool = False, feature_loss: str = 'feature_mse'):
  """(schedule, phases) of stage-wise distillation: phase k matches teacher map k, then a classifier phase.

  Phase k trains student stage k alone (`freeze_earlier`) or stages 0..k, with `feature_loss` between student and
  teacher feature map k (an adapter is learned where channel counts differ). The last phase trains the head on
  labels with the backbone frozen, or everything when `finetune_backbone`.
  """
  phases, schedule = {}, []
  for k in range(num_stages):
    stages = str(k) if freeze_earlier else '|'.join(str(i) for i in range(k + 1))
    phases[f'stage{k}'] = phase(stage_epochs, {'feature': loss_term(feature_loss, student_stage=k, teacher_stage=k)},
                                stage_optimizer, trainable=f'^stages/({stages})/')
    schedule.append(f'stage{k}')
  phases['classifier'] = phase(classifier_epochs, {'ce': loss_term('ce')}, classifier_optimizer,
                               trainable='.*' if finetune_backbone else '^head/')
  schedule.append('classifier')
  return tuple(schedule), ml_collections.ConfigDict(phases)


def joint(num_maps: int, epochs: float, opt, *, map_weights=None, ce_weight: float = 1.0):
  """(schedule, phases) of joint mode: CE plus the first `num_maps` feature maps' losses in one phase."""
  if num_maps < 1:
    raise UserError(f'joint mode needs at least one feature map, got {num_maps}')
  weights = map_weights or (1.0,) * num_maps
  if len(weights) != num_maps:
    raise UserError(f'joint mode with {num_maps} maps got {len(weights)} map weights {tuple(weights)}; give one per map')
  losses = {'ce': loss_term('ce', weight=ce_weight)}
  for k in range(num_maps):
    losses[f'feature{k}'] = loss_term('feature_mse', weight=weights[k], student_stage=k, teacher_stage=k)
  return ('joint',), ml_collections.ConfigDict({'joint': phase(epochs, losses, opt)})
