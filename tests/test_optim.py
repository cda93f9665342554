"""Learning-rate schedules: warm-up, and decay boundaries in epochs of the phase."""
import numpy as np
import pytest

from kdjax import config as config_lib
from kdjax import optim
from kdjax.errors import UserError


def _rates(cfg, total_steps, steps_per_epoch, at):
  schedule = optim.learning_rate_schedule(cfg, total_steps, steps_per_epoch)
  return np.array([float(schedule(step)) for step in at])


def test_piecewise_boundaries_are_epochs_of_the_phase_with_or_without_warm_up():
  """The CIFAR-100 benchmark recipe: x0.1 at epochs 150, 180, 210 of 240; a warm-up must not move them."""
  for warmup_epochs in (0.0, 5.0):
    cfg = config_lib.optimizer('sgd', learning_rate=0.05, schedule='piecewise', boundaries_epochs=(150, 180, 210),
                               decay_factor=0.1, warmup_epochs=warmup_epochs)
    rates = _rates(cfg, 240 * 10, 10, at=[1499, 1500, 1799, 1800, 2099, 2100, 2399])
    np.testing.assert_allclose(rates, [0.05, 0.005, 0.005, 5e-4, 5e-4, 5e-5, 5e-5], rtol=1e-5)


def test_piecewise_boundaries_at_one_step_multiply_their_factors():
  """As torch's MultiStepLR: a repeated milestone (or two epochs rounding to one step) decays twice."""
  for boundaries in ((3, 3), (3.001, 3.004)):
    cfg = config_lib.optimizer('sgd', learning_rate=1.0, schedule='piecewise', boundaries_epochs=boundaries,
                               decay_factor=0.1)
    np.testing.assert_allclose(_rates(cfg, 1000, 100, at=[299, 300, 999]), [1.0, 0.01, 0.01], rtol=1e-5)


def test_warm_up_rises_linearly_to_the_peak_then_the_schedule_runs_over_the_rest():
  cfg = config_lib.optimizer('sgd', learning_rate=0.4, schedule='cosine', warmup_epochs=2.0)
  rates = _rates(cfg, 100, 10, at=[0, 10, 20, 60, 100])
  np.testing.assert_allclose(rates, [0.0, 0.2, 0.4, 0.2, 0.0], atol=1e-6)


