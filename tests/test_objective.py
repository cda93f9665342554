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
  total, terms = objective(student, teacher, labels, adapters, jnp.int32(5))
  assert names == ('t',) and total.shape == () and bool(jnp.isfinite(total))
  assert total == pytest.approx(float(terms['t']))


def test_feature_mse_learns_an_adapter_only_where_channels_differ():
  phase = config_lib.phase(1, {
      'a': config_lib.loss_term('feature_mse', student_stage=0, teacher_stage=0),
      'b': config_lib.loss_term('feature_mse', student_stage=1, teacher_stage=1)})
  assert objective_lib.adapter_shapes([phase], (8, 16), (8, 32)) == {'s1_t1': (16, 32)}
  adapters = objective_lib.Adapters({'s1_t1': (16, 32)}, rngs=nnx.Rngs(0))
  student, teacher = _outputs(jax.random.key(0), (8, 16)), _outputs(jax.random.key(1), (8, 32))
  objective, _ = objective_lib.build_objective(phase.losses)
  _, terms = objective(student, teacher, None, adapters, 0)
  mapped = adapters.maps['s1_t1'](student[1][1])
  np.testing.assert_allclose(terms['b'], jnp.mean((mapped - teacher[1][1]) ** 2), rtol=1e-6)
  np.testing.assert_allclose(terms['a'], jnp.mean((student[1][0] - teacher[1][0]) ** 2), rtol=1e-6)


def test_mismatched_channels_without_adapter_is_a_user_error():
  phase = config_lib.phase(1, {'a': config_lib.loss_term('feature_mse', adapter='never')})
  with pytest.raises(UserError, match='set adapter=.auto.'):
    objective_lib.adapter_shapes([phase], (8, 16), (8, 32))
  with pytest.raises(UserError, match='stage 7 does not exist'):
    objective_lib.adapter_shapes([config_lib.phase(1, {'a': config_lib.loss_term('feature_mse', student_stage=7)})],
                                 (8, 16), (8, 32))


def test_dkd_warms_up_linearly():
  student, teacher = _outputs(jax.random.key(0), (8,)), _outputs(jax.random.key(1), (8,))
  labels = jnp.arange(8) % 10
  objective, _ = objective_lib.build_objective({'d': config_lib.loss_term('dkd', warmup_steps=10)})
  full = losses.dkd(student[0], teacher[0], labels)
  for step, factor in ((0, 0.0), (5, 0.5), (10, 1.0), (50, 1.0)):
    total, _ = objective(student, teacher, labels, None, jnp.int32(step))
    np.testing.assert_allclose(total, factor * full, rtol=1e-6)


def test_weights_combine_terms():
  student, teacher = _outputs(jax.random.key(0), (8,)), _outputs(jax.random.key(1), (8,))
  labels = jnp.arange(8) % 10
  objective, _ = objective_lib.build_objective({
      'ce': config_lib.loss_term('ce', weight=0.1), 'kd': config_lib.loss_term('kd', weight=0.9, temperature=4.0)})
  total, terms = objective(student, teacher, labels, None, 0)
  np.testing.assert_allclose(total, 0.1 * losses.cross_entropy(student[0], labels)
                             + 0.9 * losses.kd_divergence(student[0], teacher[0], temperature=4.0), rtol=1e-6)
