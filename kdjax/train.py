"""One training run: data on the devices, frozen teacher, student trained phase after phase, checkpoints, metrics.

`train_and_evaluate(cfg, workdir)` is idempotent: run it again with the same config and workdir and it resumes from
the latest checkpoint (inside the right phase, with the same batches) or, when the run is finished, just reports.
"""
import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from kdjax import checkpoint as ckpt_lib
from kdjax import config as config_lib
from kdjax import export
from kdjax import mesh as mesh_lib
from kdjax import metrics as metrics_lib
from kdjax import objective as objective_lib
from kdjax import optim
from kdjax import report
from kdjax import rng as rng_lib
from kdjax import run_data
from kdjax import state as state_lib
from kdjax import steps
from kdjax import teacher_cache
from kdjax import teachers
from kdjax import writers
from kdjax.data import augment
from kdjax.errors import NonFiniteError, UserError
from kdjax.models import create_model

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Keys that may change between invocations on one workdir without making it a different experiment.
RESUMABLE_CHANGES = ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'eval_batch_size',
                     'data.cache_dir', 'data.data_dir', 'nonfinite', 'teacher.cache', 'target_top1')


@dataclasses.dataclass(frozen=True)
class PhasePlan:
  """Where each phase starts and ends in global steps (phase budgets are in epochs of the training split)."""
  names: tuple[str, ...]
  starts: tuple[int, ...]
  ends: tuple[int, ...]
  steps_per_epoch: int

  @classmethod
  def from_config(cls, cfg, num_train: int):
    steps_per_epoch = num_train // cfg.batch_size
    if steps_per_epoch == 0:
      raise UserError(f'the training split has {num_train} examples, fewer than batch_size={cfg.batch_size}; '
                      'lower --config.batch_size')
    lengths = [max(1, int(round(cfg.phases[n].epochs * steps_per_epoch))) for n in cfg.schedule]
    ends = tuple(int(e) for e in np.cumsum(lengths))
    return cls(tuple(cfg.schedule), (0,) + ends[:-1], ends, steps_per_epoch)

  def phase_of(self, step: int) -> int:
    return next((k for k, end in enumerate(self.ends) if step < end), len(self.ends) - 1)


def _check_workdir(cfg, workdir: str) -> None:
  """Refuse a workdir that holds a different experiment's checkpoints; record this config otherwise.

  A config recorded by a start that failed before its first checkpoint (a missing dataset, a wrong teacher) is
  replaced: the corrected command is the same experiment, not a different one."""
  path = os.path.join(workdir, 'config.json')
  current = json.loads(cfg.to_json_best_effort())
  previous = export.read_json(path)
  if previous and _holds_training(workdir):
    differing = [key for key in config_lib.differing_keys(current, previous)
                 if not any(key == c or key.startswith(c + '.') for c in RESUMABLE_CHANGES)]
    if differing:
      raise UserError(f'workdir {workdir} holds a different experiment (config differs in: '
                      f'{", ".join(sorted(differing)[:5])}); use another --workdir or delete that one')
  if jax.process_index() == 0:
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as error:
      raise UserError(f'cannot create workdir {workdir} ({error.strerror}); pass another --workdir') from None
    report.write_json(path, current, indent=2, sort_keys=True)  # atomic: another process may read it right now


def _holds_training(workdir: str) -> bool:
  """Whether a run in `workdir` got as far as a checkpoint or a summary."""
  if os.path.exists(os.path.join(workdir, 'summary.json')):
    return True
  return any(name.isdigit() for sub in ('checkpoints', 'best') if os.path.isdir(os.path.join(workdir, sub))
             for name in os.listdir(os.path.join(workdir, sub)))


def load_teacher(cfg, data: run_data.RunData, dtype, mesh):
  """(frozen teacher, its replicated variables, its stage channels), or (None, None, ()) when no loss needs one.

  `teacher.workdir` may list several runs; the teacher is then their ensemble (see `kdjax.teachers`).
  """
  if not config_lib.uses_teacher(cfg):
    return None, None, ()
  model = teachers.restore_teacher(cfg, num_classes=data.num_classes, image_shape=data.image_shape, dtype=dtype,
                                   mean=data.mean, std=data.std)
  graphdef, variables = nnx.split(model)
  return steps.Teacher(graphdef), mesh_lib.replicate(variables, mesh), tuple(model.stage_channels)


