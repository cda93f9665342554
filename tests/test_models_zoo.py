"""Tests for the CIFAR model zoo of the distillation benchmarks (CIFAR ResNets, WRNs, ResNet-164, VGG, ShuffleNet V2)
and for the ensemble wrapper.

Shapes and parameter counts of the large models are checked under `nnx.eval_shape` / `jax.eval_shape` (no FLOPs);
real forward passes use the smallest models on tiny inputs. Parameter counts are checked three ways:

* exactly, against torchvision's published `num_params` (ShuffleNet V2; the VGG-BN backbones) and the widely
  reproduced exact WRN-28-10 count, which pin the block structure;
* at the printed precision of the papers' tables (He et al. 2016 Table 6; He et al. 2016b; Zagoruyko & Komodakis
  2016 Table 4), which are for 10 classes and, for the CIFAR ResNets, zero-padding shortcuts;
* exactly, against a closed-form count written from the architecture descriptions (CIFAR ResNets with projection
  shortcuts, pre-activation WRNs, VGG-8), for the 100-class models of the CIFAR-100 distillation tables.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.errors import UserError
from kdjax.models import MODELS, ClassifierHead, create_model
from kdjax.models.ensemble import Ensemble
from kdjax.models.shufflenet import channel_shuffle

NUM_CLASSES = 100

_RESNET = ((32, 32), (32, 32), (16, 16), (8, 8))  # stem, then stages at /1 /2 /4
_VGG = ((32, 32), (16, 16), (8, 8), (4, 4), (4, 4))  # features before the pools; no pool before the last stage
_SHUFFLE = ((32, 32), (16, 16), (8, 8), (4, 4), (4, 4))  # CIFAR stem, three downsampling stages, final 1x1 conv

# name -> (spatial size of each feature for a 32x32 input, stage_channels)
ZOO = {
  'resnet8': (_RESNET, (16, 16, 32, 64)),
  'resnet14': (_RESNET, (16, 16, 32, 64)),
  'resnet20': (_RESNET, (16, 16, 32, 64)),
  'resnet32': (_RESNET, (16, 16, 32, 64)),
  'resnet44': (_RESNET, (16, 16, 32, 64)),
  'resnet56': (_RESNET, (16, 16, 32, 64)),
  'resnet110': (_RESNET, (16, 16, 32, 64)),
  'resnet8x4': (_RESNET, (32, 64, 128, 256)),
  'resnet32x4': (_RESNET, (32, 64, 128, 256)),
  'wrn_16_1': (_RESNET, (16, 16, 32, 64)),
  'wrn_16_2': (_RESNET, (16, 32, 64, 128)),
  'wrn_40_1': (_RESNET, (16, 16, 32, 64)),
  'wrn_40_2': (_RESNET, (16, 32, 64, 128)),
  'resnet164': (_RESNET, (16, 64, 128, 256)),
  'vgg8': (_VGG, (64, 128, 256, 512, 512)),
  'vgg11': (_VGG, (64, 128, 256, 512, 512)),
  'vgg13': (_VGG, (64, 128, 256, 512, 512)),
  'shufflenet_v2': (_SHUFFLE, (24, 116, 232, 464, 1024)),
}


@functools.cache
def _abstract(name, num_classes=NUM_CLASSES, size=32, dtype=jnp.float32, kwargs=()):
  """(abstract model, abstract logits, abstract features) for a (2, size, size, 3) batch, without any FLOPs."""
  model = nnx.eval_shape(lambda: create_model(name, num_classes=num_classes, image_shape=(size, size, 3),
                                              rngs=nnx.Rngs(0), dtype=dtype, **dict(kwargs)))
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  logits, features = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, train=False), state, x)
  return model, logits, features


@functools.cache
def _count(name, num_classes=NUM_CLASSES, size=32, kwargs=()):
  """Parameter count, building the model abstractly (no forward pass).

  Without architecture kwargs the count is derived from the cached 100-class model of the contract test: every zoo
  head is avg-pool + Linear(stage_channels[-1], num_classes), so only the Linear changes with the class count.
  """
  if not kwargs and size == 32:
    model = _abstract(name)[0]
    return _num_params(model) + (num_classes - NUM_CLASSES) * (model.stage_channels[-1] + 1)
  model = nnx.eval_shape(lambda: create_model(name, num_classes=num_classes, image_shape=(size, size, 3),
                                              rngs=nnx.Rngs(0), **dict(kwargs)))
  return _num_params(model)


def _num_params(model):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _batch(size, n=2, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3), jnp.float32)


def _real(name, size, num_classes=10, seed=0, **kwargs):
  """A concrete model whose variables are drawn by NumPy instead of the models' JAX initialisers.

  Eager JAX initialisation compiles each initialiser once per new parameter shape (1-2 s apiece on CPU), which would
  dominate this file; these tests need finite, seed-dependent values of a sane scale, not the exact initialisers
  (those run, traced, in every `nnx.eval_shape` above). Kernels are He-normal over their fan-in, biases and BN
  shifts 0, BN scales 1, running means 0 and variances 1.
  """
  model = nnx.eval_shape(lambda: create_model(name, num_classes=num_classes, image_shape=(size, size, 3),
                                              rngs=nnx.Rngs(seed), **kwargs))
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    var.set_value(_fill(path[-1], var, rng, seed))
  return model


def _fill(name, var, rng, seed):
  shape, dtype = var.get_value().shape, var.get_value().dtype
  if isinstance(var, nnx.RngKey):
    return jax.random.key(seed)
  if name == 'kernel':
    return jnp.asarray(rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1])), dtype)
  if name in ('scale', 'var'):
    return jnp.ones(shape, dtype)
  if name in ('bias', 'mean', 'count'):
    return jnp.zeros(shape, dtype)
  raise AssertionError(f'no fill rule for variable {name!r} ({type(var).__name__})')


# ---------------------------------------------------------------------------------------------------- contract


def test_every_registered_model_is_covered():
  """Every registry entry is in this file's table, in test_models.py's (which predates the zoo) or is 'ensemble'."""
  from tests.test_models import EXPECTED  # pylint: disable=import-outside-toplevel
  assert not set(ZOO) & set(EXPECTED)
  assert set(ZOO) | set(EXPECTED) | {'ensemble'} == set(MODELS)


@pytest.mark.parametrize('name', sorted(ZOO))
def test_zoo_contract(name):
  spatial, channels = ZOO[name]
  model, logits, features = _abstract(name)

  assert logits.shape == (2, NUM_CLASSES) and logits.dtype == jnp.float32
  assert isinstance(features, tuple)
  assert len(features) == len(model.stages) == len(model.stage_channels)
  assert tuple(model.stage_channels) == channels
  for feature, hw, ch in zip(features, spatial, channels):
    assert feature.shape == (2, *hw, ch)
    assert feature.dtype == jnp.float32
  assert isinstance(model.head, ClassifierHead)

  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  assert params
  for path, param in params:
    assert param.get_value().dtype == jnp.float32
    assert path[0] in ('stages', 'head'), path
    if path[0] == 'stages':
      assert isinstance(path[1], int) and 0 <= path[1] < len(model.stages), path
  # Every BatchNorm follows the shared PyTorch-compatible settings.
  norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
  assert norms and all(bn.momentum == 0.9 and bn.epsilon == 1e-5 for bn in norms)


@pytest.mark.parametrize('name', ['resnet8', 'wrn_16_1', 'vgg8', 'shufflenet_v2'])
def test_bfloat16_compute_keeps_float32_logits_and_params(name):
  model, logits, features = _abstract(name, dtype=jnp.bfloat16)
  assert logits.dtype == jnp.float32
  assert all(f.dtype == jnp.bfloat16 for f in features)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_repdistiller_vgg_pools_before_the_last_stage_only_for_64px_inputs():
  """RepDistiller's VGG applies its fourth max-pool only to 64 px inputs, so both sizes end in a 4x4 map."""
  _, _, features = _abstract('vgg13', size=64)
  assert [f.shape[1] for f in features] == [64, 32, 16, 8, 4]


