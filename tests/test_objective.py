"""Loss terms from config to numbers: every term runs on model-shaped outputs; adapters where channels differ."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax import config as config_lib
from kdjax import losses
from kdjax import objective as objective_lib
from kdjax.errors import UserError


def _outputs(key, channels, n=8, k=10):
  keys = jax.random.split(key, len(channels) + 1)
  features = tuple(jax.random.normal(kk, (n, 4, 4, c)) for kk, c in zip(keys[1:], channels))
  return jax.random.normal(keys[0], (n, k)), features


@pytest.mark.parametrize('kind', sorted(objective_lib.TERMS))
def test_every_term_gives_a_finite_scalar(kind):
  student, teacher = _outputs(jax.random.key(0), (8, 16)), _outputs(jax.random.key(1), (8, 32))
  losses_cfg = {'t': config_lib.loss_term(kind)}
  phase = config_lib.phase(1, losses_cfg)
  shapes = objective_lib.adapter_shapes([phase], (8, 16), (8, 32))
  adapters = objective_lib.Adapters(shapes, rngs=nnx.Rngs(0))
  objective, names = objective_lib.build_objective(phase.losses)
  labels = jnp.arange(8) % 10
  memory = objective_lib.init_memory([phase], 20, jax.random.key(0))
  total, terms, new_memory = objective(student, teacher, labels, adapters, jnp.int32(5), memory=memory,
                                       index=jnp.arange(8), key=jax.random.key(2))
  assert jax.tree.structure(new_memory) == jax.tree.structure(memory)
  assert names == ('t',) and total.shape == () and bool(jnp.isfinite(total))
  assert total == pytest.approx(float(terms['t']))


def test_feature_mse_learns_an_adapter_only_where_channels_differ():
  phase = config_lib.phase(1, {
      'a': config_lib.loss_term('feature_mse', student_stage=0, teacher_stage=0),
      'b': config_lib.loss_term('feature_mse', student_stage=1, teacher_stage=1)})
  assert objective_lib.adapter_shapes([phase], (8, 16), (8, 32)) == {'s1_t1': (16, 32, 'linear')}
  adapters = objective_lib.Adapters({'s1_t1': (16, 32, 'linear')}, rngs=nnx.Rngs(0))
  student, teacher = _outputs(jax.random.key(0), (8, 16)), _outputs(jax.random.key(1), (8, 32))
  objective, _ = objective_lib.build_objective(phase.losses)
  _, terms, _ = objective(student, teacher, None, adapters, 0)
  mapped = adapters.maps['s1_t1'](student[1][1])
  np.testing.assert_allclose(terms['b'], jnp.mean((mapped - teacher[1][1]) ** 2), rtol=1e-6)
  np.testing.assert_allclose(terms['a'], jnp.mean((student[1][0] - teacher[1][0]) ** 2), rtol=1e-6)


def test_the_conv_bn_relu_regressor_normalises_with_the_batch_statistics():
  """FitNets' reference regressor: relu(BN(x W)) with the batch's mean and (biased) variance per channel, over the
  batch and the map's H and W; at its initial scale 1 and shift 0 each channel is standardised before the ReLU."""
  regressor = objective_lib.ConvBNReLURegressor(3, 5, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3)) * 3.0 + 1.0
  kernel = np.asarray(regressor.conv.kernel.get_value())
  y = np.asarray(x) @ kernel
  standardised = (y - y.mean(axis=(0, 1, 2))) / np.sqrt(y.var(axis=(0, 1, 2)) + 1e-5)
  np.testing.assert_allclose(regressor(x), np.maximum(standardised, 0.0), rtol=1e-4, atol=1e-5)
  regressor.scale.set_value(jnp.full((5,), 2.0))
  regressor.bias.set_value(jnp.full((5,), -0.5))
  np.testing.assert_allclose(regressor(x), np.maximum(2.0 * standardised - 0.5, 0.0), rtol=1e-4, atol=1e-5)


