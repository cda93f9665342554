"""Tests for the model registry and the model contract the trainer relies on.

Shape/dtype checks run under `nnx.eval_shape` / `jax.eval_shape` (tracing only, no FLOPs), so every registered model
is covered in both float32 and bfloat16 quickly; numerical checks (BatchNorm updates, jit round-trip) use real
small models on tiny inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.errors import UserError
from kdjax.models import MODELS, ClassifierHead, create_model, register_model
from kdjax.models import registry

NUM_CLASSES = 10

_IMAGENET_FEATURES = ((32, 32), (16, 16), (8, 8), (4, 4), (2, 2))  # 64x64 input: stem /2, then /2 /2 /2 /2
_CIFAR_FEATURES = ((32, 32), (32, 32), (16, 16), (8, 8), (4, 4))  # 32x32 input: stem /1, then /1 /2 /2 /2
_VGG_FEATURES = ((16, 16), (8, 8), (4, 4), (2, 2), (1, 1))  # 32x32 input, pool after every stage

# name -> (input H = W, expected spatial size of each feature (None for vector features), expected stage_channels)
EXPECTED = {
  'resnet18': (64, _IMAGENET_FEATURES, (64, 64, 128, 256, 512)),
  'resnet34': (64, _IMAGENET_FEATURES, (64, 64, 128, 256, 512)),
  'resnet50': (64, _IMAGENET_FEATURES, (64, 256, 512, 1024, 2048)),
  'resnet18_cifar': (32, _CIFAR_FEATURES, (64, 64, 128, 256, 512)),
  'resnet34_cifar': (32, _CIFAR_FEATURES, (64, 64, 128, 256, 512)),
  'resnet34_medium': (64, _IMAGENET_FEATURES, (64, 48, 96, 192, 384)),
  'resnet34_small': (64, _IMAGENET_FEATURES, (32, 32, 64, 128, 256)),
  'plain34_smallest': (64, _IMAGENET_FEATURES, (64, 64, 128, 256, 512)),
  'vgg16_bn': (32, _VGG_FEATURES, (64, 128, 256, 512, 512)),
  'vgg19_bn': (32, _VGG_FEATURES, (64, 128, 256, 512, 512)),
  'cnn2': (32, ((16, 16), (8, 8)), (32, 64)),
  'cnn3': (32, ((16, 16), (8, 8), (4, 4)), (32, 64, 128)),
  'mlp2': (32, (None, None), (512, 512)),
}


@functools.cache
def _abstract(name, dtype=jnp.float32, size=None):
  """Builds `name` without allocating parameters and traces one eval forward pass on a (2, H, W, 3) batch."""
  size = size or EXPECTED[name][0]
  model = nnx.eval_shape(lambda: create_model(
    name, num_classes=NUM_CLASSES, image_shape=(size, size, 3), rngs=nnx.Rngs(0), dtype=dtype))
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  logits, features = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, train=False), state, x)
  return model, logits, features


def _num_params(model):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _param_paths(model):
  return [path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]


@functools.cache
def _real(name, size, dtype=jnp.float32):
  """A real model; cached because eager init dominates test time (tests only compare states within themselves)."""
  return create_model(name, num_classes=NUM_CLASSES, image_shape=(size, size, 3), rngs=nnx.Rngs(0), dtype=dtype)


def _snapshot(model, kind):
  """Copies of the `kind` variables' current values (the state returned by `nnx.state` tracks later updates)."""
  return jax.tree.map(np.array, nnx.state(model, kind))


def _batch(size, n=2, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3), jnp.float32)


def test_expected_table_covers_registry():
  assert set(EXPECTED) <= set(MODELS)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_model_contract(name, dtype):
  size, spatial, channels = EXPECTED[name]
  model, logits, features = _abstract(name, dtype)

  assert logits.shape == (2, NUM_CLASSES)
  assert logits.dtype == jnp.float32
  assert isinstance(features, tuple)
  assert len(features) == len(model.stages) == len(model.stage_channels)
  assert tuple(model.stage_channels) == channels
  for feature, hw, ch in zip(features, spatial, channels):
    expected_shape = (2, ch) if hw is None else (2, *hw, ch)
    assert feature.shape == expected_shape
    assert feature.dtype == dtype
  assert isinstance(model.head, ClassifierHead)

  # Parameters stay float32 whatever the compute dtype, and live only under stages/head (the freezing contract).
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert params and all(p.dtype == jnp.float32 for p in params)
  for path in _param_paths(model):
    assert path[0] in ('stages', 'head'), path
    if path[0] == 'stages':
      assert isinstance(path[1], int) and 0 <= path[1] < len(model.stages), path


