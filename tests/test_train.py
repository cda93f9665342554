"""Integration tests of the training loop on tiny digits runs (8 simulated devices unless said otherwise)."""
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from kdjax import checkpoint as ckpt_lib
from kdjax import config as config_lib
from kdjax import export
from kdjax import objective as objective_lib
from kdjax import report
from kdjax import rng as rng_lib
from kdjax import state as state_lib
from kdjax import steps
from kdjax import train
from kdjax.data import augment
from kdjax.data import sources
from kdjax.models import create_model
from tests.conftest import ROOT, TINY, events_by_tag_and_step, run_main
from tests.tiny_configs import tiny


def final_variables(workdir, sub='checkpoints') -> dict[str, np.ndarray]:
  """{path: array} of the student's params and model state in the newest checkpoint of a run."""
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, sub)))
  raw = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  return {**ckpt_lib._flatten_raw(raw['params']), **ckpt_lib._flatten_raw(raw['model_state']),
          'step': np.asarray(raw['step'])}


def checkpoint_step_meta(workdir, step):
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')))
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def test_loss_terms_see_the_phase_progress_in_epochs():
  """DKD's warm-up (and any term's schedule) counts epochs from its own phase's first step, not the run's."""
  spec = steps.PhaseStep(student_def=None, adapter_def=None, teacher=None, objective=None, term_names=(), tx=None,
                         trainable='.*', frozen_bn=True, preprocess=None, first_step=300, steps_per_epoch=40)
  epochs = jax.jit(spec.epoch)(jnp.asarray([300, 310, 340, 400], jnp.int32))
  assert epochs.dtype == jnp.float32
  np.testing.assert_allclose(epochs, [0.0, 0.25, 1.0, 2.5])


def _ce_phase(model, image_shape, *, tx, trainable='.*', augment_name='none', frozen_bn=True, train_modes=None):
  """A one-term CE `PhaseStep` for `model` and its initial train state, built by hand as the trainer builds them."""
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  adapter_def, adapter_params = nnx.split(objective_lib.Adapters({}, rngs=nnx.Rngs(1)), nnx.Param)
  objective, names = objective_lib.build_objective({'ce': config_lib.loss_term('ce')})
  size, _, channels = image_shape
  spec = steps.PhaseStep(
      student_def=graphdef, adapter_def=adapter_def, teacher=None, objective=objective, term_names=names, tx=tx,
      trainable=trainable, frozen_bn=frozen_bn, first_step=0, steps_per_epoch=1, train_modes=train_modes,
      preprocess=steps.Preprocess(augment=lambda r, x: augment.AUGMENTATIONS[augment_name](r, x, image_size=size),
                                  evaluate=lambda x: x / 255.0, mean=(0.5,) * channels, std=(0.25,) * channels,
                                  dtype=jnp.float32, image_size=size))
  trainable_params, _ = state_lib.split_trainable(params, trainable)
  state = state_lib.init_state(params, model_state, adapter_params, tx.init((trainable_params, adapter_params)), 0, 1)
  return spec, state


def test_train_step_lowers_loss_on_a_fixed_batch():
  model = create_model('cnn2', num_classes=10, image_shape=(8, 8, 1), rngs=nnx.Rngs(0), hidden=16, dropout=0.0)
  spec, state = _ce_phase(model, (8, 8, 1), tx=optax.adam(1e-2))
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)),
           'label': jnp.asarray(rng.integers(0, 10, (16,), dtype=np.int32))}
  step_fn = jax.jit(lambda s, b: steps.train_step(spec, s, None, b))
  losses = []
  for _ in range(30):
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics.compute()['loss']))
  assert losses[-1] < 0.2 * losses[0], losses
  assert int(state.step) == 30


