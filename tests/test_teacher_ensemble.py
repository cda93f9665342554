"""Teachers from several finished runs (`teacher.workdir=a,b`): their ensemble, end to end, and the errors."""
import json
import os
import shutil
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax import export
from kdjax import mesh as mesh_lib
from kdjax import teachers
from kdjax import train
from kdjax.data import load_split
from kdjax.errors import UserError
from kdjax.interop.torch_import import save_as_teacher_run
from kdjax.models import create_model
from tests.conftest import TINY, run_main
from tests.tiny_configs import tiny

# The data a student run would hand `load_teacher`; mean 0 and std 1 (no normalisation) so that tests can feed the
# teacher plain [0, 1] pixels: every teacher here is then fed through `InputRenormalized`.
DIGITS = types.SimpleNamespace(num_classes=10, image_shape=(8, 8, 1), mean=(0.0,), std=(1.0,))


@pytest.fixture(scope='module')
def cnn2_teacher(tmp_path_factory):
  """A second finished teacher run, of another architecture and seed than `teacher_workdir` (cnn3, seed 0)."""
  workdir = str(tmp_path_factory.mktemp('cnn2_teacher'))
  cfg = tiny.get_config('ce')
  cfg.seed = 1
  cfg.phases.train.epochs = 2.0
  train.train_and_evaluate(cfg, workdir)
  return workdir


def _imported(workdir, num_classes, like):
  """A run as `kdjax.interop.torch_import` writes it: a default cnn2 with `num_classes` outputs, recording the input
  normalisation of the run `like`."""
  model = create_model('cnn2', num_classes=num_classes, image_shape=(8, 8, 1), rngs=nnx.Rngs(5))
  mean, std = export.recorded_normalization(like)
  return save_as_teacher_run(model, str(workdir), model_name='cnn2', source='test',
                             normalization=dict(mean=mean, std=std))


def _teacher(workdirs, name='cnn3'):
  """(logits on 64 test digits, stage channels) of the teacher that `load_teacher` builds for `workdirs`."""
  cfg = tiny.get_config('kd')
  cfg.teacher.workdir = ','.join(workdirs)
  cfg.teacher.name = name
  teacher, variables, channels = train.load_teacher(cfg, DIGITS, jnp.float32, mesh_lib.make_data_mesh())
  images = jnp.asarray(load_split('digits', 'test[:64]').images, jnp.float32) / 255.0
  logits, _ = teacher.forward(variables, images)
  return np.asarray(logits), channels


def test_ensemble_logits_are_the_mean_of_the_members(teacher_workdir, cnn2_teacher):
  cnn3, cnn3_channels = _teacher([teacher_workdir], 'cnn3')
  cnn2, cnn2_channels = _teacher([cnn2_teacher], 'cnn2')
  both, channels = _teacher([teacher_workdir, cnn2_teacher])  # each member's model comes from its own run
  assert not np.allclose(cnn3, cnn2, atol=1e-3)
  np.testing.assert_allclose(both, (cnn3 + cnn2) / 2, rtol=1e-6, atol=1e-6)
  assert channels == cnn3_channels  # the first member's features
  assert _teacher([cnn2_teacher, teacher_workdir])[1] == cnn2_channels


def test_kd_from_two_teacher_runs_end_to_end(tmp_path, teacher_workdir, cnn2_teacher):
  workdir = str(tmp_path / 'kd')
  run_main('--config', f'{TINY}:kd', '--workdir', workdir, f'--config.teacher.workdir={teacher_workdir},{cnn2_teacher}',
           '--config.phases.train.epochs=2', check=True)
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert 0.3 < summary['eval_agreement'] <= 1.0, summary


def test_missing_member_is_named(tmp_path, teacher_workdir):
  missing = str(tmp_path / 'not_trained')
  with pytest.raises(UserError) as info:
    _teacher([teacher_workdir, missing])
  message = str(info.value)
  assert f"teacher.workdir '{missing}' (ensemble member 2 of 2) does not exist" in message
  assert '\n' not in message


def test_members_with_other_class_counts_are_refused(tmp_path, teacher_workdir):
  five = _imported(tmp_path / 'five_classes', num_classes=5, like=teacher_workdir)
  with pytest.raises(UserError, match=f'different numbers of classes \\({teacher_workdir}: 10, {five}: 5\\)'):
    _teacher([teacher_workdir, five])