@dataclasses.dataclass
class Run:
  """What a run builds once: data on the devices, the frozen teacher, the student's pytrees, the phase plan."""
  cfg: Any
  workdir: str
  data: run_data.RunData
  teacher: steps.Teacher | None
  teacher_vars: Any
  train_teacher: Any        # what the train step asks for teacher outputs: `teacher`, or a CachedTeacher
  train_teacher_arg: Any    # its step argument: `teacher_vars`, or the cached table
  student_def: Any
  params: nnx.State
  model_state: nnx.State
  adapter_def: Any
  adapter_params: nnx.State
  preprocess: steps.Preprocess
  plan: PhasePlan
  phases: list
  adapter_patterns: list[str]  # per phase: the adapters its terms use, the only ones its optimizer trains
  train_modes: list            # per phase: None, or per stage and then the head whether it runs in train mode
  replicated: Any

  def __post_init__(self):
    self.eval_program = steps.jit_eval_program(self.student_def, self.teacher, self.preprocess,
                                               self.cfg.eval_batch_size, self.data.train.mesh)

  def phase_state(self, k: int, base_state=None):
    """(optimizer, state) for phase k: `base_state` (or a fresh state) with phase k's new optimizer state."""
    tx = optim.make_optimizer(self.phases[k].optimizer, self.plan.ends[k] - self.plan.starts[k],
                              self.plan.steps_per_epoch)
    source = base_state if base_state is not None else self
    trainable, _ = state_lib.split_trainable(source.params, self.phases[k].trainable)
    adapters, _ = state_lib.split_trainable(source.adapter_params, self.adapter_patterns[k])
    opt_state = tx.init((trainable, adapters))
    num_terms = len(self.phases[k].losses)
    loss_args = objective_lib.loss_arguments(self.phases[k].losses)
    if base_state is None:
      state = state_lib.init_state(self.params, self.model_state, self.adapter_params, opt_state, self.cfg.seed,
                                   num_terms, objective_lib.init_memory(self.phases, self.data.train.num_examples,
                                                                        rng_lib.stream(self.cfg.seed, 'memory')),
                                   loss_args)
    else:
      state = base_state.replace(opt_state=opt_state, loss_args=loss_args,
                                 first_nonfinite_terms=jnp.zeros((num_terms,), bool))
    return tx, mesh_lib.replicate(state, self.data.train.mesh)

  def evaluate(self, state, dataset) -> dict[str, float]:
    total = steps.evaluate(self.eval_program, state.params, state.model_state, self.teacher_vars, dataset)
    return {k: float(v) for k, v in jax.device_get(total.compute()).items()}


def _normalized_as_init(cfg, data: run_data.RunData) -> run_data.RunData:
  """A run that starts from another run's weights (`init.workdir`) normalises its inputs as that run did: the
  weights were trained on inputs of that scale (ImageNet's mean and std for an imported torchvision model), which
  is what fine-tuning recipes do. Without `data.normalize`, or a record of the same channel count, nothing changes."""
  recorded = export.recorded_normalization(cfg.init.workdir) if cfg.init.workdir and cfg.data.normalize else None
  if recorded is None or len(recorded[0]) != len(data.mean):
    return data
  logging.info('normalising inputs as %s did: mean %s, std %s', cfg.init.workdir, *recorded)
  return dataclasses.replace(data, mean=recorded[0], std=recorded[1])


def _train_modes(student, trained_params, ph) -> tuple[bool, ...] | None:
  """With `frozen_eval`: per stage and then the head, whether phase `ph` trains any of its parameters (the others run
  in inference mode); None when everything trains, the phase does not ask, or the model has no stages (ensembles).
  `trained_params`: the student parameters the phase trains."""
  if not ph.get('frozen_eval', False) or not hasattr(student, 'stages'):
    return None
  trained = [state_lib.path_string(path) for path, _ in nnx.to_flat_state(trained_params)]
  modes = tuple(any(p.startswith(f'stages/{i}/') for p in trained) for i in range(len(student.stages)))
  modes += (any(p.startswith('head/') for p in trained),)
  return None if all(modes) else modes