def test_run_on_8_devices_matches_1_device(tmp_path):
  assert jax.device_count() == 8
  eight = str(tmp_path / 'eight')
  summary = train.train_and_evaluate(tiny.get_config('ce'), eight)
  one = str(tmp_path / 'one')
  done = run_main('--config', f'{TINY}:ce', '--workdir', one,
                  env={'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}, check=True)
  assert 'data-parallel over 1 cpu device(s) in 1 process(es)' in done.stderr
  a, b = final_variables(eight), final_variables(one)
  assert a.keys() == b.keys()
  # Float noise only: 8 devices sum the gradient in another order. Adam's update has the size of its learning rate
  # (3e-3) wherever a gradient is near zero and its sign is noise, so absolute differences of lr / 30 can remain.
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=1e-4, err_msg=key)
  assert summary['eval_top1'] > 0.5  # 4 epochs on half the digits: far above chance (0.1)


def _kill_and_resume(config_arg, workdir, kill_from_steps, extra=()):
  """Start the run and SIGKILL it right after the first new checkpoint at or past each of `kill_from_steps`
  (plus a random 0-0.3 s), restarting it each time with the same command; then let it finish."""
  args = ('--config', config_arg, '--workdir', workdir, *extra)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  killed_at = []
  for attempt, target in enumerate(kill_from_steps):
    seen = set(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else set()
    log = os.path.join(os.path.dirname(workdir), f'attempt{attempt}.log')
    with open(log, 'w') as stderr:
      proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py'), *args], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=stderr)
      deadline = time.time() + 240
      while time.time() < deadline and proc.poll() is None:
        now = set(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else set()
        new = {d for d in now - seen if d.isdigit() and int(d) >= target}
        if new:
          time.sleep(np.random.default_rng(len(killed_at)).uniform(0.0, 0.3))
          killed_at.append(max(int(d) for d in new))
          break
        time.sleep(0.02)
      proc.kill()  # also when the deadline passed or the run ended first: the assertions below say which
      proc.wait(timeout=60)
    if attempt:  # a restart resumed (it did not start over, which a deterministic run would hide)
      with open(log) as f:
        assert re.search(r'resumed from step [1-9]', f.read()), f'attempt {attempt} did not resume; see {log}'
  final = run_main(*args, check=True)
  assert re.search(r'resumed from step [1-9]', final.stderr), final.stderr[-3000:]
  return killed_at


def _logged(workdir):
  """history.json's train and eval rows (the time rows differ from run to run)."""
  with open(os.path.join(workdir, 'history.json')) as f:
    rows = [{k: v for k, v in row.items() if k == 'step' or k.startswith(('train/', 'eval/'))} for row in json.load(f)]
  return [row for row in rows if len(row) > 1]


def _train_and_eval_events(workdir):
  """The train and eval scalars of the TensorBoard event files, {(tag, step): [value, ...]}."""
  return {key: values for key, values in events_by_tag_and_step(workdir).items()
          if key[0].startswith(('train/', 'eval/'))}


@pytest.mark.long
@pytest.mark.parametrize('variant', ['ce', 'stagewise'])
def test_kill_and_resume_is_bit_identical(tmp_path, teacher_workdir, variant):
  """SIGKILL 3 times, resume: the same final state as no interruption.

  The stage-wise run has phases stage0 (steps 0-22), stage1 (22-44) and classifier (44-88): it is killed inside
  each of them, so resume continues in the middle of phase 2 and of phase 3.
  """
  extra = ['--config.checkpoint_every_steps=7', f'--config.teacher.workdir={teacher_workdir}']
  whole = str(tmp_path / 'whole')
  run_main('--config', f'{TINY}:{variant}', '--workdir', whole, *extra, check=True)
  interrupted = str(tmp_path / 'interrupted')
  killed_at = _kill_and_resume(f'{TINY}:{variant}', interrupted, kill_from_steps=(7, 28, 56), extra=extra)
  assert len(killed_at) == 3, killed_at
  if variant == 'stagewise':  # one kill inside each phase
    assert [sum(s >= end for end in (22, 44)) for s in killed_at] == [0, 1, 2], killed_at
  a, b = final_variables(whole), final_variables(interrupted)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # The logged curves too: each train row averages the same steps (the checkpoint carries the metrics accumulated
  # since the last log step), and each eval row evaluates the same state.
  assert _logged(whole) == _logged(interrupted)
  # And TensorBoard's: the events the killed invocations wrote after their checkpoints are dropped on resume.
  assert _train_and_eval_events(whole) == _train_and_eval_events(interrupted)
  print(f'{variant}: SIGKILL after checkpoints {killed_at}, resumed each time; final step {int(b["step"])}; '
        f'{len(a) - 1} arrays bit-identical to the uninterrupted run')
  if variant == 'stagewise':
    phases = {checkpoint_step_meta(interrupted, s)['phase_name']
              for s in ocp.CheckpointManager(os.path.abspath(os.path.join(interrupted, 'checkpoints'))).all_steps()}
    assert phases  # meta records the phase


def test_refused_updates_leave_the_parameters_but_step_the_schedule():
  """nonfinite='skip': a NaN loss changes no parameter or moment, but the learning-rate schedule counts the step, so
  it still reaches its end when the phase does."""
  import dataclasses
  model = create_model('cnn2', num_classes=10, image_shape=(8, 8, 1), rngs=nnx.Rngs(0), hidden=16, dropout=0.0)
  spec, state = _ce_phase(model, (8, 8, 1), tx=optax.sgd(optax.cosine_decay_schedule(0.1, 10), momentum=0.9))
  # NaN through the logits, so the gradients are NaN too: an applied update would change the parameters.
  nan_objective = lambda student_out, *args, **kwargs: (
      jnp.nan * jnp.sum(student_out[0]), {'ce': jnp.nan * jnp.sum(student_out[0])}, kwargs['memory'])
  spec = dataclasses.replace(spec, objective=nan_objective)
  batch = {'image': jnp.zeros((4, 8, 8, 1), jnp.uint8), 'label': jnp.zeros((4,), jnp.int32)}
  after = state
  for _ in range(3):
    after, _ = jax.jit(lambda s, b: steps.train_step(spec, s, None, b))(after, batch)
  assert int(after.nonfinite_updates) == 3 and int(after.step) == 3
  for old, new in zip(jax.tree.leaves(state.params), jax.tree.leaves(after.params)):
    np.testing.assert_array_equal(old, new)
  schedules = [s for s in jax.tree.leaves(after.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
               if isinstance(s, optax.ScaleByScheduleState)]
  assert [int(s.count) for s in schedules] == [3]
  momentum = [t for t in jax.tree.leaves(after.opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState))
              if isinstance(t, optax.TraceState)]
  assert all(not np.any(np.asarray(leaf)) for t in momentum for leaf in jax.tree.leaves(t.trace))


def _one_ce_step(name, trainable, frozen_bn=True, train_modes=None, **model_args):
  """The model state before and after one `steps.train_step` with `trainable`, as {path: array}."""
  model = create_model(name, num_classes=10, image_shape=(8, 8, 3), rngs=nnx.Rngs(params=0, dropout=1), **model_args)
  spec, state = _ce_phase(model, (8, 8, 3), tx=optax.sgd(0.1), trainable=trainable, frozen_bn=frozen_bn,
                          train_modes=train_modes)
  model_state = state.model_state
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)),
           'label': jnp.asarray(rng.integers(0, 10, (16,), dtype=np.int32))}
  after = jax.jit(lambda s, b: steps.train_step(spec, s, None, b))(state, batch)[0]
  flat = lambda tree: {state_lib.path_string(p): np.asarray(jax.random.key_data(v.get_value())
                                                            if isinstance(v, nnx.RngKey) else v.get_value())
                       for p, v in nnx.to_flat_state(tree)}
  return flat(model_state), flat(after.model_state)