def test_a_feature_term_chooses_its_regressor():
  """regressor='conv_bn_relu' gives the term an adapter of its own (also on equal channels, with adapter='always'),
  beside a linear one on the same maps; the term is the MSE through it, and every parameter of it gets a gradient."""
  phase = config_lib.phase(1, {
      'fitnets': config_lib.loss_term('feature_mse', student_stage=1, teacher_stage=1, adapter='always',
                                      regressor='conv_bn_relu'),
      'plain': config_lib.loss_term('feature_mse', student_stage=1, teacher_stage=1)})
  shapes = objective_lib.adapter_shapes([phase], (8, 16), (8, 32))
  assert shapes == {'s1_t1': (16, 32, 'linear'), 's1_t1_conv_bn_relu': (16, 32, 'conv_bn_relu')}
  adapters = objective_lib.Adapters(shapes, rngs=nnx.Rngs(0))
  assert isinstance(adapters.maps['s1_t1_conv_bn_relu'], objective_lib.ConvBNReLURegressor)
  student, teacher = _outputs(jax.random.key(0), (8, 16)), _outputs(jax.random.key(1), (8, 32))
  objective, _ = objective_lib.build_objective(phase.losses)
  _, terms, _ = objective(student, teacher, None, adapters, 0)
  mapped = adapters.maps['s1_t1_conv_bn_relu'](student[1][1])
  np.testing.assert_allclose(terms['fitnets'], jnp.mean((mapped - teacher[1][1]) ** 2), rtol=1e-6)
  graphdef, params = nnx.split(adapters, nnx.Param)
  grads = jax.grad(lambda p: objective(student, teacher, None, nnx.merge(graphdef, p), 0)[1]['fitnets'])(params)
  norms = {'/'.join(map(str, path)): float(jnp.abs(g.get_value()).sum()) for path, g in nnx.to_flat_state(grads)}
  assert len([k for k in norms if 'conv_bn_relu' in k]) == 3  # the 1x1 kernel, BatchNorm's scale and shift
  assert all(v > 0 for k, v in norms.items() if 'conv_bn_relu' in k), norms
  assert all(v == 0 for k, v in norms.items() if 'conv_bn_relu' not in k), norms
  with pytest.raises(UserError, match='`regressor` must be one of affine, conv_bn_relu, linear'):
    objective_lib.check_term(config_lib.loss_term('feature_mse', regressor='mlp'), 'phases.train.losses.hint')


def test_mismatched_channels_without_adapter_is_a_user_error():
  phase = config_lib.phase(1, {'a': config_lib.loss_term('feature_mse', adapter='never')})
  with pytest.raises(UserError, match='set adapter=.auto.'):
    objective_lib.adapter_shapes([phase], (8, 16), (8, 32))
  with pytest.raises(UserError, match='stage 7 does not exist'):
    objective_lib.adapter_shapes([config_lib.phase(1, {'a': config_lib.loss_term('feature_mse', student_stage=7)})],
                                 (8, 16), (8, 32))


def test_a_term_without_an_adapter_never_goes_through_another_terms_adapter():
  """Adapters are kept by stage pair: the hint phase learns s1_t1, and the attention-transfer term of the next phase
  (adapter='never', its default) on the same pair must read the student's raw map."""
  hint = config_lib.phase(1, {'hint': config_lib.loss_term('feature_mse', student_stage=1, teacher_stage=1)})
  train = config_lib.phase(1, {'at': config_lib.loss_term('at', student_stage=1, teacher_stage=1)})
  assert objective_lib.adapter_shapes([hint, train], (8, 16), (8, 32)) == {'s1_t1': (16, 32, 'linear')}
  adapters = objective_lib.Adapters({'s1_t1': (16, 32, 'linear')}, rngs=nnx.Rngs(0))
  student, teacher = _outputs(jax.random.key(0), (8, 16)), _outputs(jax.random.key(1), (8, 32))
  objective, _ = objective_lib.build_objective(train.losses)
  _, terms, _ = objective(student, teacher, None, adapters, 0)
  np.testing.assert_allclose(terms['at'], losses.attention_transfer(student[1][1], teacher[1][1], p=2), rtol=1e-6)


def test_one_crd_term_name_on_other_maps_in_two_phases_is_refused():
  """Its heads and memory banks are kept by the term's name: a second phase on other maps would reuse them."""
  crd = lambda stage: config_lib.phase(1, {'crd': config_lib.loss_term('crd', student_stage=stage,
                                                                      teacher_stage=stage, embed_dim=4)})
  assert objective_lib.adapter_shapes([crd(1), crd(1)], (8, 8), (8, 8))  # the same maps: shared, as meant
  assert objective_lib.adapter_shapes([crd(-1), crd(1)], (8, 8), (8, 8))  # stage -1 of two is stage 1
  with pytest.raises(UserError, match='loss term `crd` .* give the terms of different maps different names'):
    objective_lib.adapter_shapes([crd(0), crd(1)], (8, 8), (8, 8))