def build_run(cfg, workdir: str) -> Run:
  """Validate, load the data and the teacher, create (or initialise from `init.workdir`) the student."""
  mesh = mesh_lib.make_data_mesh()
  logging.info('data-parallel over %d %s device(s) in %d process(es)', jax.device_count(),
               jax.devices()[0].platform, jax.process_count())
  config_lib.validate(cfg, jax.device_count())
  _check_workdir(cfg, workdir)
  data = _normalized_as_init(cfg, run_data.load(cfg.data, mesh))
  if jax.process_index() == 0:
    report.write_json(os.path.join(workdir, export.DATA_FILE), dict(
        class_names=list(data.class_names), image_shape=list(data.image_shape), mean=list(data.mean),
        std=list(data.std)), indent=2)
  dtype = DTYPES[cfg.compute_dtype]
  teacher, teacher_vars, teacher_channels = load_teacher(cfg, data, dtype, mesh)
  student = create_model(cfg.student.name, num_classes=data.num_classes, image_shape=data.image_shape,
                         rngs=rng_lib.model_rngs(cfg.seed), dtype=dtype,
                         **{k: v for k, v in cfg.student.items() if k != 'name'})
  if cfg.init.workdir:  # fine-tuning: start from another run's (or an imported model's) weights
    graphdef, variables = nnx.split(student)
    student = nnx.merge(graphdef, ckpt_lib.restore_model_variables(
        cfg.init.workdir, variables, keep_fresh=cfg.init.keep_fresh, role='init', which=cfg.init.checkpoint))
  phases = [cfg.phases[name] for name in cfg.schedule]
  adapters = objective_lib.Adapters(
      objective_lib.adapter_shapes(phases, student.stage_channels, teacher_channels) if teacher else {},
      rngs=nnx.Rngs(rng_lib.stream(cfg.seed, 'adapters')), dtype=dtype)
  student_def, params, model_state = nnx.split(student, nnx.Param, ...)
  adapter_def, adapter_params = nnx.split(adapters, nnx.Param)
  adapter_patterns = [objective_lib.phase_adapter_pattern(ph, student.stage_channels, teacher_channels)
                      if teacher else objective_lib.NO_ADAPTERS for ph in phases]
  trained = [state_lib.split_trainable(params, ph.trainable)[0] for ph in phases]
  for name, ph, phase_trained, pattern in zip(cfg.schedule, phases, trained, adapter_patterns):
    if not (jax.tree.leaves(phase_trained) or jax.tree.leaves(state_lib.split_trainable(adapter_params, pattern)[0])):
      raise UserError(f'phase `{name}` would train nothing: `phases.{name}.trainable` {ph.trainable!r} matches no '
                      f'parameter of {cfg.student.name} (paths such as '
                      f'{", ".join(state_lib.path_string(p) for p, _ in list(nnx.to_flat_state(params))[:2])})')
  size = data.image_shape[0]
  preprocess = steps.Preprocess(
      augment=lambda rng, x: augment.AUGMENTATIONS[cfg.data.augment](rng, x, image_size=size),
      evaluate=lambda x: augment.eval_transform(x, image_size=size), mean=data.mean, std=data.std, dtype=dtype,
      image_size=size)
  train_teacher, train_teacher_arg = teacher, teacher_vars
  if teacher is not None and cfg.teacher.cache:  # validate() checked the augmentation and the loss terms
    train_teacher, train_teacher_arg = teacher_cache.load_or_build(
        teacher, teacher_vars, data.train, cfg.data.augment, preprocess, cfg.batch_size, cfg.data.cache_dir or None)
  return Run(cfg=cfg, workdir=workdir, data=data, teacher=teacher, teacher_vars=teacher_vars,
             train_teacher=train_teacher, train_teacher_arg=train_teacher_arg,
             student_def=student_def, params=params, model_state=model_state, adapter_def=adapter_def,
             adapter_params=adapter_params, preprocess=preprocess,
             plan=PhasePlan.from_config(cfg, data.train.num_examples), phases=phases,
             adapter_patterns=adapter_patterns,
             train_modes=[_train_modes(student, phase_trained, ph) for phase_trained, ph in zip(trained, phases)],
             replicated=mesh_lib.replicated(mesh))