def test_frozen_stages_keep_their_batchnorm_statistics():
  before, after = _one_ce_step('resnet8', '^stages/0/')
  moved = {k for k in before if k.endswith(('/mean', '/var')) and not np.array_equal(before[k], after[k])}
  assert moved and all(k.startswith('stages/0/') for k in moved), sorted(moved)


def test_a_frozen_head_still_draws_a_new_dropout_mask_each_step():
  """frozen_bn keeps statistics only: a head frozen during a phase whose loss uses the logits keeps dropping out
  different units (its RNG counter advances)."""
  before, after = _one_ce_step('cnn2', '^stages/', hidden=16, dropout=0.5)
  assert after['head/dropout/rngs/count'] == before['head/dropout/rngs/count'] + 1


def _saved_by_phase(workdir, item):
  """{phase name: [(step, {path: array} of `item` of the state)] for the phase's first and last checkpoint} of a
  finished run. Only those two are restored: a run that checkpoints every step keeps a hundred."""
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')))
  steps_by_phase = {}
  for step in sorted(manager.all_steps()):
    steps_by_phase.setdefault(checkpoint_step_meta(workdir, step)['phase_name'], []).append(step)
  restore = lambda step: ckpt_lib._flatten_raw(
      manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state[item])
  return {name: [(step, restore(step)) for step in sorted({steps[0], steps[-1]})]
          for name, steps in steps_by_phase.items()}