def test_dkd_warms_up_linearly():
  student, teacher = _outputs(jax.random.key(0), (8,)), _outputs(jax.random.key(1), (8,))
  labels = jnp.arange(8) % 10
  objective, _ = objective_lib.build_objective({'d': config_lib.loss_term('dkd', warmup_epochs=2.0)})
  full = losses.dkd(student[0], teacher[0], labels)
  for epoch, factor in ((0.0, 0.0), (1.0, 0.5), (2.0, 1.0), (10.0, 1.0)):
    total, _, _ = objective(student, teacher, labels, None, jnp.float32(epoch))
    np.testing.assert_allclose(total, factor * full, rtol=1e-6)


def test_weights_combine_terms():
  student, teacher = _outputs(jax.random.key(0), (8,)), _outputs(jax.random.key(1), (8,))
  labels = jnp.arange(8) % 10
  objective, _ = objective_lib.build_objective({
      'ce': config_lib.loss_term('ce', weight=0.1), 'kd': config_lib.loss_term('kd', weight=0.9, temperature=4.0)})
  total, terms, _ = objective(student, teacher, labels, None, 0)
  np.testing.assert_allclose(total, 0.1 * losses.cross_entropy(student[0], labels)
                             + 0.9 * losses.kd_divergence(student[0], teacher[0], temperature=4.0), rtol=1e-6)