@dataclasses.dataclass
class Bookkeeping:
  """What the loop keeps across phases besides the state: outputs, best accuracy, timings.

  The timings add up over the invocations of a resumed run: each checkpoint records them as they stood at its step
  (`clock`), and a resumed run starts from those (the work after the last checkpoint is redone, so not counted).
  """
  checkpoints: ckpt_lib.Checkpoints
  writer: Any
  history: report.History
  progress: Any
  best_top1: float
  last_eval: dict | None = None
  compile_s: float = 0.0
  train_s: float = 0.0
  train_images: int = 0
  wall_s: float = 0.0   # of earlier invocations, up to the checkpoint this one resumed from
  started: float = dataclasses.field(default_factory=time.time)
  window: dict | None = None  # the train metrics accumulated up to the checkpoint resumed from (its meta's)

  @classmethod
  def resumed(cls, clock: dict, **kwargs) -> 'Bookkeeping':
    """Picks up the timings a checkpoint recorded (none for a fresh run or an older checkpoint)."""
    return cls(**kwargs, **{name: clock[name] for name in CLOCK if name in clock})

  def resumed_window(self, spec: steps.PhaseStep, step: int, sharding):
    """The metric accumulator where the checkpoint resumed from left it, when the phase starts at its step with the
    same metrics; else None (a fresh phase, or a checkpoint from before kdjax recorded it)."""
    window, self.window = self.window, None
    if not window or window['step'] != step:
      return None
    return metrics_lib.from_json(steps.empty_metrics(spec, sharding), window, sharding)

  def clock(self, now: float, steady_s: float, images: int) -> dict:
    """The timings at `now`, with `steady_s` seconds and `images` images of the current phase not yet added."""
    return dict(compile_s=self.compile_s, train_s=self.train_s + steady_s, train_images=self.train_images + images,
                wall_s=self.wall_s + now - self.started)


CLOCK = ('compile_s', 'train_s', 'train_images', 'wall_s')  # the timings checkpoints record


def restore_or_init(run: Run, checkpoints: ckpt_lib.Checkpoints):
  """(phase index, optimizer, state, best top-1, timings so far, train metrics since the last log step) from the
  newest good checkpoint, or a fresh start."""
  restored = checkpoints.restore_latest(lambda meta: jax.tree.map(_abstract, run.phase_state(meta['phase'])[1]))
  if restored is None:
    tx, state = run.phase_state(0)
    return 0, tx, state, -1.0, {}, None
  state, meta = restored
  logging.info('resumed from step %d (phase %s)', int(state.step), run.plan.names[meta['phase']])
  return (meta['phase'], run.phase_state(meta['phase'])[0], mesh_lib.replicate(state, run.data.train.mesh),
          meta['best_top1'], meta.get('clock', {}), meta.get('train_window'))