def test_each_member_architecture_comes_from_its_run(tmp_path, teacher_workdir):
  cfg = tiny.get_config('kd')
  cfg.teacher.name = 'mlp2'
  assert teachers.teacher_architecture(cfg, teacher_workdir) == ('cnn3', {'hidden': 16, 'dropout': 0.0})
  imported = _imported(tmp_path / 'imported', num_classes=10, like=teacher_workdir)
  assert teachers.teacher_architecture(cfg, imported) == ('cnn2', {})  # the name the import recorded
  bare = shutil.copytree(imported, tmp_path / 'bare')
  os.remove(bare / 'config.json')
  assert teachers.teacher_architecture(cfg, str(bare)) == ('mlp2', {})  # nothing recorded: teacher.name
  logits, _ = _teacher([teacher_workdir, imported])  # a trained cnn3 and an imported cnn2 together
  assert logits.shape == (64, 10) and np.isfinite(logits).all()


def _restore(workdirs, mean, std, name='cnn3'):
  cfg = tiny.get_config('kd')
  cfg.teacher.workdir = ','.join(workdirs)
  cfg.teacher.name = name
  return teachers.restore_teacher(cfg, num_classes=10, image_shape=(8, 8, 1), dtype=jnp.float32, mean=mean, std=std)


def test_the_teacher_sees_inputs_normalised_as_in_its_own_training(teacher_workdir):
  """Fed a student's inputs normalised with other statistics, the teacher gives the logits it gives on inputs
  normalised with its own run's statistics (data.json); with the same statistics it is the bare model."""
  mean, std = export.recorded_normalization(teacher_workdir)
  bare = _restore([teacher_workdir], mean, std)
  assert not isinstance(bare, teachers.InputRenormalized)
  pixels = jnp.asarray(load_split('digits', 'test[:64]').images, jnp.float32) / 255.0
  own = bare((pixels - jnp.asarray(mean)) / jnp.asarray(std), train=False)[0]
  other_mean, other_std = (0.3,), (0.7,)
  fed_other = _restore([teacher_workdir], other_mean, other_std)
  assert isinstance(fed_other, teachers.InputRenormalized) and fed_other.stage_channels == bare.stage_channels
  logits = fed_other((pixels - other_mean[0]) / other_std[0], train=False)[0]
  np.testing.assert_allclose(logits, own, rtol=1e-5, atol=1e-5)
  assert not np.allclose(bare((pixels - other_mean[0]) / other_std[0], train=False)[0], own, atol=1e-3)


def test_each_ensemble_member_sees_its_own_normalisation(tmp_path, teacher_workdir):
  """Members trained with other statistics (another slice, an import) are each fed as in their own training: the
  ensemble's logits are the mean of the members' renormalised logits."""
  other = shutil.copytree(teacher_workdir, tmp_path / 'other_data')
  with open(other / 'data.json') as f:
    data = json.load(f)
  data['mean'] = [m + 0.1 for m in data['mean']]
  with open(other / 'data.json', 'w') as f:
    json.dump(data, f)
  pixels = jnp.asarray(load_split('digits', 'test[:16]').images, jnp.float32) / 255.0
  logits = lambda workdirs: np.asarray(_restore(workdirs, (0.0,), (1.0,))(pixels, train=False)[0])
  alone, shifted = logits([teacher_workdir]), logits([str(other)])
  assert not np.allclose(alone, shifted, atol=1e-3)  # the same weights, fed differently
  np.testing.assert_allclose(logits([teacher_workdir, str(other)]), (alone + shifted) / 2, rtol=1e-5, atol=1e-5)


def test_a_teacher_of_another_channel_count_is_refused(tmp_path, teacher_workdir):
  rgb = _imported(tmp_path / 'rgb', num_classes=10, like=teacher_workdir)
  with open(os.path.join(rgb, 'config.json')) as f:
    info = json.load(f)
  info['normalization'] = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
  with open(os.path.join(rgb, 'config.json'), 'w') as f:
    json.dump(info, f)
  with pytest.raises(UserError, match='trained on 3-channel images, the data has 1'):
    _restore([rgb], (0.0,), (1.0,), name='cnn2')


def test_a_teacher_of_another_dataset_is_refused_before_its_checkpoint_is_read(tmp_path, teacher_workdir):
  """A 10-class digits teacher for 5-class data: the message says so, rather than that the checkpoint's shapes
  do not fit (which would send the user to the model settings)."""
  cfg = tiny.get_config('kd')
  cfg.teacher.workdir = teacher_workdir
  with pytest.raises(UserError, match=f'teacher run {teacher_workdir} learnt 10 classes, the data has 5'):
    teachers.restore_teacher(cfg, num_classes=5, image_shape=(8, 8, 1), dtype=jnp.float32, mean=(0.0,), std=(1.0,))
  with pytest.raises(UserError, match='trained on 1-channel images, the data has 3'):
    teachers.restore_teacher(cfg, num_classes=10, image_shape=(8, 8, 3), dtype=jnp.float32, mean=(0.0,) * 3,
                             std=(1.0,) * 3)