def test_crd_term_contrasts_against_its_banks_and_updates_the_batch_rows():
  """The CRD term equals crd_nce on the projected, normalised pooled maps against bank rows (the example's own
  row first, then random rows, of which those of the anchor's class are left out), and only the batch's rows of
  each bank move (to the momentum-updated embeddings; the label bank records their classes)."""
  student, teacher = _outputs(jax.random.key(0), (8, 16)), _outputs(jax.random.key(1), (8, 32))
  phase = config_lib.phase(1, {'c': config_lib.loss_term('crd', embed_dim=6, negatives=5, momentum=0.25)})
  shapes = objective_lib.adapter_shapes([phase], (8, 16), (8, 32))
  assert shapes == {'crd_c_student': (16, 6, 'linear'), 'crd_c_teacher': (32, 6, 'linear')}
  adapters = objective_lib.Adapters(shapes, rngs=nnx.Rngs(0))
  memory = objective_lib.init_memory([phase], 30, jax.random.key(0))
  np.testing.assert_allclose(jnp.linalg.norm(memory['c']['student'], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(memory['c']['labels'], -1)
  memory['c']['labels'] = jnp.arange(30, dtype=jnp.int32) % 3  # as if every row had been written once
  labels = jnp.array([0, 1, 2, 0, 1, 2, 0, 1], jnp.int32)
  objective, _ = objective_lib.build_objective(phase.losses)
  index, key = jnp.arange(10, 18), jax.random.key(4)
  total, terms, new_memory = objective(student, teacher, labels, adapters, 0, memory=memory, index=index, key=key)

  s = losses.l2_normalize(adapters.maps['crd_c_student'](student[1][-1].mean(axis=(1, 2))))
  t = losses.l2_normalize(adapters.maps['crd_c_teacher'](teacher[1][-1].mean(axis=(1, 2))))
  others = np.asarray(jax.random.randint(jax.random.fold_in(key, 0), (8, 5), 0, 30))
  rows = np.concatenate([np.arange(10, 18)[:, None], others], axis=1)
  valid = (others % 3) != np.asarray(labels)[:, None]  # the bank says row r holds class r % 3
  valid &= others != np.arange(10, 18)[:, None]
  assert 0 < valid.sum() < valid.size
  expected = losses.crd_nce(s, t, memory['c']['student'][rows], memory['c']['teacher'][rows], valid=valid,
                            nce_t=0.07)
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  np.testing.assert_allclose(terms['c'], expected, rtol=1e-6)
  for side, emb in (('student', s), ('teacher', t)):
    old, new = np.asarray(memory['c'][side]), np.asarray(new_memory['c'][side])
    untouched = np.setdiff1d(np.arange(30), np.asarray(index))
    np.testing.assert_array_equal(new[untouched], old[untouched])
    moved = 0.25 * old[10:18] + 0.75 * np.asarray(emb)
    np.testing.assert_allclose(new[10:18], moved / np.linalg.norm(moved, axis=-1, keepdims=True), rtol=1e-5)
  expected_labels = np.arange(30) % 3
  expected_labels[10:18] = labels
  np.testing.assert_array_equal(new_memory['c']['labels'], expected_labels)


def test_crd_heads_take_a_bias_where_asked_and_it_learns():
  """`head_bias=True` makes both heads affine, as the reference code's `Embed`: x W + b before the normalisation,
  and the loss's gradient reaches b. The default keeps them linear; phases that disagree on it are refused."""
  student, teacher = _outputs(jax.random.key(0), (8, 16)), _outputs(jax.random.key(1), (8, 32))
  crd = lambda bias: config_lib.phase(1, {'c': config_lib.loss_term('crd', embed_dim=6, negatives=5,
                                                                    head_bias=bias)})
  shapes = objective_lib.adapter_shapes([crd(True)], (8, 16), (8, 32))
  assert shapes == {'crd_c_student': (16, 6, 'affine'), 'crd_c_teacher': (32, 6, 'affine')}
  adapters = objective_lib.Adapters(shapes, rngs=nnx.Rngs(0))
  head = adapters.maps['crd_c_student']
  head.bias.set_value(jnp.arange(6, dtype=jnp.float32))
  x = student[1][-1].mean(axis=(1, 2))
  np.testing.assert_allclose(head(x), x @ head.kernel.get_value() + jnp.arange(6.0), rtol=1e-5, atol=1e-6)

  objective, _ = objective_lib.build_objective(crd(True).losses)
  memory = objective_lib.init_memory([crd(True)], 30, jax.random.key(0))
  graphdef, params = nnx.split(adapters, nnx.Param)
  def loss(p):
    total, _, _ = objective(student, teacher, jnp.arange(8) % 3, nnx.merge(graphdef, p), 0, memory=memory,
                            index=jnp.arange(8), key=jax.random.key(2))
    return total
  grads = jax.grad(loss)(params)
  for side in ('student', 'teacher'):
    bias_grad = np.asarray(grads['maps'][f'crd_c_{side}']['bias'].get_value())
    assert np.all(np.isfinite(bias_grad)) and np.any(bias_grad != 0), side
  assert objective_lib.adapter_shapes([crd(False)], (8, 16), (8, 32))['crd_c_student'] == (16, 6, 'linear')
  with pytest.raises(UserError, match='loss term `c` .* give the terms of different maps different names'):
    objective_lib.adapter_shapes([crd(False), crd(True)], (8, 16), (8, 32))
  with pytest.raises(UserError, match='`head_bias` must be True or False'):
    objective_lib.check_term(config_lib.loss_term('crd', head_bias='yes'), 'phases.train.losses.crd')


def test_dkd_warmup_is_in_epochs_and_the_old_step_argument_names_it():
  with pytest.raises(UserError, match='did you mean `warmup_epochs`'):
    objective_lib.check_term(config_lib.loss_term('dkd', warmup_steps=390), 'phases.train.losses.dkd')
  with pytest.raises(UserError, match='`warmup_epochs` must be >= 0'):
    objective_lib.check_term(config_lib.loss_term('dkd', warmup_epochs=-1.0), 'phases.train.losses.dkd')


def test_pooled_features_are_float32_means_of_bfloat16_maps():
  """RKD, PKT and CRD read pooled maps: the mean over H, W is taken in float32, not rounded back to bfloat16."""
  maps = jax.random.normal(jax.random.key(0), (4, 5, 5, 16), jnp.bfloat16) + 3.0
  pooled = objective_lib._global_pool(maps)
  assert pooled.dtype == jnp.float32
  np.testing.assert_allclose(pooled, np.asarray(maps, np.float64).mean(axis=(1, 2)), rtol=1e-6)


def test_a_registered_term_kind_is_a_config_loss(monkeypatch):
  """A user's loss, registered once, is named by configs like the built-in ones: its arguments take defaults and
  checks, and the objective feeds it the maps its config chooses."""
  monkeypatch.setattr(objective_lib, 'TERMS', dict(objective_lib.TERMS))
  monkeypatch.setattr(objective_lib, '_ORIGINS', dict(objective_lib._ORIGINS))
  l1 = lambda s, t, *, scale: scale * jnp.mean(jnp.abs(s.astype(jnp.float32) - t.astype(jnp.float32)))
  objective_lib.register_term('l1_maps', objective_lib.feature_term(l1, scale=2.0))
  phase = config_lib.phase(1, {'mine': config_lib.loss_term('l1_maps', weight=0.5, student_stage=0,
                                                            teacher_stage=0)})
  assert dict(phase.losses.mine) == dict(kind='l1_maps', weight=0.5, student_stage=0, teacher_stage=0,
                                         adapter='never', regressor='linear', scale=2.0)
  student, teacher = _outputs(jax.random.key(0), (8, 16)), _outputs(jax.random.key(1), (8, 16))
  objective, names = objective_lib.build_objective(phase.losses)
  total, terms, _ = objective(student, teacher, None, objective_lib.Adapters({}, rngs=nnx.Rngs(0)), 0)
  expected = 2.0 * np.mean(np.abs(np.asarray(student[1][0]) - np.asarray(teacher[1][0])))
  assert names == ('mine',)
  np.testing.assert_allclose(float(terms['mine']), expected, rtol=1e-6)
  np.testing.assert_allclose(float(total), 0.5 * expected, rtol=1e-6)
  with pytest.raises(ValueError, match="loss term kind 'kd' is registered twice"):
    objective_lib.register_term('kd', objective_lib.logit_term(l1, scale=1.0))


def test_maps_of_different_spatial_sizes_are_one_user_error_listing_the_stages():
  """A student whose stage 1 is 8x8 against a teacher's 4x4: one UserError naming the term and every map's shape,
  not a ValueError deep inside the traced step."""
  student = (jnp.zeros((2, 10)), (jnp.zeros((2, 16, 16, 8)), jnp.zeros((2, 8, 8, 16))))
  teacher = (jnp.zeros((2, 10)), (jnp.zeros((2, 8, 8, 8)), jnp.zeros((2, 4, 4, 16))))
  phase = config_lib.phase(1, {'hint': config_lib.loss_term('feature_mse', student_stage=1, teacher_stage=1)})
  objective, _ = objective_lib.build_objective(phase.losses)
  with pytest.raises(UserError, match=r'loss term `hint` cannot compare .*\(2, 8, 8, 16\).*\(2, 4, 4, 16\).*'
                                      r'stage maps are 0: \(16, 16, 8\), 1: \(8, 8, 16\); the teacher\'s 0: '
                                      r'\(8, 8, 8\), 1: \(4, 4, 16\): set its student_stage'):
    jax.jit(lambda s, t: objective(s, t, None, objective_lib.Adapters({}, rngs=nnx.Rngs(0)), 0))(student, teacher)


def test_a_shape_error_of_a_term_without_teacher_is_a_user_error_too(monkeypatch):
  monkeypatch.setattr(objective_lib, 'TERMS', dict(objective_lib.TERMS))
  monkeypatch.setattr(objective_lib, '_ORIGINS', dict(objective_lib._ORIGINS))

  def refuse(a, s, t, y, ad, epoch):
    raise losses.ShapeError('logit_penalty: logits must be (N, K)')
  objective_lib.register_term('logit_penalty', objective_lib.Term(compute=refuse, defaults={}, needs_teacher=False))
  objective, _ = objective_lib.build_objective({'p': config_lib.loss_term('logit_penalty')})
  student = (jnp.zeros((2, 10)), (jnp.zeros((2, 4, 4, 8)),))
  with pytest.raises(UserError, match=r"`p` cannot compare .*must be \(N, K\)\) The student's stage maps are "
                                      r"0: \(4, 4, 8\): set its"):
    objective(student, None, None, None, 0)


def test_a_term_whose_kind_was_switched_warns_of_the_arguments_it_kept(caplog):
  """`--config....kd.kind=dkd` on a hinton_kd term keeps hinton_kd's alpha=0.5 as DKD's alpha (whose default is
  1): say so. A term made by `loss_term` for its own kind has every argument and says nothing."""
  import logging
  term = config_lib.loss_term('hinton_kd')
  term.kind = 'dkd'
  with caplog.at_level(logging.WARNING):
    objective_lib.check_term(config_lib.loss_term('dkd'), 'phases.train.losses.ok')
    assert not caplog.records
    objective_lib.check_term(term, 'phases.train.losses.kd')
  assert len(caplog.records) == 1
  message = caplog.records[0].getMessage()
  assert 'config `phases.train.losses.kd` is a dkd term without its argument(s) beta, warmup_epochs' in message
  assert 'alpha=0.5' in message
