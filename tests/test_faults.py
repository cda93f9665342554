"""Faults: NaN/Inf updates, corrupted checkpoints. Finished work is never lost."""
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kdjax import config as config_lib
from kdjax import export
from kdjax import report
from kdjax import run_data
from kdjax import train
from kdjax.data import load_split
from kdjax.errors import NonFiniteError, UserError
from tests.tiny_configs import tiny
from tests.test_train import final_variables


def _diverging_config(nonfinite):
  """Phase 1 trains normally (and checkpoints); phase 2's absurd learning rate makes the loss blow up."""
  cfg = tiny.get_config('ce')
  good = config_lib.phase(1, {'ce': config_lib.loss_term('ce')}, config_lib.optimizer('adam', learning_rate=3e-3))
  bad = config_lib.phase(1, {'ce': config_lib.loss_term('ce')},
                         config_lib.optimizer('sgd', learning_rate=1e30, schedule='constant'))
  cfg.schedule = ('good', 'bad')
  cfg.phases = {'good': good, 'bad': bad}
  cfg.nonfinite = nonfinite
  return cfg


def test_nonfinite_loss_stops_with_step_terms_and_kept_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  with pytest.raises(NonFiniteError) as info:
    train.train_and_evaluate(_diverging_config('stop'), workdir)
  message = str(info.value)
  assert 'non-finite loss or gradient at step' in message
  assert 'terms: ce' in message or 'gradients only' in message
  bad_step = int(message.split('at step ')[1].split()[0])
  assert bad_step >= 22  # phase 'good' has 22 steps and stays finite
  kept = final_variables(workdir)
  assert f'checkpoint (step {int(kept["step"])}) is kept' in message
  # The fixes it names: a new recipe in a new workdir (this one refuses it), or skipping here.
  assert 'new --workdir' in message and '--config.nonfinite=skip' in message
  changed = _diverging_config('stop')
  changed.phases.bad.optimizer.grad_clip_norm = 1.0
  with pytest.raises(UserError, match='holds a different experiment'):
    train.train_and_evaluate(changed, workdir)
  assert all(np.isfinite(v).all() for v in kept.values())


def _strict_json(path):
  """The file parsed as strict JSON: Python's bare NaN/Infinity raise."""
  def refuse(constant):
    raise ValueError(f'{path} holds {constant}, which is not JSON')
  with open(path) as f:
    return json.load(f, parse_constant=refuse)


def test_nonfinite_updates_can_be_skipped_and_counted(tmp_path):
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(_diverging_config('skip'), workdir)
  assert summary['nonfinite_updates'] > 0
  assert all(np.isfinite(v).all() for v in final_variables(workdir).values())
  # The NaN losses of the skipped steps are JSON nulls on disk, and NaN again when the history is read back.
  assert _strict_json(os.path.join(workdir, 'summary.json'))['eval_loss'] is None  # the huge finite weights' loss
  rows = _strict_json(os.path.join(workdir, 'history.json'))
  nulls = [(row['step'], key) for row in rows for key, value in row.items() if value is None]
  assert nulls
  step, key = nulls[0]
  history = report.History(workdir, upto_step=step)
  assert np.isnan(history.rows[-1][key]) and history.rows[-1]['step'] == step