def train_phase(run: Run, k: int, tx, state, book: Bookkeeping):
  """Run phase k from the state's step to the phase's end: steps, logs, evaluations, checkpoints."""
  cfg, plan = run.cfg, run.plan
  objective, term_names = objective_lib.build_objective(run.phases[k].losses)
  spec = steps.PhaseStep(student_def=run.student_def, adapter_def=run.adapter_def, teacher=run.train_teacher,
                         objective=objective, term_names=term_names, tx=tx, trainable=run.phases[k].trainable,
                         frozen_bn=run.phases[k].frozen_bn, preprocess=run.preprocess,
                         first_step=plan.starts[k], steps_per_epoch=plan.steps_per_epoch,
                         trainable_adapters=run.adapter_patterns[k], train_modes=run.train_modes[k])
  batch_sharding = mesh_lib.batch_sharded(run.data.train.mesh)
  train_fn = steps.jit_train_program(spec, cfg.batch_size, batch_sharding, run.replicated)
  split = (run.data.train.images, run.data.train.labels)
  eval_every = max(1, int(round(cfg.eval_every_epochs * plan.steps_per_epoch)))
  step = first_step = int(jax.device_get(state.step))
  acc = book.resumed_window(spec, step, run.replicated)
  if acc is None:
    acc = steps.empty_metrics(spec, run.replicated)
  order, order_epoch, paused_s = None, None, 0.0
  logging.info('phase %s: steps %d..%d', plan.names[k], step, plan.ends[k])
  while step < plan.ends[k]:
    epoch = step // plan.steps_per_epoch  # the program takes its batch's place in the epoch from state.step
    if order_epoch != epoch:
      order, order_epoch = run.data.train.epoch_order(cfg.seed, epoch), epoch
    t0 = time.time()
    state, acc = train_fn(state, run.train_teacher_arg, split, order, acc)
    if step == first_step:  # the first step compiles: time it apart from the steady state
      jax.block_until_ready(state.step)
      book.compile_s += time.time() - t0
      t_steady = time.time()
    step += 1
    book.progress(step)
    at_log = step % cfg.log_every_steps == 0
    at_eval = (step - plan.starts[k]) % eval_every == 0 or step == plan.ends[k]
    at_checkpoint = bool(cfg.checkpoint_every_steps) and step % cfg.checkpoint_every_steps == 0
    if at_log or at_eval or at_checkpoint:  # never save a checkpoint past a refused non-finite update
      _check_finite(cfg, state, term_names, book.checkpoints)
    if at_log or at_eval:
      _write(book, step, 'train', jax.device_get(acc.compute()))
      if at_log:
        acc = metrics_lib.empty_like(acc, run.replicated)
    if at_eval or at_checkpoint:  # evaluating and saving are not training time: keep them off the img/s clock
      jax.block_until_ready(state.step)
      t_pause = time.time()
      clock = book.clock(t_pause, t_pause - t_steady - paused_s, (step - first_step - 1) * cfg.batch_size)
      if at_eval:  # the training clock (compile, evaluation and checkpoints excluded) for time-to-accuracy
        _write(book, step, 'time', {'train_s': clock['train_s']})
      _evaluate_and_save(run, k, step, state, book, at_eval, clock, acc)
      paused_s += time.time() - t_pause
  jax.block_until_ready(state.step)
  if step > first_step + 1:
    book.train_s += time.time() - t_steady - paused_s
    book.train_images += (step - first_step - 1) * cfg.batch_size
  return state


def _write(book: Bookkeeping, step: int, prefix: str, values) -> None:
  scalars = {f'{prefix}/{name}': float(v) for name, v in values.items()}
  book.writer.write_scalars(step, scalars)
  book.history.record(step, scalars)


def _evaluate_and_save(run: Run, k: int, step: int, state, book: Bookkeeping, at_eval: bool, clock: dict,
                       acc) -> None:
  """Evaluate (at eval steps) and checkpoint: every eval and phase end by default, else every N steps + the best.

  history.json is saved first, so the rows logged up to a checkpoint outlive a kill after it. The meta holds the
  train metrics accumulated since the last log step (`acc`), so the first row a resumed run logs averages the same
  steps as an uninterrupted run's."""
  improved = False
  if at_eval:
    book.last_eval = run.evaluate(state, run.data.eval)
    _write(book, step, 'eval', book.last_eval)
    improved = book.last_eval['top1'] > book.best_top1
    book.best_top1 = max(book.best_top1, book.last_eval['top1'])
  book.history.save()
  meta = dict(phase=k, phase_name=run.plan.names[k], epoch=step / run.plan.steps_per_epoch, best_top1=book.best_top1,
              clock=clock, train_window=dict(step=step, **metrics_lib.to_json(acc)))
  every_n = run.cfg.checkpoint_every_steps
  if (every_n == 0 and at_eval) or (every_n and step % every_n == 0) or step == run.plan.ends[k]:
    book.checkpoints.save(state, meta, best=improved)
  elif improved:
    book.checkpoints.save(state, meta, best=True)