def test_vgg_layouts_keep_the_torchvision_variants_unchanged():
  _, _, features = _abstract('vgg16_bn')
  assert [f.shape[1] for f in features] == [16, 8, 4, 2, 1]  # feature after each pool
  with pytest.raises(UserError, match='layout'):
    create_model('vgg13', num_classes=10, image_shape=(32, 32, 3), rngs=nnx.Rngs(0), layout='nope')
  with pytest.raises(UserError, match='8x8'):
    nnx.eval_shape(lambda: create_model('vgg8', num_classes=10, image_shape=(4, 4, 3), rngs=nnx.Rngs(0)))


@pytest.mark.parametrize('width,channels', [(0.5, (24, 48, 96, 192, 1024)), (2.0, (24, 244, 488, 976, 2048))])
def test_shufflenet_width_multiplier(width, channels):
  model, logits, features = _abstract('shufflenet_v2', kwargs=(('width', width),))
  assert model.stage_channels == channels
  assert tuple(f.shape[-1] for f in features) == channels and logits.shape == (2, NUM_CLASSES)


def test_shufflenet_bad_width_is_user_error():
  with pytest.raises(UserError, match='width'):
    create_model('shufflenet_v2', num_classes=10, image_shape=(32, 32, 3), rngs=nnx.Rngs(0), width=0.75)


