"""One training run: data on the devices, frozen teacher, student trained phase after phase, checkpoints, metrics.

`train_and_evaluate(cfg, workdir)` is idempotent: run it again with the same config and workdir and it resumes from
the latest checkpoint (inside the right phase, with the same batches) or, when the run is finished, just reports.
"""
import dataclasses
import json
import os
import time

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
from kdjax import run_data
from kdjax import state as state_lib
from kdjax import steps
from kdjax import writers
from kdjax.data import augment
from kdjax.errors import UserError
from kdjax.models import create_model

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Keys that may change between invocations on one workdir without making it a different experiment.
RESUMABLE_CHANGES = ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'eval_batch_size',
                     'data.cache_dir', 'data.data_dir', 'nonfinite')


class NonFiniteError(UserError):
  pass


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
  """Refuse a workdir that holds a different experiment's checkpoints; record this config otherwise."""
  path = os.path.join(workdir, 'config.json')
  current = json.loads(cfg.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    now, before = _flat(current), _flat(previous)
    differing = [key for key in now | before if now.get(key) != before.get(key)
                 and not any(key == c or key.startswith(c + '.') for c in RESUMABLE_CHANGES)]
    if differing:
      raise UserError(f'workdir {workdir} holds a different experiment (config differs in: '
                      f'{", ".join(sorted(differing)[:5])}); use another --workdir or delete that one')
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path + '.tmp', 'w') as f:  # atomic: another process may read it right now
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(path + '.tmp', path)


