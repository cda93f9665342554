"""The teacher-output cache: exact (looked-up logits and trained students equal the uncached ones), shared, refused
where it cannot be exact."""
import logging
import os

import jax
import numpy as np
import pytest
from flax import nnx

from kdjax import config as config_lib
from kdjax import mesh as mesh_lib
from kdjax import steps
from kdjax import teacher_cache
from kdjax import teachers
from kdjax import train
from kdjax.data import augment
from kdjax.data import loader
from kdjax.errors import UserError
from kdjax.models import create_model
from tests.test_train import final_variables
from tests.tiny_configs import tiny


def test_crop_flip_views_are_the_cifar_crop_and_flip():
  """Sampling view ids and applying them draws the same crops and flips as the pad-crop-flip pipeline."""
  images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
  rng = jax.random.key(5)
  crop_key, flip_key = jax.random.split(rng)
  by_hand = augment.random_flip(flip_key, augment.random_crop_with_padding(crop_key, augment._as_float(images)))
  pipeline = augment.AUGMENTATIONS['crop_flip']
  np.testing.assert_array_equal(pipeline(rng, images, image_size=8), by_hand)
  views = np.asarray(pipeline.sample(rng, 16))
  assert views.min() >= 0 and views.max() < pipeline.num_views == 162
  rendered = np.stack([pipeline.apply(augment._as_float(images[:1]), np.array([v]))[0] for v in range(162)])
  assert len({r.tobytes() for r in rendered}) == 162  # every view differs on a random image
  np.testing.assert_array_equal(rendered[(4 * 9 + 4) * 2], augment._as_float(images[0]))  # centred, unflipped


def _random_data_and_teacher(num_examples: int, seed: int):
  """A resident split of random 8x8 RGB images over the 8 devices, and a fresh cnn3 teacher replicated on them."""
  mesh = mesh_lib.make_data_mesh()
  rng = np.random.default_rng(seed)
  data = loader.ResidentDataset.from_arrays(rng.integers(0, 256, (num_examples, 8, 8, 3), dtype=np.uint8),
                                            rng.integers(0, 10, (num_examples,)), mesh)
  graphdef, variables = nnx.split(create_model('cnn3', num_classes=10, image_shape=(8, 8, 3), rngs=nnx.Rngs(0)))
  return data, steps.Teacher(graphdef), mesh_lib.replicate(variables, mesh)


def test_looked_up_logits_are_the_computed_ones():
  """On 8 devices, for several steps' keys and batches: the step's student sees exactly the views whose cached
  logits it looks up, and those equal the teacher on the step's augmented batch up to float32 rounding.

  Not bitwise: the same normalisation and convolutions compiled into two different XLA programs (the step's and the
  table's) round differently in the last bit (max relative difference seen: 5e-6 on logits; the normalised images
  themselves already differ by 1.5e-5 relative between a jitted and an eager evaluation).
  """
  data, teacher, variables = _random_data_and_teacher(72, seed=1)
  pipeline = augment.AUGMENTATIONS['crop_flip']
  preprocess = steps.Preprocess(
      augment=lambda r, x: pipeline(r, x, image_size=8),
      evaluate=lambda x: augment.eval_transform(x, image_size=8), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3),
      dtype=np.float32, image_size=8)
  table = teacher_cache.build_table(teacher, variables, data, pipeline, preprocess, 16)
  assert table.shape == (162, 72, 10)
  cached = teacher_cache.CachedTeacher(pipeline.sample)

  @jax.jit
  def step_side(variables, batch, key):
    images = preprocess.train(key, batch['image'])
    views = pipeline.sample(key, batch['index'].shape[0])
    return preprocess.augment(key, batch['image']), views, teacher.outputs(variables, images, batch, key)[0]

  device_table = mesh_lib.replicate(table, data.mesh)
  looked_up_fn = jax.jit(lambda table, batch, key: cached.outputs(table, None, batch, key)[0])
  for step in range(4):
    batch = data.train_batch(data.epoch_order(0, 0), step, 16)
    key = jax.random.fold_in(jax.random.key(3), step)
    augmented, views, computed = step_side(variables, batch, key)
    rows, views = np.asarray(batch['index']), np.asarray(views)
    # The student's images are these views: crops and flips move uint8 pixels, so this comparison is exact.
    np.testing.assert_array_equal(np.rint(np.asarray(augmented) * 255).astype(np.uint8),
                                  pipeline.apply(np.asarray(batch['image']), views))
    np.testing.assert_array_equal(np.asarray(looked_up_fn(device_table, batch, key)), table[views, rows])
    np.testing.assert_allclose(table[views, rows], np.asarray(computed), rtol=1e-5, atol=1e-6)


def _kd_config(teacher_workdir, cache_dir, cache):
  cfg = tiny.get_config('kd')
  cfg.teacher.workdir = teacher_workdir
  cfg.teacher.cache = cache
  cfg.data.augment = 'crop_flip'
  cfg.data.cache_dir = cache_dir
  cfg.phases.train.epochs = 2
  return cfg