def test_channel_shuffle_matches_the_grouped_transpose():
  """Channel c of group g moves to position c * groups + g (the paper's reshape-transpose-flatten)."""
  x = jnp.arange(8.0).reshape(1, 1, 1, 8)
  np.testing.assert_array_equal(channel_shuffle(x, 2)[0, 0, 0], [0, 4, 1, 5, 2, 6, 3, 7])


# ---------------------------------------------------------------------------------------------------- parameter counts

# Exact counts published by torchvision (`num_params` of its weight enums; the ImageNet stem and 1000 classes). The
# ShuffleNet V2 units are the paper's, so matching these pins every branch, BN and depthwise conv.
_TORCHVISION_SHUFFLENET = {0.5: 1_366_792, 1.0: 2_278_604, 1.5: 3_503_624, 2.0: 7_393_996}


@pytest.mark.parametrize('width', sorted(_TORCHVISION_SHUFFLENET))
def test_shufflenet_matches_torchvision_parameter_count(width):
  kwargs = (('stem', 'imagenet'), ('width', width))
  assert _count('shufflenet_v2', num_classes=1000, size=224, kwargs=kwargs) == _TORCHVISION_SHUFFLENET[width]


# torchvision vgg11_bn / vgg13_bn `num_params` minus their 25088-4096-4096-1000 classifier = the BN backbone, which our
# CIFAR VGGs share; they replace the classifier by Linear(512, num_classes).
_TORCHVISION_VGG_BN = {'vgg11': 132_868_840, 'vgg13': 133_053_736}
_TORCHVISION_VGG_CLASSIFIER = (25088 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000)


@pytest.mark.parametrize('name', sorted(_TORCHVISION_VGG_BN))
def test_vgg_backbone_matches_torchvision(name):
  backbone = _TORCHVISION_VGG_BN[name] - _TORCHVISION_VGG_CLASSIFIER
  assert _count(name) == backbone + 512 * NUM_CLASSES + NUM_CLASSES


def test_wrn_28_10_exact_count():
  """WRN-28-10 for 10 classes has 36,479,194 parameters (the reference WRN; Zagoruyko & Komodakis print 36.5M)."""
  kwargs = (('block_counts', (4, 4, 4)), ('widths', (160, 320, 640)))
  assert _count('wrn_16_2', num_classes=10, kwargs=kwargs) == 36_479_194


# (model, arch kwargs, classes, published millions, printed decimals, source). The CIFAR ResNet figures are for
# zero-padding shortcuts; ours project with 1x1 conv + BN as the distillation benchmarks do (+~0.003-0.006M), hence
# the 1% slack on top of the printed rounding.
_PUBLISHED = [
  ('resnet20', (), 10, 0.27, 2, 'He et al. 2016, Table 6'),
  ('resnet32', (), 10, 0.46, 2, 'He et al. 2016, Table 6'),
  ('resnet44', (), 10, 0.66, 2, 'He et al. 2016, Table 6'),
  ('resnet56', (), 10, 0.85, 2, 'He et al. 2016, Table 6'),
  ('resnet110', (), 10, 1.7, 1, 'He et al. 2016, Table 6'),
  ('resnet164', (), 10, 1.7, 1, 'He et al. 2016b (identity mappings), Table 3'),
  ('wrn_40_1', (), 10, 0.6, 1, 'Zagoruyko & Komodakis 2016, Table 4'),
  ('wrn_40_2', (), 10, 2.2, 1, 'Zagoruyko & Komodakis 2016, Table 4'),
  ('wrn_16_2', (('widths', (128, 256, 512)),), 10, 11.0, 1, 'Zagoruyko & Komodakis 2016, Table 4 (WRN-16-8)'),
]