def _flat(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = json.dumps(value, sort_keys=True)
  return out


def teacher_architecture(cfg) -> dict:
  """The teacher model's constructor arguments, as recorded by the run that trained it (none if imported)."""
  path = os.path.join(cfg.teacher.workdir, 'config.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    trained = json.load(f).get('student', {})
  if trained.get('name', cfg.teacher.name) != cfg.teacher.name:
    raise UserError(f'teacher.workdir {cfg.teacher.workdir} trained a {trained["name"]}, but teacher.name is '
                    f'{cfg.teacher.name}; set --config.teacher.name={trained["name"]}')
  return {k: v for k, v in trained.items() if k != 'name'}


def load_teacher(cfg, data: run_data.RunData, dtype, mesh):
  """(frozen teacher, its replicated variables, its stage channels), or (None, None, ()) when no loss needs one."""
  if not config_lib.uses_teacher(cfg):
    return None, None, ()
  if not os.path.isdir(cfg.teacher.workdir):
    raise UserError(f'teacher.workdir {cfg.teacher.workdir!r} does not exist; train a teacher there first or '
                    'point --config.teacher.workdir at a finished teacher run')
  model = create_model(cfg.teacher.name, num_classes=data.num_classes, image_shape=data.image_shape,
                       rngs=nnx.Rngs(0), dtype=dtype, **teacher_architecture(cfg))
  graphdef, variables = nnx.split(model)
  variables = ckpt_lib.restore_model_variables(cfg.teacher.workdir, variables)
  return steps.Teacher(graphdef), mesh_lib.replicate(variables, mesh), tuple(model.stage_channels)


def evaluate(eval_fn, state, teacher_vars, dataset, batch_size) -> dict[str, float]:
  total = None
  for batch in dataset.eval_batches(batch_size):
    batch_metrics = eval_fn(state, teacher_vars, batch)
    total = batch_metrics if total is None else metrics_lib.merge(total, batch_metrics)
  return {k: float(v) for k, v in jax.device_get(total.compute()).items()}


def train_and_evaluate(cfg, workdir: str) -> dict:
  """Train (or resume) the run described by `cfg` in `workdir`; return its summary."""
  mesh = mesh_lib.make_data_mesh()
  config_lib.validate(cfg, jax.device_count())
  _check_workdir(cfg, workdir)
  data = run_data.load(cfg.data, mesh)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, export.DATA_FILE), 'w') as f:
      json.dump(dict(class_names=list(data.class_names), image_shape=list(data.image_shape), mean=list(data.mean),
                     std=list(data.std)), f, indent=2)
  dtype = DTYPES[cfg.compute_dtype]
  teacher, teacher_vars, teacher_channels = load_teacher(cfg, data, dtype, mesh)

  student = create_model(cfg.student.name, num_classes=data.num_classes, image_shape=data.image_shape,
                         rngs=nnx.Rngs(params=cfg.seed, dropout=cfg.seed + 1), dtype=dtype,
                         **{k: v for k, v in cfg.student.items() if k != 'name'})
  phases = [cfg.phases[name] for name in cfg.schedule]
  adapters = objective_lib.Adapters(
      objective_lib.adapter_shapes(phases, student.stage_channels, teacher_channels) if teacher else {},
      rngs=nnx.Rngs(cfg.seed + 2), dtype=dtype)
  if cfg.init.workdir:  # fine-tuning: start from another run's (or an imported model's) weights
    graphdef, variables = nnx.split(student)
    student = nnx.merge(graphdef, ckpt_lib.restore_model_variables(
        cfg.init.workdir, variables, keep_fresh=cfg.init.keep_fresh, role='init'))
  student_def, params, model_state = nnx.split(student, nnx.Param, ...)
  adapter_def, adapter_params = nnx.split(adapters, nnx.Param)
  plan = PhasePlan.from_config(cfg, data.train.num_examples)
  preprocess = steps.Preprocess(
      augment=lambda rng, x: augment.AUGMENTATIONS[cfg.data.augment](rng, x, image_size=data.image_shape[0]),
      evaluate=lambda x: augment.eval_transform(x, image_size=data.image_shape[0]),
      mean=data.mean, std=data.std, dtype=dtype)
  eval_fn = steps.jit_eval_step(student_def, teacher, preprocess)
  replicated = mesh_lib.replicated(mesh)

  def phase_state(k, base_state=None):
    """A state for phase k: the given one (or a fresh one) with phase k's optimizer state."""
    tx = optim.make_optimizer(phases[k].optimizer, plan.ends[k] - plan.starts[k], plan.steps_per_epoch)
    src_params = base_state.params if base_state is not None else params
    src_adapters = base_state.adapter_params if base_state is not None else adapter_params
    trainable, _ = state_lib.split_trainable(src_params, phases[k].trainable)
    opt_state = tx.init((trainable, src_adapters))
    num_terms = len(phases[k].losses)
    if base_state is None:
      fresh = state_lib.init_state(params, model_state, adapter_params, opt_state, cfg.seed, num_terms)
    else:
      fresh = base_state.replace(opt_state=opt_state, first_nonfinite_terms=jnp.zeros((num_terms,), bool))
    return tx, jax.device_put(fresh, replicated)

  checkpoints = ckpt_lib.Checkpoints(workdir, cfg.keep_checkpoints)
  writer = writers.create_writer(workdir)
  def abstract_for_meta(meta):
    return jax.tree.map(_abstract, phase_state(meta['phase'])[1])

  restored = checkpoints.restore_latest(abstract_for_meta)
  if restored is None:
    phase_index, (tx, state) = 0, phase_state(0)
    best_top1 = -1.0
  else:
    state, meta = restored
    phase_index = meta['phase']
    tx = phase_state(phase_index)[0]
    state = jax.device_put(state, replicated)
    best_top1 = meta['best_top1']
    logging.info('resumed from step %d (phase %s)', int(state.step), plan.names[phase_index])

  start_step = int(jax.device_get(state.step))
  history = report.History(workdir, upto_step=start_step)
  progress = writers.create_progress(plan.ends[-1], writer, cfg.log_every_steps)
  eval_every = max(1, int(round(cfg.eval_every_epochs * plan.steps_per_epoch)))
  timing = {'train_s': 0.0, 'train_images': 0, 'compile_s': 0.0}
  last_eval = None
  t_start = time.time()

  for k in range(phase_index, len(phases)):
    if plan.ends[k] <= start_step:
      continue
    if k != phase_index:
      tx, state = phase_state(k, state)
      phase_index = k
    ph = phases[k]
    objective, term_names = objective_lib.build_objective(ph.losses)
    spec = steps.PhaseStep(student_def=student_def, adapter_def=adapter_def, teacher=teacher, objective=objective,
                           term_names=term_names, tx=tx, trainable=ph.trainable, frozen_bn=ph.frozen_bn,
                           preprocess=preprocess)
    train_fn = steps.jit_train_step(spec, replicated)
    step = int(jax.device_get(state.step))
    acc, order, order_epoch = None, None, None
    logging.info('phase %s: steps %d..%d', plan.names[k], step, plan.ends[k])
    while step < plan.ends[k]:
      epoch, index = divmod(step, plan.steps_per_epoch)
      if order_epoch != epoch:
        order, order_epoch = data.train.epoch_order(cfg.seed, epoch), epoch
      batch = data.train.train_batch(order, index, cfg.batch_size)
      t0 = time.time()
      state, step_metrics = train_fn(state, teacher_vars, batch)
      if acc is None:  # the first step compiles; time it apart from the steady state
        jax.block_until_ready(state.step)
        timing['compile_s'] += time.time() - t0
        acc, t_steady, steady_from, paused_s = step_metrics, time.time(), step + 1, 0.0
      else:
        acc = metrics_lib.merge(acc, step_metrics)
      step += 1
      progress(step)
      at_log = step % cfg.log_every_steps == 0
      at_eval = (step - plan.starts[k]) % eval_every == 0 or step == plan.ends[k]
      if at_log or at_eval:
        _check_finite(cfg, state, term_names, checkpoints)
        scalars = {f'train/{k2}': float(v) for k2, v in jax.device_get(acc.compute()).items()}
        writer.write_scalars(step, scalars)
        history.record(step, scalars)
        acc = None if at_log else acc
      at_checkpoint = bool(cfg.checkpoint_every_steps) and step % cfg.checkpoint_every_steps == 0
      if at_eval or at_checkpoint:  # evaluation and saving are not training time: keep them off the img/s clock
        jax.block_until_ready(state.step)
        t_pause = time.time()
      if at_eval:
        last_eval = evaluate(eval_fn, state, teacher_vars, data.eval, cfg.eval_batch_size)
        writer.write_scalars(step, {f'eval/{k2}': v for k2, v in last_eval.items()})
        history.record(step, {f'eval/{k2}': v for k2, v in last_eval.items()})
        history.save()
        improved = last_eval['top1'] > best_top1
        best_top1 = max(best_top1, last_eval['top1'])
        meta = dict(phase=k, phase_name=plan.names[k], epoch=step / plan.steps_per_epoch, best_top1=best_top1)
        if cfg.checkpoint_every_steps == 0 or step == plan.ends[k]:
          checkpoints.save(state, meta, best=improved)
        elif improved:
          checkpoints.save(state, meta, best=True)
      if at_checkpoint and not at_eval:
        checkpoints.save(state, dict(phase=k, phase_name=plan.names[k], epoch=step / plan.steps_per_epoch,
                                     best_top1=best_top1))
      if at_eval or at_checkpoint:
        paused_s += time.time() - t_pause
    jax.block_until_ready(state.step)
    if step > steady_from:
      timing['train_s'] += time.time() - t_steady - paused_s
      timing['train_images'] += (step - steady_from) * cfg.batch_size
  checkpoints.close()

  if last_eval is None:  # the run was already finished: just report
    last_eval = evaluate(eval_fn, state, teacher_vars, data.eval, cfg.eval_batch_size)
  summary = dict(workdir=workdir, student=cfg.student.name, dataset=cfg.data.dataset, steps=int(state.step),
                 epochs=round(int(state.step) / plan.steps_per_epoch, 3),
                 eval_top1=last_eval['top1'], eval_top5=last_eval['top5'], eval_loss=last_eval['loss'],
                 best_eval_top1=max(best_top1, last_eval['top1']),
                 nonfinite_updates=int(jax.device_get(state.nonfinite_updates)),
                 wall_s=round(time.time() - t_start, 2), compile_s=round(timing['compile_s'], 2),
                 train_images_per_s=round(timing['train_images'] / timing['train_s'], 1) if timing['train_s'] else None)
  if 'agreement' in last_eval:
    summary['eval_agreement'] = last_eval['agreement']
  if data.heldout is not None:
    heldout = evaluate(eval_fn, state, teacher_vars, data.heldout, cfg.eval_batch_size)
    summary['heldout_top1'] = heldout['top1']
  writer.flush()
  history.save()
  if jax.process_index() == 0:
    history.plot()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
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
  raise NonFiniteError(
      f'non-finite loss or gradient at step {bad_step} (terms: {", ".join(bad_terms) or "gradients only"}); '
      f'the last good checkpoint (step {last}) is kept; lower the learning rate, add '
      f'--config.phases.<phase>.optimizer.grad_clip_norm=1.0, or set --config.nonfinite=skip to skip such updates')