def _truncate(checkpoint_dir):
  """Tear a checkpoint the way a kill mid-write or a bad disk would: every data file cut to a third."""
  for root, _, files in os.walk(os.path.join(checkpoint_dir, 'state')):
    for name in files:
      with open(os.path.join(root, name), 'r+b') as f:
        f.truncate(max(0, os.path.getsize(os.path.join(root, name)) // 3))


def _checkpointed_run(tmp_path):
  cfg = tiny.get_config('ce')
  cfg.checkpoint_every_steps = 10
  cfg.keep_checkpoints = 10
  workdir = str(tmp_path / 'run')
  first = train.train_and_evaluate(cfg, workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  return cfg, workdir, first, ckpt_dir, sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  cfg, workdir, first, ckpt_dir, steps = _checkpointed_run(tmp_path)
  reference = final_variables(workdir)
  _truncate(os.path.join(ckpt_dir, str(steps[-1])))
  second = train.train_and_evaluate(cfg, workdir)
  assert os.path.isdir(os.path.join(workdir, 'corrupt_checkpoints', str(steps[-1])))  # moved aside, not deleted
  assert all(os.path.isdir(os.path.join(ckpt_dir, str(s))) for s in steps[:-1])
  assert second['steps'] == first['steps']
  resumed = final_variables(workdir)
  for key in reference:
    np.testing.assert_array_equal(reference[key], resumed[key], err_msg=key)


def _unreadable_copy(teacher_workdir, tmp_path):
  """A copy of the teacher run whose best checkpoint's arrays are cut to a third (the original stays whole)."""
  workdir = str(tmp_path / 'teacher')
  shutil.copytree(teacher_workdir, workdir)
  for step in os.listdir(os.path.join(workdir, 'best')):
    _truncate(os.path.join(workdir, 'best', step))
  return workdir


def _teacher_variables():
  from flax import nnx
  from kdjax.models import create_model
  return nnx.split(create_model('cnn3', num_classes=10, image_shape=(8, 8, 1), rngs=nnx.Rngs(0), hidden=16))[1]


def test_an_unreadable_teacher_checkpoint_is_one_clear_error(teacher_workdir, tmp_path):
  from kdjax import checkpoint as ckpt_lib
  ckpt_lib.restore_model_variables(teacher_workdir, _teacher_variables())  # the whole one reads
  workdir = _unreadable_copy(teacher_workdir, tmp_path)
  with pytest.raises(UserError) as info:
    ckpt_lib.restore_model_variables(workdir, _teacher_variables())
  message = str(info.value)
  assert message.startswith(f'teacher checkpoint {workdir}/best/') and 'cannot be read (' in message, message
  assert 'readable on every host' in message and '\n' not in message


def test_a_teacher_checkpoint_another_process_cannot_read_stops_every_process(teacher_workdir, monkeypatch):
  """Read apart, the processes agree before using the teacher: where another process failed (simulated here), this
  one stops with the same error instead of training on alone and waiting for it in the first collective."""
  from kdjax import checkpoint as ckpt_lib
  from kdjax import mesh as mesh_lib
  answers = []
  monkeypatch.setattr(mesh_lib, 'all_processes', lambda ok: answers.append(ok) or False)
  with pytest.raises(UserError, match='another process of this run could not'):
    ckpt_lib.restore_model_variables(teacher_workdir, _teacher_variables())
  assert answers == [True]  # this process read it


def test_teacher_checkpoint_of_other_shapes_lists_the_mismatches(teacher_workdir):
  from flax import nnx
  from kdjax import checkpoint as ckpt_lib
  from kdjax.errors import UserError
  from kdjax.models import create_model
  wrong = create_model('cnn3', num_classes=7, image_shape=(8, 8, 1), rngs=nnx.Rngs(0), hidden=24)
  with pytest.raises(UserError) as info:
    ckpt_lib.restore_model_variables(teacher_workdir, nnx.split(wrong)[1])
  message = str(info.value)
  assert 'does not fit the configured teacher model' in message
  assert 'head/fc/kernel (16, 10) in checkpoint vs (24, 7) in model' in message or '(16, 10)' in message
  assert 'mismatches' in message and '\n' not in message


def test_fine_tune_from_a_finished_run_on_other_classes(tmp_path, teacher_workdir):
  """init.workdir starts the student from a run's weights; keep_fresh='^head/' allows another class count."""
  cfg = tiny.get_config('teacher')
  cfg.data.train_split = 'train[50%:]'
  cfg.init.workdir = teacher_workdir
  cfg.init.keep_fresh = '^head/fc/'
  cfg.phases.train.epochs = 1
  summary = train.train_and_evaluate(cfg, str(tmp_path / 'finetune'))
  assert summary['eval_top1'] > 0.5  # from an 85%-ish teacher, one epoch of fine-tuning stays well above chance
  # Its inputs are normalised as the run it starts from (trained on the other half) normalised them.
  assert export.recorded_normalization(str(tmp_path / 'finetune')) == export.recorded_normalization(teacher_workdir)
  assert run_data.channel_stats(load_split('digits', 'train[50%:]').images) != export.recorded_normalization(
      teacher_workdir)
  cfg.init.keep_fresh = ''
  cfg.student.hidden = 24
  with pytest.raises(train.UserError, match='init checkpoint .* does not fit'):
    train.train_and_evaluate(cfg, str(tmp_path / 'wrong'))


def test_a_workdir_whose_checkpoints_all_fail_stops_and_keeps_them(tmp_path):
  """No checkpoint restores (another kdjax version, another config, a device out of memory): one error, nothing
  moved -- never a silent restart from step 0 over a finished run."""
  cfg, workdir, _, ckpt_dir, steps = _checkpointed_run(tmp_path)
  for step in steps:
    _truncate(os.path.join(ckpt_dir, str(step)))
  with pytest.raises(UserError, match=f'none of the {len(steps)} checkpoints .* restores .*new --workdir'):
    train.train_and_evaluate(cfg, workdir)
  assert sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) == steps
  assert not os.path.exists(os.path.join(workdir, 'corrupt_checkpoints'))


def test_without_checkpoints_the_run_resumes_from_its_best_checkpoint(tmp_path, caplog):
  """checkpoints/ deleted by hand: the best checkpoint is a whole train state, and resuming from it is exact. The
  best step is made an early one (a copy of checkpoint 20), so the run has to train on to the end."""
  cfg, workdir, first, ckpt_dir, steps = _checkpointed_run(tmp_path)
  reference = final_variables(workdir)
  best_step = steps[1]
  assert best_step < int(reference['step'])
  shutil.rmtree(os.path.join(workdir, 'best'))
  shutil.copytree(os.path.join(ckpt_dir, str(best_step)), os.path.join(workdir, 'best', str(best_step)))
  shutil.rmtree(ckpt_dir)
  with caplog.at_level('WARNING'):
    second = train.train_and_evaluate(cfg, workdir)
  assert f'resuming from the best checkpoint, step {best_step}' in caplog.text
  assert second['eval_top1'] == first['eval_top1']
  for key, value in final_variables(workdir).items():
    np.testing.assert_array_equal(value, reference[key], err_msg=key)


def test_a_kill_during_the_first_save_leaves_a_resumable_workdir(tmp_path, monkeypatch, caplog):
  """The best copy is finished before the latest one starts: a kill between them leaves best/ alone."""
  cfg = tiny.get_config('ce')
  reference_dir = str(tmp_path / 'reference')
  train.train_and_evaluate(cfg, reference_dir)
  save = ocp.CheckpointManager.save

  def killed_before_the_latest_save(manager, step, *args, **kwargs):
    if os.path.basename(str(manager.directory)) == 'checkpoints':
      raise KeyboardInterrupt
    return save(manager, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, 'save', killed_before_the_latest_save)
  workdir = str(tmp_path / 'run')
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(cfg, workdir)
  assert os.listdir(os.path.join(workdir, 'best')) and not any(
      name.isdigit() for name in os.listdir(os.path.join(workdir, 'checkpoints')))
  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  with caplog.at_level('WARNING'):
    train.train_and_evaluate(cfg, workdir)
  assert 'resuming from the best checkpoint' in caplog.text  # not a restart from 0, which ends the same
  expected = final_variables(reference_dir)
  for key, value in final_variables(workdir).items():
    np.testing.assert_array_equal(value, expected[key], err_msg=key)


def test_an_unreadable_best_checkpoint_without_checkpoints_is_kept_and_refused(tmp_path):
  cfg, workdir, _, ckpt_dir, _ = _checkpointed_run(tmp_path)
  shutil.rmtree(ckpt_dir)
  best_step = os.listdir(os.path.join(workdir, 'best'))[0]
  _truncate(os.path.join(workdir, 'best', best_step))
  with pytest.raises(UserError, match=f'best checkpoint \\(step {best_step}\\) that does not restore'):
    train.train_and_evaluate(cfg, workdir)
  assert os.listdir(os.path.join(workdir, 'best')) == [best_step]


def test_the_same_step_torn_twice_keeps_both_copies(tmp_path):
  cfg, workdir, _, ckpt_dir, steps = _checkpointed_run(tmp_path)
  for copy in ('', '.1'):
    _truncate(os.path.join(ckpt_dir, str(steps[-1])))
    train.train_and_evaluate(cfg, workdir)  # falls back, then saves steps[-1] again
    assert os.path.isdir(os.path.join(workdir, 'corrupt_checkpoints', f'{steps[-1]}{copy}'))


def test_a_phase_whose_trainable_pattern_matches_nothing_is_refused(tmp_path):
  """A typo in `trainable` ('^stage/' for '^stages/') would train nothing for the whole phase, silently."""
  cfg = tiny.get_config('ce')
  cfg.phases.train.trainable = '^stage/'
  with pytest.raises(UserError, match="phase `train` would train nothing: .*'\\^stage/' matches no parameter"):
    train.train_and_evaluate(cfg, str(tmp_path / 'run'))


def test_the_best_checkpoint_is_finished_before_the_latest_one_starts(tmp_path, monkeypatch):
  """Else a kill between the two loses the best copy for good: the resumed run's meta already counts its accuracy."""
  started = []
  save = ocp.CheckpointManager.save

  def latest_save_sees_best_finished(manager, step, *args, **kwargs):
    if os.path.basename(str(manager.directory)) == 'checkpoints':
      best_dir = os.path.join(str(tmp_path / 'run'), 'best')
      started.append((step, os.path.isdir(os.path.join(best_dir, str(step)))))
    return save(manager, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, 'save', latest_save_sees_best_finished)
  train.train_and_evaluate(tiny.get_config('ce'), str(tmp_path / 'run'))
  history = json.load(open(tmp_path / 'run' / 'history.json'))
  best_steps, best = set(), -1.0
  for row in history:
    if 'eval/top1' in row and row['eval/top1'] > best:
      best_steps.add(row['step'])
      best = row['eval/top1']
  assert best_steps and all(finished for step, finished in started if step in best_steps), started


def test_a_teacher_is_read_from_its_best_or_its_last_checkpoint(tmp_path, teacher_workdir):
  """teacher.checkpoint='last' reads checkpoints/'s newest step, 'best' the best/ one (here a later step of other
  weights is written to checkpoints/); a run with only best/ serves both; another choice is refused."""
  import jax.numpy as jnp
  from flax import nnx
  from kdjax import checkpoint as ckpt_lib
  from kdjax import teachers
  from kdjax.models import create_model
  workdir = str(tmp_path / 'teacher')
  shutil.copytree(teacher_workdir, workdir)

  def fresh():
    return nnx.split(create_model('cnn3', num_classes=10, image_shape=(8, 8, 1), rngs=nnx.Rngs(0), hidden=16))

  def kernel(variables):
    return np.asarray(variables['head']['fc']['kernel'].get_value())

  best = ckpt_lib.restore_model_variables(workdir, fresh()[1], which='best')
  _, params, rest = nnx.split(nnx.merge(fresh()[0], best), nnx.Param, ...)
  later = {'params': jax.tree.map(lambda x: 2.0 * np.asarray(x) + 1.0, nnx.to_pure_dict(params)),
           'model_state': nnx.to_pure_dict(rest)}
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = max(manager.all_steps()) + 1
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(later), meta=ocp.args.JsonSave({})))
  manager.wait_until_finished()
  manager.close()
  last = ckpt_lib.restore_model_variables(workdir, fresh()[1], which='last')
  np.testing.assert_allclose(kernel(last), 2.0 * kernel(best) + 1.0, rtol=1e-6)
  np.testing.assert_array_equal(kernel(ckpt_lib.restore_model_variables(workdir, fresh()[1])), kernel(best))

  cfg = tiny.get_config('kd')
  cfg.teacher.workdir = workdir
  mean, std = export.recorded_normalization(workdir)
  for which, expected in (('last', 2.0 * kernel(best) + 1.0), ('best', kernel(best))):
    cfg.teacher.checkpoint = which
    config_lib.validate(cfg)
    teacher = teachers.restore_teacher(cfg, num_classes=10, image_shape=(8, 8, 1), dtype=jnp.float32, mean=mean,
                                       std=std)
    np.testing.assert_allclose(np.asarray(teacher.head.fc.kernel.get_value()), expected, rtol=1e-6)

  shutil.rmtree(os.path.join(workdir, 'checkpoints'))  # an import's layout, or a kill during the first save
  np.testing.assert_array_equal(kernel(ckpt_lib.restore_model_variables(workdir, fresh()[1], which='last')),
                                kernel(best))
  cfg.teacher.checkpoint = 'final'
  with pytest.raises(UserError, match='teacher.checkpoint.*choose one of: best, last'):
    config_lib.validate(cfg)