@pytest.mark.parametrize('name', ['resnet8', 'cnn2'])
def test_bf16_models_compute_their_logits_in_float32(name):
  """The classifier's last Linear runs in float32: logits rounded to bfloat16 would tie and blur what the KD losses
  compare. Most float32 logits are not bfloat16 values; all of them were when the head ran in bfloat16."""
  model = create_model(name, num_classes=100, image_shape=(16, 16, 3), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3), jnp.bfloat16)
  graphdef, state = nnx.split(model)  # jitted, as in the train step (eager, each op compiles alone: 12 s)
  logits = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False)[0])(state, images))
  rounded = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
  assert logits.dtype == np.float32 and np.mean(logits == rounded) < 0.2


@pytest.mark.parametrize('name', ['resnet34_medium', 'resnet34_small', 'plain34_smallest'])
def test_resnet34_students_match_teacher_stages(name):
  teacher, _, teacher_features = _abstract('resnet34')
  student, _, student_features = _abstract(name)
  assert len(student_features) == len(teacher_features) == 5
  for s, t in zip(student_features, teacher_features):
    assert s.shape[:3] == t.shape[:3]
  assert _num_params(student) < _num_params(teacher)
  if name == 'plain34_smallest':
    assert student.stage_channels == teacher.stage_channels
    assert not any('downsample_conv' in path for path in _param_paths(student))  # no skips -> no projections


def test_resnet34_medium_is_about_a_third_of_resnet34():
  ratio = _num_params(_abstract('resnet34_medium')[0]) / _num_params(_abstract('resnet34')[0])
  assert 0.25 < ratio < 0.4


def test_torchvision_parameter_counts():
  """ImageNet ResNets with 1000 classes have torchvision's exact parameter counts (so a weight port can be 1:1)."""
  def count(name):
    return _num_params(nnx.eval_shape(
      lambda: create_model(name, num_classes=1000, image_shape=(224, 224, 3), rngs=nnx.Rngs(0))))

  counts = {name: count(name) for name in ('resnet18', 'resnet34', 'resnet50')}
  assert counts == {'resnet18': 11_689_512, 'resnet34': 21_797_672, 'resnet50': 25_557_032}


def test_resnet_parameter_names_follow_torchvision():
  paths = {'/'.join(map(str, p)) for p in _param_paths(_abstract('resnet34')[0])}
  for expected in ('stages/0/conv/kernel', 'stages/0/bn/scale', 'stages/1/blocks/0/conv1/kernel',
                   'stages/1/blocks/2/bn2/bias', 'stages/2/blocks/0/downsample_conv/kernel',
                   'stages/2/blocks/0/downsample_bn/scale', 'head/fc/kernel', 'head/fc/bias'):
    assert expected in paths
  assert 'stages/1/blocks/0/downsample_conv/kernel' not in paths  # layer1 keeps shape: identity shortcut


def test_batch_stats_update_only_in_train_mode():
  model = _real('resnet34_small', 32)
  x = _batch(32)
  before = _snapshot(model, nnx.BatchStat)
  assert jax.tree.leaves(before)

  model(x, train=False)
  jax.tree.map(np.testing.assert_array_equal, before, _snapshot(model, nnx.BatchStat))

  model(x, train=True)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, _snapshot(model, nnx.BatchStat))
  assert all(jax.tree.leaves(changed))


def test_eval_mode_is_deterministic_and_train_mode_uses_batch_stats():
  model = _real('resnet34_small', 32)
  x = _batch(32)
  a, _ = model(x, train=False)
  b, _ = model(x, train=False)
  np.testing.assert_array_equal(a, b)
  c, _ = model(x, train=True)
  assert not np.allclose(a, c)


def test_dropout_active_only_in_train_mode():
  model = _real('cnn2', 16)
  x = _batch(16)
  e1, _ = model(x, train=False)
  e2, _ = model(x, train=False)
  np.testing.assert_array_equal(e1, e2)
  t1, _ = model(x, train=True)
  t2, _ = model(x, train=True)
  assert not np.allclose(t1, t2)  # the dropout RNG state advances between calls