def test_frozen_eval_runs_frozen_stages_in_inference_mode():
  """With `frozen_eval`, the stages a phase does not train run in inference mode: their BatchNorm statistics stay
  put even without `frozen_bn` (which would otherwise restore them), and the trained stage's statistics move."""
  student = create_model('resnet8', num_classes=10, image_shape=(8, 8, 3), rngs=nnx.Rngs(0))
  _, params, _ = nnx.split(student, nnx.Param, ...)
  ph = config_lib.phase(1, {'ce': config_lib.loss_term('ce')}, trainable='^stages/(1)/', frozen_eval=True)
  modes = train._train_modes(student, state_lib.split_trainable(params, ph.trainable)[0], ph)
  assert modes == (False, True, False, False, False)  # stem, 3 stages, head
  assert train._train_modes(student, params, config_lib.phase(1, {}, trainable='^stages/(1)/')) is None  # not asked
  before, after = _one_ce_step('resnet8', '^stages/(1)/', frozen_bn=False, train_modes=modes)
  moved = {k for k in before if k.endswith(('/mean', '/var')) and not np.array_equal(before[k], after[k])}
  assert moved and all(k.startswith('stages/1/') for k in moved), sorted(moved)
  before, after = _one_ce_step('resnet8', '^stages/(1)/', frozen_bn=False)  # train mode: every stage's moves
  assert any(k.startswith('stages/2/') and not np.array_equal(before[k], after[k]) for k in before)