@pytest.mark.long
def test_cached_kd_run_trains_the_same_student_and_shares_its_table(tmp_path, teacher_workdir, monkeypatch):
  cache_dir = str(tmp_path / 'cache')
  plain = train.train_and_evaluate(_kd_config(teacher_workdir, cache_dir, False), str(tmp_path / 'plain'))
  cached = train.train_and_evaluate(_kd_config(teacher_workdir, cache_dir, True), str(tmp_path / 'cached'))
  a, b = final_variables(str(tmp_path / 'plain')), final_variables(str(tmp_path / 'cached'))
  assert a.keys() == b.keys() and int(a['step']) > 20
  for key in a:  # the tolerance of the 8-vs-1-device test: the logits differ only in float32 rounding
    np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=2e-5, err_msg=key)
  assert abs(cached['eval_top1'] - plain['eval_top1']) < 0.01

  def no_rebuild(*args, **kwargs):
    raise AssertionError('the table of an identical teacher and data was rebuilt instead of loaded')
  monkeypatch.setattr(teacher_cache, 'build_table', no_rebuild)
  cfg = _kd_config(teacher_workdir, cache_dir, True)
  cfg.seed = 1  # another seed of the same experiment: same teacher, same data, same table
  cfg.phases.train.epochs = 0.25  # the table is looked up before the first step: a few steps show it is loaded
  train.train_and_evaluate(cfg, str(tmp_path / 'seed1'))


@pytest.mark.parametrize('change, message', [
    (dict(augment='random_resized_crop'), 'data.augment=random_resized_crop'),
    (dict(feature=True), 'phases.train.losses.hint'),
])
def test_cache_is_refused_where_it_cannot_be_exact(teacher_workdir, change, message):
  cfg = tiny.get_config('kd')
  cfg.teacher.workdir = teacher_workdir
  cfg.teacher.cache = True
  if 'augment' in change:
    cfg.data.augment = change['augment']
  if change.get('feature'):
    cfg.phases.train.losses.hint = config_lib.loss_term('feature_mse')
  with pytest.raises(UserError, match='teacher.cache') as error:
    config_lib.validate(cfg, jax.device_count())
  assert message in str(error.value) and 'set --config.teacher.cache=False' in str(error.value)


def test_table_key_follows_the_teachers_structure_and_skips_its_rng_keys():
  """A teacher with dropout (RNG keys among its variables) gets a key; the same weights behind another input
  normalisation, which gives other logits, get another key; rebuilding the same teacher gives the same key."""
  mesh = mesh_lib.make_data_mesh()
  rng = np.random.default_rng(0)
  data = loader.ResidentDataset.from_arrays(rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
                                            rng.integers(0, 10, (16,)), mesh)
  preprocess = steps.Preprocess(augment=None, evaluate=None, mean=(0.5,) * 3, std=(0.25,) * 3, dtype=np.float32,
                                image_size=8)

  def key_of(recorded):
    model = create_model('cnn2', num_classes=10, image_shape=(8, 8, 3), rngs=nnx.Rngs(0), hidden=16, dropout=0.5)
    graphdef, variables = nnx.split(teachers.renormalized(model, recorded, preprocess.mean, preprocess.std))
    assert any(jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) for leaf in jax.tree.leaves(variables))
    return teacher_cache.table_key(steps.Teacher(graphdef), mesh_lib.replicate(variables, mesh), data, 'flip',
                                   preprocess, 16)

  own = key_of(None)
  assert key_of(None) == own
  assert key_of(((0.4,) * 3, (0.2,) * 3)) != own


def _flip_table_loader(cache_dir):
  """A call that loads (or builds) the flip table of a small random teacher and data in `cache_dir`."""
  data, teacher, variables = _random_data_and_teacher(16, seed=2)
  preprocess = steps.Preprocess(
      augment=None, evaluate=lambda x: augment.eval_transform(x, image_size=8), mean=(0.5,) * 3, std=(0.25,) * 3,
      dtype=np.float32, image_size=8)
  return lambda: teacher_cache.load_or_build(teacher, variables, data, 'flip', preprocess, 8, cache_dir)


def test_the_table_is_loaded_only_where_every_process_has_it(tmp_path, monkeypatch):
  """A per-host cache dir may hold the table on some hosts only. Building runs collectives, so when any process
  lacks the table every process builds it (the other processes' answer is simulated here)."""
  load = _flip_table_loader(str(tmp_path))
  built, build = [], teacher_cache.build_table

  def counted(*args):
    built.append(1)
    return build(*args)
  monkeypatch.setattr(teacher_cache, 'build_table', counted)
  _, first = load()
  assert len(built) == 1
  load()
  assert len(built) == 1  # every process (the only one) has it: loaded
  answers = []
  monkeypatch.setattr(mesh_lib, 'all_processes', lambda ok: answers.append(ok) or False)  # another host lacks it
  _, rebuilt = load()
  assert answers == [True] and len(built) == 2
  np.testing.assert_array_equal(np.asarray(rebuilt), np.asarray(first))


def test_an_unreadable_table_is_rebuilt_with_a_warning(tmp_path, caplog):
  """A saved table damaged on disk is not loaded, nor a crash: the run builds the table (the same one) and says
  which file to delete."""
  load = _flip_table_loader(str(tmp_path))
  _, first = load()
  [path] = [os.path.join(root, name) for root, _, names in os.walk(tmp_path) for name in names if name == 'logits.npy']
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  with caplog.at_level(logging.WARNING):
    _, rebuilt = load()
  assert f'{path} cannot be read' in caplog.text
  np.testing.assert_array_equal(np.asarray(rebuilt), np.asarray(first))