@pytest.mark.parametrize('name,size,dtype', [
  ('resnet34_small', 32, jnp.float32),
  ('cnn3', 16, jnp.bfloat16),
  ('mlp2', 8, jnp.float32),
])
def test_jit_round_trip_matches_eager(name, size, dtype):
  """Numerical check on one model per family; every model's split/merge tracing is covered by the contract test."""
  model = _real(name, size, dtype)
  x = _batch(size)
  eager_logits, eager_features = model(x, train=False)

  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, x):
    return nnx.merge(graphdef, state)(x, train=False)

  logits, features = forward(state, x)
  assert logits.dtype == jnp.float32 and features[-1].dtype == dtype
  # XLA may fuse bf16 ops differently under jit, so bf16 only has to agree to bf16 precision.
  tol = dict(rtol=1e-4, atol=1e-5) if dtype == jnp.float32 else dict(rtol=3e-2, atol=3e-2)
  np.testing.assert_allclose(logits, eager_logits, **tol)
  assert len(features) == len(eager_features)
  np.testing.assert_allclose(features[-1].astype(jnp.float32), eager_features[-1].astype(jnp.float32), **tol)


def test_jit_train_step_with_param_split_returns_updated_batch_stats():
  """The trainer's pattern: split params from the rest, run train=True inside jit, hand back the new stats."""
  model = _real('resnet34_small', 32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def step(params, rest, x):
    m = nnx.merge(graphdef, params, rest)
    logits, features = m(x, train=True)
    return logits, features, nnx.state(m, nnx.Not(nnx.Param))

  logits, features, new_rest = step(params, rest, _batch(32))
  assert logits.shape == (2, NUM_CLASSES) and len(features) == 5
  assert jax.tree.structure(new_rest) == jax.tree.structure(rest)
  old_stats = jax.tree.leaves(_snapshot(model, nnx.BatchStat))
  new_stats = jax.tree.leaves(nnx.state(nnx.merge(graphdef, params, new_rest), nnx.BatchStat))
  assert all(new.dtype == jnp.float32 for new in new_stats)
  assert any(not np.array_equal(a, b) for a, b in zip(old_stats, new_stats))


def test_unknown_model_lists_choices():
  with pytest.raises(UserError) as err:
    create_model('resnet1000', num_classes=10, image_shape=(32, 32, 3), rngs=nnx.Rngs(0))
  message = str(err.value)
  assert "'resnet1000'" in message
  for name in MODELS:
    assert name in message


def test_unknown_arch_kwarg_is_user_error():
  with pytest.raises(UserError, match='widht'):
    create_model('resnet18', num_classes=10, image_shape=(32, 32, 3), rngs=nnx.Rngs(0), widht=3)


def test_arch_kwargs_override_variant_defaults():
  model = nnx.eval_shape(lambda: create_model(
    'resnet18', num_classes=10, image_shape=(32, 32, 3), rngs=nnx.Rngs(0), widths=(8, 16, 32, 64)))
  assert model.stage_channels == (64, 8, 16, 32, 64)


@pytest.mark.parametrize('image_shape', [(32, 32), (0, 32, 3), (32.0, 32, 3)])
def test_bad_image_shape_is_user_error(image_shape):
  with pytest.raises(UserError, match='image_shape'):
    create_model('cnn2', num_classes=10, image_shape=image_shape, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('name,size', [('vgg16_bn', 16), ('cnn3', 4)])
def test_too_small_image_is_user_error(name, size):
  with pytest.raises(UserError):
    nnx.eval_shape(lambda: create_model(name, num_classes=10, image_shape=(size, size, 3), rngs=nnx.Rngs(0)))


def test_register_model(monkeypatch):
  monkeypatch.setattr(registry, 'MODELS', dict(registry.MODELS))
  monkeypatch.setattr(registry, '_ORIGINS', dict(registry._ORIGINS))

  @register_model('tiny_mlp')
  def tiny_mlp(**kwargs):
    return registry.MODELS['mlp2'](hidden=4, **kwargs)

  model = create_model('tiny_mlp', num_classes=3, image_shape=(2, 2, 1), rngs=nnx.Rngs(0))
  assert model.stage_channels == (4, 4)
  # The same file registering it again (a config file run twice) replaces it; another file may not.
  wider = lambda **kwargs: registry.MODELS['mlp2'](hidden=6, **kwargs)
  register_model('tiny_mlp', wider)
  assert registry.MODELS['tiny_mlp'] is wider
  with pytest.raises(ValueError, match="'tiny_mlp' is registered twice: in .*test_models.py and in other_plugin.py"):
    exec(compile("register_model('tiny_mlp', f)", 'other_plugin.py', 'exec'),
         {'register_model': register_model, 'f': tiny_mlp})
  with pytest.raises(ValueError, match="'cnn2' is registered twice"):
    register_model('cnn2', tiny_mlp)