def test_stagewise_phase_freezes_exactly_its_stages(tmp_path, teacher_workdir):
  cfg = tiny.get_config('stagewise')
  cfg.teacher.workdir = teacher_workdir
  cfg.keep_checkpoints = 20
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(cfg, workdir)
  model = create_model('cnn2', num_classes=10, image_shape=(8, 8, 1), rngs=rng_lib.model_rngs(cfg.seed),
                       hidden=16, dropout=0.0)
  initial = {state_lib.path_string(p): np.asarray(v.get_value())
             for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

  after = {name: saved[-1][1] for name, saved in _saved_by_phase(workdir, 'params').items()}  # each phase's end
  changed = lambda a, b: sorted(k for k in a if not np.array_equal(a[k], b[k]))
  assert all(k.startswith('stages/0/') for k in changed(initial, after['stage0']))
  assert changed(initial, after['stage0'])
  assert all(k.startswith('stages/1/') for k in changed(after['stage0'], after['stage1']))
  assert changed(after['stage0'], after['stage1'])
  assert all(k.startswith('head/') for k in changed(after['stage1'], after['classifier']))
  assert changed(after['stage1'], after['classifier'])


def test_a_phase_trains_only_its_own_adapters(tmp_path, teacher_workdir):
  """With weight decay, a phase's optimizer must not touch the adapters of other phases: they stay at their initial
  values until their own phase, which is the only one that changes them."""
  cfg = tiny.get_config('stagewise')
  cfg.teacher.workdir = teacher_workdir
  for name in ('stage0', 'stage1'):
    cfg.phases[name].losses.feature.adapter = 'always'
    cfg.phases[name].optimizer = config_lib.optimizer('sgd', learning_rate=0.1, momentum=0.9, weight_decay=5e-3)
  cfg.data.train_split = 'train[:10%]'  # 6 steps an epoch: a checkpoint each step is cheap
  cfg.checkpoint_every_steps = 1
  cfg.keep_checkpoints = 1000
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(cfg, workdir)
  by_phase = _saved_by_phase(workdir, 'adapter_params')
  first, end0 = by_phase['stage0'][0][1], by_phase['stage0'][-1][1]
  end1, end = by_phase['stage1'][-1][1], by_phase['classifier'][-1][1]
  s0, s1 = 'maps/s0_t0/kernel', 'maps/s1_t1/kernel'
  assert set(first) == {s0, s1}
  np.testing.assert_array_equal(first[s1], end0[s1])  # untouched through stage0
  assert not np.array_equal(first[s0], end0[s0])
  np.testing.assert_array_equal(end0[s0], end1[s0])    # frozen once its phase is over
  assert not np.array_equal(end0[s1], end1[s1])
  np.testing.assert_array_equal(end1[s0], end[s0])
  np.testing.assert_array_equal(end1[s1], end[s1])


def test_kd_run_reports_agreement_with_its_teacher(tmp_path, teacher_workdir):
  """eval/agreement is the share of eval examples where the student's and the teacher's top classes agree: here
  computed again from both runs' best checkpoints (Predictor) on the eval split."""
  cfg = tiny.get_config('kd')
  cfg.teacher.workdir = teacher_workdir
  workdir = str(tmp_path / 'kd')
  summary = train.train_and_evaluate(cfg, workdir)
  assert summary['eval_agreement'] > 0.3
  best_step = int(os.listdir(os.path.join(workdir, 'best'))[0])
  logged = [row for row in report.History(workdir, upto_step=best_step).rows
            if row['step'] == best_step and 'eval/agreement' in row][0]['eval/agreement']
  split = sources.load_split('digits', cfg.data.eval_split)
  student, teacher = export.Predictor.load(workdir), export.Predictor.load(teacher_workdir)
  agree = np.mean(student.predict_logits(split.images).argmax(-1) == teacher.predict_logits(split.images).argmax(-1))
  assert abs(logged - agree) <= 1.5 / len(split.labels), (logged, agree)  # one example may flip on rounding
  assert agree < 1.0  # the sabotage "student == teacher" would read 1.0


def test_crd_run_keeps_its_memory_banks_in_the_checkpointed_state(tmp_path, teacher_workdir):
  cfg = tiny.get_config('crd')
  cfg.teacher.workdir = teacher_workdir
  summary = train.train_and_evaluate(cfg, str(tmp_path / 'crd'))
  assert summary['eval_top1'] > 0.2 and summary['nonfinite_updates'] == 0  # above chance (0.1) in 88 steps
  manager = ocp.CheckpointManager(os.path.abspath(str(tmp_path / 'crd' / 'checkpoints')))
  raw = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  banks = raw['memory']['crd']
  num_train = len(sources.load_split('digits', cfg.data.train_split).labels)
  initial = objective_lib.init_memory([cfg.phases.train], num_train, rng_lib.stream(cfg.seed, 'memory'))['crd']
  for side in ('student', 'teacher'):
    assert banks[side].shape == (num_train, 16)
    np.testing.assert_allclose(np.linalg.norm(banks[side], axis=-1), 1.0, rtol=1e-4)
    moved = np.any(banks[side] != np.asarray(initial[side]), axis=-1)
    assert moved.mean() > 0.9, moved.mean()  # 4 epochs: nearly every example's row was written


def test_finished_run_is_not_retrained(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  first = train.train_and_evaluate(tiny.get_config('ce'), workdir)

  def no_training(*args):
    raise AssertionError('a finished run trained again')
  monkeypatch.setattr(train, 'train_phase', no_training)  # training from step 0 would give the same summary
  second = train.train_and_evaluate(tiny.get_config('ce'), workdir)
  assert second['steps'] == first['steps']
  assert second['eval_top1'] == first['eval_top1']


@pytest.mark.parametrize('name', sorted(augment.AUGMENTATIONS))
def test_every_augmentation_runs_in_the_sharded_step(name):
  """Each pipeline inside the jitted step on a batch sharded over 8 devices (keys replicated, images sharded)."""
  from kdjax import mesh as mesh_lib
  from kdjax.data import loader
  mesh = mesh_lib.make_data_mesh()
  rng = np.random.default_rng(0)
  data = loader.ResidentDataset.from_arrays(rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8),
                                            rng.integers(0, 10, (64,)), mesh)
  model = create_model('cnn2', num_classes=10, image_shape=(16, 16, 3), rngs=nnx.Rngs(0), hidden=8, dropout=0.0)
  spec, state = _ce_phase(model, (16, 16, 3), tx=optax.sgd(0.1), augment_name=name)
  state = jax.device_put(state, mesh_lib.replicated(mesh))
  step_fn = steps.jit_train_step(spec, mesh_lib.replicated(mesh))
  batch = data.train_batch(data.epoch_order(0, 0), 0, 32)
  state, metrics = step_fn(state, None, batch)
  assert np.isfinite(float(metrics.compute()['loss']))


def test_a_schedule_can_leave_out_phases_from_the_command_line(tmp_path, teacher_workdir):
  """Phases missing from `schedule` are not run: the run is the listed phases' steps, in that order."""
  workdir = str(tmp_path / 'part')
  run_main('--config', f'{TINY}:stagewise', '--workdir', workdir, f'--config.teacher.workdir={teacher_workdir}',
           '--config.schedule=("stage1","classifier")', '--config.keep_checkpoints=20', check=True)
  names = {checkpoint_step_meta(workdir, step)['phase_name']
           for step in ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints'))).all_steps()}
  assert names == {'stage1', 'classifier'}
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  full = tiny.get_config('stagewise')
  assert summary['epochs'] == full.phases.stage1.epochs + full.phases.classifier.epochs


class _Killed(Exception):
  pass


def test_timings_add_up_over_a_resumed_run_and_survive_a_rerun(tmp_path, monkeypatch):
  """Stopped right after its checkpoint at step 44 of 88 and resumed: the training clock in history.json keeps
  counting from where the checkpoint left it, and the summary's timings cover both invocations. Re-running the
  finished run trains nothing and keeps the timings rather than reporting zeros."""
  workdir = str(tmp_path / 'run')
  save = train._evaluate_and_save

  def save_then_stop(run, k, step, state, book, *rest):
    save(run, k, step, state, book, *rest)
    if step == 44:
      book.checkpoints.close()
      raise _Killed
  monkeypatch.setattr(train, '_evaluate_and_save', save_then_stop)
  with pytest.raises(_Killed):
    train.train_and_evaluate(tiny.get_config('ce'), workdir)
  first = checkpoint_step_meta(workdir, 44)['clock']
  assert first['compile_s'] > 0 and first['train_s'] > 0 and first['train_images'] == 43 * 32

  summary = train.train_and_evaluate(tiny.get_config('ce'), workdir)
  assert summary['steps'] == 88
  assert summary['compile_s'] > first['compile_s'] and summary['wall_s'] > first['wall_s']
  with open(os.path.join(workdir, 'history.json')) as f:
    clock = [row['time/train_s'] for row in json.load(f) if 'time/train_s' in row]
  assert len(clock) == 4 and clock == sorted(clock) and clock[2] > first['train_s'], clock
  # 2 x 43 steps timed (each invocation's first step compiles)
  assert summary['train_images_per_s'] == pytest.approx(86 * 32 / checkpoint_step_meta(workdir, 88)['clock']
                                                        ['train_s'], rel=0.05)

  again = train.train_and_evaluate(tiny.get_config('ce'), workdir)
  for key in ('compile_s', 'wall_s', 'train_images_per_s'):
    assert again[key] == summary[key], key


def test_a_train_step_moves_nothing_between_host_and_devices(tmp_path, monkeypatch):
  """Each dispatch of the train program takes only device-resident arguments (the batch's place in the epoch comes
  from the state's step): on a GPU a host transfer per step would stall the stream. 8 devices."""
  jit_program, calls = steps.jit_train_program, []

  def guarded(*args, **kwargs):
    program = jit_program(*args, **kwargs)

    def call(*program_args):
      calls.append(1)
      with jax.transfer_guard('disallow'):
        return program(*program_args)
    return call
  monkeypatch.setattr(steps, 'jit_train_program', guarded)
  cfg = tiny.get_config('ce')
  cfg.phases.train.epochs = 2
  summary = train.train_and_evaluate(cfg, str(tmp_path / 'run'))
  assert len(calls) == summary['steps'] == 44


@pytest.mark.parametrize('with_teacher', [False, True])
def test_an_eval_pass_counts_every_example_once(with_teacher):
  """37 examples of 7 classes in batches of 16 over 8 devices: two full batches and one padded with 11 masked rows. The pass's
  metrics equal those of the model's logits on the whole split, computed on the host."""
  from kdjax import mesh as mesh_lib
  from kdjax.data import loader
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (37, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 7, 37).astype(np.int32)
  mesh = mesh_lib.make_data_mesh()
  dataset = loader.ResidentDataset.from_arrays(images, labels, mesh)
  preprocess = steps.Preprocess(augment=None, evaluate=lambda x: x.astype(jnp.float32) / 255, mean=(0.5,) * 3,
                                std=(0.25,) * 3, dtype=jnp.float32, image_size=8)
  student_def, variables = nnx.split(create_model('cnn2', num_classes=7, image_shape=(8, 8, 3), hidden=8,
                                                  rngs=nnx.Rngs(0)))
  params, model_state = nnx.split_state(variables, nnx.Param, ...)
  teacher, teacher_vars = None, None
  if with_teacher:
    teacher_def, teacher_vars = nnx.split(create_model('mlp2', num_classes=7, image_shape=(8, 8, 3), hidden=8,
                                                       rngs=nnx.Rngs(1)))
    teacher = steps.Teacher(teacher_def)
  program = steps.jit_eval_program(student_def, teacher, preprocess, 16, mesh)
  got = steps.evaluate(program, params, model_state, teacher_vars, dataset)
  got = {k: float(v) for k, v in got.compute().items()}

  inputs = preprocess.eval(jnp.asarray(images))
  logits = np.asarray(nnx.merge(student_def, params, model_state)(inputs, train=False)[0], np.float64)
  log_probs = logits - logits.max(1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
  want = {'top1': np.mean(logits.argmax(1) == labels), 'loss': -np.mean(log_probs[np.arange(37), labels]),
          'top5': np.mean([label in np.argsort(-row)[:5] for row, label in zip(logits, labels)])}
  if with_teacher:
    teacher_logits = np.asarray(teacher.forward(teacher_vars, inputs)[0])
    want['agreement'] = np.mean(logits.argmax(1) == teacher_logits.argmax(1))
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
  assert 0 < got['top1'] < 1  # the comparison is not vacuous


def test_the_eval_program_is_traced_once_for_every_phase(tmp_path, teacher_workdir, monkeypatch):
  """Three phases, three optimizer-state structures: evaluation still runs one traced program (it takes the model's
  variables, not the train state), so a phase change costs no new trace and lowering of the eval."""
  jit_eval, programs = steps.jit_eval_program, []

  def kept(*args):
    programs.append(jit_eval(*args))
    return programs[-1]
  monkeypatch.setattr(steps, 'jit_eval_program', kept)
  cfg = tiny.get_config('stagewise')
  cfg.teacher.workdir = teacher_workdir
  train.train_and_evaluate(cfg, str(tmp_path / 'run'))
  assert len(cfg.schedule) == 3 and len(programs) == 1 and programs[0].fn._cache_size() == 1


def test_the_train_step_is_traced_once_per_phase(tmp_path, teacher_workdir, monkeypatch):
  """Tracing a ResNet-34 step costs seconds: each phase traces it once, for its program (the metric accumulator
  is built from names, not from another trace), and never again at epoch, eval or checkpoint boundaries."""
  traced, step = [], steps.train_step

  def counted(spec, *args):
    traced.append(spec.first_step)
    return step(spec, *args)
  monkeypatch.setattr(steps, 'train_step', counted)
  cfg = tiny.get_config('stagewise')
  cfg.teacher.workdir = teacher_workdir
  cfg.checkpoint_every_steps = 10
  train.train_and_evaluate(cfg, str(tmp_path / 'run'))
  assert traced == [0, 22, 44], traced  # the three phases' first steps, once each