@pytest.mark.parametrize('name,kwargs,classes,millions,decimals,source', _PUBLISHED,
                         ids=[f'{p[0]}-{p[3]}M' for p in _PUBLISHED])
def test_parameter_counts_match_papers(name, kwargs, classes, millions, decimals, source):
  count = _count(name, num_classes=classes, kwargs=kwargs) / 1e6
  assert abs(count - millions) <= 0.5 * 10 ** -decimals + 0.01 * millions, (source, count)


def _cifar_resnet_count(depth, stem, widths, classes):
  """Closed form for He et al.'s CIFAR ResNet with BasicBlocks and 1x1 conv + BN projections where shape changes."""
  n = (depth - 2) // 6
  total, in_ch = 27 * stem + 2 * stem, stem  # 3x3x3 stem conv + BN
  for i, width in enumerate(widths):
    for b in range(n):
      total += 9 * in_ch * width + 9 * width * width + 4 * width  # two 3x3 convs + two BNs
      if b == 0 and (i > 0 or in_ch != width):
        total += in_ch * width + 2 * width  # projection conv + BN
      in_ch = width
  return total + in_ch * classes + classes


def _wrn_count(depth, k, classes):
  """Closed form for a pre-activation WRN: BN-ReLU-conv x2 per unit, 1x1 projection (no BN) where shape changes,
  one BN after the last unit."""
  n = (depth - 4) // 6
  total, in_ch = 27 * 16, 16
  for width in (16 * k, 32 * k, 64 * k):
    for _ in range(n):
      total += 2 * in_ch + 9 * in_ch * width + 2 * width + 9 * width * width
      if in_ch != width:
        total += in_ch * width
      in_ch = width
  return total + 2 * in_ch + in_ch * classes + classes


# The 100-class models of the CIFAR-100 distillation tables (CRD/RepDistiller, DKD/mdistiller).
_CIFAR100 = {
  'resnet8': _cifar_resnet_count(8, 16, (16, 32, 64), 100),
  'resnet14': _cifar_resnet_count(14, 16, (16, 32, 64), 100),
  'resnet20': _cifar_resnet_count(20, 16, (16, 32, 64), 100),
  'resnet32': _cifar_resnet_count(32, 16, (16, 32, 64), 100),
  'resnet44': _cifar_resnet_count(44, 16, (16, 32, 64), 100),
  'resnet56': _cifar_resnet_count(56, 16, (16, 32, 64), 100),
  'resnet110': _cifar_resnet_count(110, 16, (16, 32, 64), 100),
  'resnet8x4': _cifar_resnet_count(8, 32, (64, 128, 256), 100),
  'resnet32x4': _cifar_resnet_count(32, 32, (64, 128, 256), 100),
  'wrn_16_1': _wrn_count(16, 1, 100),
  'wrn_16_2': _wrn_count(16, 2, 100),
  'wrn_40_1': _wrn_count(40, 1, 100),
  'wrn_40_2': _wrn_count(40, 2, 100),
}


@pytest.mark.parametrize('name', sorted(_CIFAR100))
def test_cifar100_parameter_counts_match_the_architecture_description(name):
  assert _count(name) == _CIFAR100[name]


def _vgg_count(config, classes):
  """Closed form for the CIFAR VGG-BN: conv3x3 with bias + BN per layer, then Linear(512, classes)."""
  total, in_ch = 0, 3
  for width in (w for stage in config for w in stage):
    total += 9 * in_ch * width + width + 2 * width
    in_ch = width
  return total + in_ch * classes + classes