def train_and_evaluate(cfg, workdir: str) -> dict:
  """Train (or resume) the run described by `cfg` in `workdir`; return its summary."""
  run = build_run(cfg, workdir)
  checkpoints = ckpt_lib.Checkpoints(workdir, cfg.keep_checkpoints)
  phase_index, tx, state, best_top1, clock, window = restore_or_init(run, checkpoints)
  start_step = int(jax.device_get(state.step))
  writer = writers.create_writer(workdir, upto_step=start_step)
  book = Bookkeeping.resumed(clock, checkpoints=checkpoints, writer=writer,
                             history=report.History(workdir, upto_step=start_step),
                             progress=writers.create_progress(run.plan.ends[-1], writer, cfg.log_every_steps),
                             best_top1=best_top1, window=window)
  for k in range(phase_index, len(run.phases)):
    if run.plan.ends[k] <= start_step:
      continue
    if k != phase_index:
      tx, state = run.phase_state(k, state)
    state = train_phase(run, k, tx, state, book)
  checkpoints.close()
  rerun = start_step > 0 and int(jax.device_get(state.step)) == start_step  # a finished run, run again
  return _finish(run, state, book, book.wall_s + time.time() - book.started, keep_timings=rerun)


# The summary's timings, which a re-run that trains nothing keeps from the summary it replaces.
TIMINGS = ('wall_s', 'compile_s', 'train_images_per_s')


def _finish(run: Run, state, book: Bookkeeping, wall_s: float, keep_timings: bool = False) -> dict:
  """The run's summary (also summary.json), history and curves; the timings cover every invocation of the run
  (with `keep_timings`, those of the summary.json it replaces, which a checkpoint from before kdjax recorded its
  clock cannot restore)."""
  cfg = run.cfg
  last_eval = book.last_eval or run.evaluate(state, run.data.eval)  # a finished run re-run: just report
  steps_done = int(jax.device_get(state.step))
  summary = dict(workdir=run.workdir, student=cfg.student.name, dataset=cfg.data.dataset, steps=steps_done,
                 epochs=round(steps_done / run.plan.steps_per_epoch, 3),
                 eval_top1=last_eval['top1'], eval_top5=last_eval['top5'], eval_loss=last_eval['loss'],
                 best_eval_top1=max(book.best_top1, last_eval['top1']),
                 nonfinite_updates=int(jax.device_get(state.nonfinite_updates)),
                 wall_s=round(wall_s, 2), compile_s=round(book.compile_s, 2),
                 train_images_per_s=round(book.train_images / book.train_s, 1) if book.train_s else None)
  if keep_timings:
    previous = export.read_json(os.path.join(run.workdir, 'summary.json'))
    summary.update({key: previous[key] for key in TIMINGS if key in previous})
  if 'agreement' in last_eval:
    summary['eval_agreement'] = last_eval['agreement']
  if cfg.target_top1:
    reached = book.history.first_reaching('eval/top1', cfg.target_top1)
    summary.update(target_top1=cfg.target_top1, train_s_to_target=reached and reached.get('time/train_s'),
                   epochs_to_target=reached and round(reached['step'] / run.plan.steps_per_epoch, 3))
  if run.data.heldout is not None:
    summary['heldout_top1'] = run.evaluate(state, run.data.heldout)['top1']
  book.writer.close()  # flushes; a sweep's runs would otherwise each keep a writer thread and an open file
  book.history.save()
  if jax.process_index() == 0:
    book.history.plot()
    report.write_json(os.path.join(run.workdir, 'summary.json'), summary, indent=2)
  return summary


def _abstract(x):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _check_finite(cfg, state, term_names, checkpoints) -> None:
  """Stop (config nonfinite='stop') once an update was refused for a NaN/Inf loss or gradient."""
  if cfg.nonfinite != 'stop':
    return
  bad_step = int(jax.device_get(state.first_nonfinite_step))
  if bad_step < 0:
    return
  bad_terms = [n for n, bad in zip(term_names, jax.device_get(state.first_nonfinite_terms)) if bad]
  checkpoints.close()
  last = checkpoints.latest.latest_step()
  kept = f'the last good checkpoint (step {last}) is kept' if last is not None else 'no checkpoint was saved yet'
  raise NonFiniteError(
      f'non-finite loss or gradient at step {bad_step} (terms: {", ".join(bad_terms) or "gradients only"}); '
      f'{kept}; re-run in a new --workdir with a lower learning rate or '
      f'--config.phases.<phase>.optimizer.grad_clip_norm=1.0 (this workdir resumes only its own recipe), or resume '
      f'this one with --config.nonfinite=skip to skip such updates')
