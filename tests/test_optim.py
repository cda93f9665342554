"""Learning-rate schedules: warm-up, and decay boundaries in epochs of the phase."""
import numpy as np

from kdjax import config as config_lib
from kdjax import optim


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