def test_cifar100_vgg8_and_shufflenet_counts():
  """vgg8 has no torchvision twin, so it is checked against the closed form; the CIFAR ShuffleNet V2 differs from
  torchvision's only in the stem stride/pool (no parameters) and the classifier size."""
  assert _count('vgg8') == _vgg_count(((64,), (128,), (256,), (512,), (512,)), 100) == 3_965_028
  fc_difference = (1024 * 1000 + 1000) - (1024 * NUM_CLASSES + NUM_CLASSES)
  assert _count('shufflenet_v2') == _TORCHVISION_SHUFFLENET[1.0] - fc_difference == 1_356_104


# ---------------------------------------------------------------------------------------------------- real passes


@pytest.mark.parametrize('name', ['resnet8', 'wrn_16_1'])
def test_real_forward_updates_batch_stats_only_in_train_mode(name):
  model = _real(name, 16)
  x = _batch(16)
  before = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
  logits, features = model(x, train=False)
  assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
  assert len(features) == len(model.stages)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, nnx.state(model, nnx.BatchStat)))
  model(x, train=True)
  after = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)))


def test_jit_round_trip_matches_eager():
  model = _real('wrn_16_1', 16)
  x = _batch(16)
  eager, eager_features = model(x, train=False)
  graphdef, state = nnx.split(model)
  jitted, features = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False))(state, x)
  np.testing.assert_allclose(jitted, eager, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(features[1], eager_features[1], rtol=1e-4, atol=1e-5)


def test_shufflenet_real_pass_under_jit():
  """Depthwise convs, split/concat and shuffles run numerically; train mode moves every BatchNorm's statistics."""
  model = _real('shufflenet_v2', 16, width=0.5)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def forward(params, rest, x):
    m = nnx.merge(graphdef, params, rest)
    eval_logits, features = m(x, train=False)
    train_logits, _ = m(x, train=True)
    return eval_logits, train_logits, features, nnx.state(m, nnx.BatchStat)

  eval_logits, train_logits, features, stats = forward(params, rest, _batch(16))
  assert bool(jnp.all(jnp.isfinite(eval_logits))) and not np.allclose(eval_logits, train_logits)
  assert [f.shape[1:] for f in features] == [(16, 16, 24), (8, 8, 48), (4, 4, 96), (2, 2, 192), (2, 2, 1024)]
  old = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
  assert all(not np.array_equal(a, b) for a, b in zip(old, jax.tree.leaves(stats)))


# ---------------------------------------------------------------------------------------------------- ensemble


def _ensemble(members=('resnet8', 'wrn_16_1'), size=16, abstract=False, **kwargs):
  """An ensemble, abstract or with NumPy-drawn variables (see `_real`)."""
  if abstract:
    return nnx.eval_shape(lambda: create_model('ensemble', members=members, num_classes=10,
                                               image_shape=(size, size, 3), rngs=nnx.Rngs(0), **kwargs))
  return _real('ensemble', size, members=members, **kwargs)


def test_ensemble_logits_are_the_mean_of_its_members():
  ensemble = _ensemble()
  x = _batch(16)
  separate = [member(x, train=False) for member in ensemble.members]
  logits, features = ensemble(x, train=False)
  np.testing.assert_allclose(logits, (separate[0][0] + separate[1][0]) / 2, rtol=1e-6, atol=1e-6)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
  # Features (and stage channels) are the first member's.
  assert len(features) == len(separate[0][1]) == 4
  for got, want in zip(features, separate[0][1]):
    np.testing.assert_array_equal(got, want)
  assert ensemble.stage_channels == (16, 16, 32, 64)
  member_logits = ensemble.member_logits(x, train=False)
  assert member_logits.shape == (2, 2, 10)
  for got, (want, _) in zip(member_logits, separate):
    np.testing.assert_array_equal(got, want)


def test_ensemble_of_registered_small_students():
  """`create_model('ensemble', members=('cnn2', 'cnn3'), ...)`: traced abstractly (the CNNs' own passes are tested in
  test_models.py)."""
  ensemble = _ensemble(('cnn2', 'cnn3'), abstract=True)
  graphdef, state = nnx.split(ensemble)
  logits, features = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, train=False), state,
                                    jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32))
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert [f.shape for f in features] == [(2, 8, 8, 32), (2, 4, 4, 64)]
  assert ensemble.stage_channels == (32, 64)
  paths = [path for path, _ in nnx.to_flat_state(nnx.state(ensemble, nnx.Param))]
  assert paths and all(path[0] == 'members' and path[1] in (0, 1) for path in paths)
  assert not hasattr(ensemble, 'stages') and not hasattr(ensemble, 'head')  # stage freezing does not apply