def _one_update(cfg, grads, params):
  as32 = lambda tree: {k: np.asarray(v, np.float32) for k, v in tree.items()}  # JAX's float32, as in training
  grads, params = as32(grads), as32(params)
  tx = optim.make_optimizer(cfg, total_steps=10, steps_per_epoch=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_gradients_are_clipped_to_the_global_norm_before_the_rule():
  """SGD without momentum at lr 1: the update is minus the clipped gradient, whose global norm (3-4-0 -> 5) is 1."""
  cfg = config_lib.optimizer('sgd', learning_rate=1.0, schedule='constant', momentum=0.0, grad_clip_norm=1.0)
  grads = {'a': np.array([3.0, 0.0]), 'b': np.array([4.0])}
  updates = _one_update(cfg, grads, {'a': np.zeros(2), 'b': np.zeros(1)})
  np.testing.assert_allclose(updates['a'], [-0.6, 0.0], rtol=1e-6)
  np.testing.assert_allclose(updates['b'], [-0.8], rtol=1e-6)
  cfg.grad_clip_norm = 10.0  # under the limit: untouched
  np.testing.assert_allclose(_one_update(cfg, grads, {'a': np.zeros(2), 'b': np.zeros(1)})['b'], [-4.0], rtol=1e-6)


def test_weight_decay_is_l2_for_sgd_and_adam_and_decoupled_for_adamw():
  """A zero gradient and weight 1, lr 0.1, decay 0.5: L2 adds 0.5 to the gradient (Adam then normalises it to a
  step of ~lr), AdamW subtracts lr * decay * weight."""
  params, grads = {'w': np.ones(1)}, {'w': np.zeros(1)}
  sgd = config_lib.optimizer('sgd', learning_rate=0.1, schedule='constant', momentum=0.0, weight_decay=0.5)
  np.testing.assert_allclose(_one_update(sgd, grads, params)['w'], [-0.05], rtol=1e-6)
  adam = config_lib.optimizer('adam', learning_rate=0.1, schedule='constant', weight_decay=0.5)
  np.testing.assert_allclose(_one_update(adam, grads, params)['w'], [-0.1], rtol=1e-4)
  adamw = config_lib.optimizer('adamw', learning_rate=0.1, schedule='constant', weight_decay=0.5)
  np.testing.assert_allclose(_one_update(adamw, grads, params)['w'], [-0.05], rtol=1e-6)


def test_linear_and_onecycle_schedules_over_the_phase():
  linear = config_lib.optimizer('sgd', learning_rate=0.4, schedule='linear')
  np.testing.assert_allclose(_rates(linear, 100, 10, at=[0, 50, 100]), [0.4, 0.2, 0.0], atol=1e-6)
  onecycle = config_lib.optimizer('sgd', learning_rate=0.4, schedule='onecycle')
  rates = _rates(onecycle, 100, 10, at=[0, 30, 100])
  np.testing.assert_allclose(rates[:2], [0.4 / 25, 0.4], rtol=1e-5)  # starts at peak/25, peaks at 30% (torch's)
  assert rates[2] < 1e-5
  onecycle.pct_start = 0.25  # the PyTorch peer's
  np.testing.assert_allclose(_rates(onecycle, 100, 10, at=[25]), [0.4], rtol=1e-5)


def _momenta(cfg, total_steps, steps_per_epoch):
  schedule = optim.momentum_schedule(cfg, total_steps, steps_per_epoch)
  return np.array([float(schedule(step)) for step in range(total_steps + 1)])


def test_cycled_momentum_falls_while_the_rate_rises_and_returns_as_it_anneals():
  """(0.85, 0.95) over 100 steps, turning at 25: 0.95 at the start and end, 0.85 where the rate peaks, cosine halfway
  points 0.90 at steps 12.5 (between 12 and 13) and 62.5; a warm-up holds 0.95 and moves the cycle back with the
  rate."""
  cfg = config_lib.optimizer('sgd', learning_rate=0.4, schedule='onecycle', pct_start=0.25,
                             cycle_momentum=(0.85, 0.95))
  momenta, rates = _momenta(cfg, 100, 10), _rates(cfg, 100, 10, at=range(101))
  assert int(np.argmin(momenta)) == int(np.argmax(rates)) == 25
  np.testing.assert_allclose(momenta[[0, 25, 100]], [0.95, 0.85, 0.95], atol=1e-6)
  assert momenta[12] > 0.90 > momenta[13] and momenta[62] < 0.90 < momenta[63]
  np.testing.assert_allclose(momenta[50], 0.85 + 0.1 * (1 - np.cos(np.pi * 25 / 75)) / 2, atol=1e-6)
  assert np.all(np.diff(momenta[:26]) < 0) and np.all(np.diff(momenta[25:]) > 0)
  cfg.warmup_epochs = 1.0  # 10 steps at 0.95, then the cycle over the other 90 (turning at 10 + 22)
  warmed = _momenta(cfg, 100, 10)
  np.testing.assert_allclose(warmed[:11], 0.95, atol=1e-6)
  assert int(np.argmin(warmed)) == 10 + int(0.25 * 90)
  cfg.cycle_momentum = ()
  assert optim.momentum_schedule(cfg, 100, 10) is None


def test_cycled_momentum_follows_torch_one_cycle_lr():
  """Against torch's OneCycleLR (default cycle 0.85-0.95) over 100 steps: the same curve up to torch's turning one
  step earlier, so within one step's change (< 0.0066); a cycle run backwards or not at all is 0.05-0.1 off."""
  torch = pytest.importorskip('torch')
  weight = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([weight], lr=0.4, momentum=0.9, nesterov=True)
  sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.4, total_steps=100, pct_start=0.25)
  theirs = []
  for _ in range(100):
    theirs.append(opt.param_groups[0]['momentum'])
    opt.step()
    sched.step()
  cfg = config_lib.optimizer('sgd', learning_rate=0.4, schedule='onecycle', pct_start=0.25,
                             cycle_momentum=(0.85, 0.95))
  np.testing.assert_allclose(_momenta(cfg, 100, 10)[:100], theirs, atol=0.0066)


def test_the_update_uses_each_step_s_momentum():
  """Nesterov SGD on a constant gradient 1, lr and momentum scheduled: the trace is t_k = 1 + m_k t_(k-1) and the
  update -lr_k (1 + m_k t_k), with m_k and lr_k the schedules at step k."""
  cfg = config_lib.optimizer('sgd', learning_rate=0.4, schedule='onecycle', pct_start=0.25, nesterov=True,
                             cycle_momentum=(0.85, 0.95))
  tx = optim.make_optimizer(cfg, 20, 10)
  params = {'w': np.zeros(1, np.float32)}
  state = tx.init(params)
  momenta, rates = _momenta(cfg, 20, 10), _rates(cfg, 20, 10, at=range(20))
  trace = 0.0
  for k in range(6):
    updates, state = tx.update({'w': np.ones(1, np.float32)}, state, params)
    trace = 1.0 + momenta[k] * trace
    np.testing.assert_allclose(updates['w'], [-rates[k] * (1.0 + momenta[k] * trace)], rtol=1e-5)


def test_cycle_momentum_is_checked_in_the_config():
  cfg = config_lib.base_config()
  cfg.phases.train.optimizer.cycle_momentum = (0.85, 0.95)  # the default phase is sgd + cosine
  with pytest.raises(UserError, match='schedule=onecycle'):
    config_lib.validate(cfg)
  cfg.phases.train.optimizer.schedule = 'onecycle'
  config_lib.validate(cfg)
  cfg.phases.train.optimizer.cycle_momentum = (0.95, 0.85)
  with pytest.raises(UserError, match='base <= max'):
    config_lib.validate(cfg)