def test_ensemble_members_start_from_different_initialisations():
  """Members are built one after another from the same `rngs`, so same-architecture members differ (real JAX init
  of a tiny MLP)."""
  ensemble = create_model('ensemble', members=('mlp2', 'mlp2'), member_kwargs={'hidden': 2, 'depth': 1},
                          num_classes=10, image_shape=(1, 1, 3), rngs=nnx.Rngs(0))
  first, second = (jax.tree.leaves(nnx.state(m, nnx.Param)) for m in ensemble.members)
  assert any(not np.array_equal(a, b) for a, b in zip(first, second))


def test_ensemble_under_split_merge_and_jit():
  ensemble = _ensemble(size=8)
  x = _batch(8)
  eager, _ = ensemble(x, train=False)

  graphdef, params, rest = nnx.split(ensemble, nnx.Param, ...)

  @jax.jit
  def evaluate(params, rest, x):
    return nnx.merge(graphdef, params, rest)(x, train=False)

  @jax.jit
  def train_step(params, rest, x):
    model = nnx.merge(graphdef, params, rest)
    logits, _ = model(x, train=True)
    return logits, model.member_logits(x, train=False), nnx.state(model, nnx.Not(nnx.Param))

  logits, features = evaluate(params, rest, x)
  np.testing.assert_allclose(logits, eager, rtol=1e-4, atol=1e-5)
  assert [f.shape[-1] for f in features] == [16, 16, 32, 64]

  train_logits, member_logits, new_rest = train_step(params, rest, x)
  assert train_logits.shape == (2, 10) and member_logits.shape == (2, 2, 10)
  assert jax.tree.structure(new_rest) == jax.tree.structure(rest)
  old = jax.tree.leaves(nnx.state(ensemble, nnx.BatchStat))
  new = jax.tree.leaves(nnx.state(nnx.merge(graphdef, params, new_rest), nnx.BatchStat))
  assert any(not np.array_equal(a, b) for a, b in zip(old, new))


def test_ensemble_of_built_modules():
  first, second = _real('resnet8', 16, seed=1), _real('wrn_16_1', 16, seed=2)
  ensemble = Ensemble([first, second])
  x = _batch(16)
  logits, _ = ensemble(x, train=False)
  np.testing.assert_allclose(logits, (first(x, train=False)[0] + second(x, train=False)[0]) / 2, rtol=1e-6,
                             atol=1e-6)


def test_ensemble_member_kwargs():
  mixed = _ensemble(('cnn2', 'cnn2'), abstract=True, member_kwargs=[{'hidden': 8}, None])
  assert mixed.members[0].head.hidden.out_features == 8 and mixed.members[1].head.hidden.out_features == 128
  shared = _ensemble(('cnn2', 'cnn3'), abstract=True, member_kwargs={'dropout': 0.0})
  assert all(m.head.dropout is None for m in shared.members)


@pytest.mark.parametrize('kwargs,match', [
  (dict(members=()), 'non-empty'),
  (dict(members='cnn2'), 'non-empty'),
  (dict(members=('cnn2', 'nope')), 'nope'),
  (dict(members=('cnn2', 'cnn3'), member_kwargs=[{}]), 'member_kwargs'),
  (dict(members=('cnn2',), widht=3), 'widht'),
])
def test_ensemble_bad_arguments_are_user_errors(kwargs, match):
  with pytest.raises(UserError, match=match):
    nnx.eval_shape(lambda: create_model('ensemble', num_classes=10, image_shape=(16, 16, 3), rngs=nnx.Rngs(0),
                                        **kwargs))


def test_ensemble_members_must_agree_on_classes():
  ensemble = nnx.eval_shape(lambda: Ensemble(
    [create_model('cnn2', num_classes=n, image_shape=(16, 16, 3), rngs=nnx.Rngs(0)) for n in (10, 5)]))
  graphdef, state = nnx.split(ensemble)
  with pytest.raises(UserError, match='num_classes'):
    jax.eval_shape(lambda s: nnx.merge(graphdef, s)(jnp.zeros((2, 16, 16, 3)), train=False), state)
