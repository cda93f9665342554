"""A phase's optax optimizer, built from its `optimizer` config through two registries (rules and schedules)."""
from typing import Callable

import jax.numpy as jnp
import optax


def _constant(peak, steps, steps_per_epoch, cfg):
  return optax.constant_schedule(peak)


def _cosine(peak, steps, steps_per_epoch, cfg):
  return optax.cosine_decay_schedule(peak, decay_steps=max(steps, 1))


def _linear(peak, steps, steps_per_epoch, cfg):
  return optax.linear_schedule(peak, 0.0, transition_steps=max(steps, 1))


def _onecycle(peak, steps, steps_per_epoch, cfg):
  return optax.cosine_onecycle_schedule(transition_steps=max(steps, 1), peak_value=peak, pct_start=cfg.pct_start)


def _piecewise(peak, steps, steps_per_epoch, cfg):
  # The boundaries are epochs of the phase; this schedule starts after the warm-up, so they move back by it.
  # Boundaries at one step multiply their factors, as torch's MultiStepLR counts a repeated milestone twice.
  warmup = warmup_steps(cfg, steps_per_epoch)
  boundaries = {}
  for epoch in cfg.boundaries_epochs:
    step = int(round(epoch * steps_per_epoch)) - warmup
    boundaries[step] = boundaries.get(step, 1.0) * cfg.decay_factor
  return optax.piecewise_constant_schedule(peak, boundaries)


# (peak, decay steps, steps per epoch, optimizer config) -> optax schedule
SCHEDULES: dict[str, Callable] = {
    'constant': _constant, 'cosine': _cosine, 'linear': _linear, 'onecycle': _onecycle, 'piecewise': _piecewise,
}


def _sgd(lr, cfg, momentum=None):
  """torch's SGD: L2 added to the gradient, then (Nesterov) momentum, then the rate. `momentum`, a schedule, replaces
  the fixed `cfg.momentum` (see `momentum_schedule`)."""
  chain = [optax.add_decayed_weights(cfg.weight_decay)] if cfg.weight_decay else []
  if momentum is None:
    return optax.chain(*chain, optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  # inject_hyperparams evaluates the schedule at its own step count, which advances with the optimizer's.
  trace = optax.inject_hyperparams(optax.trace, static_args=('nesterov',))(decay=momentum, nesterov=cfg.nesterov)
  return optax.chain(*chain, trace, optax.scale_by_learning_rate(lr))


# (learning-rate schedule, optimizer config[, momentum schedule: sgd only]) -> optax transformation
OPTIMIZERS: dict[str, Callable] = {
    'sgd': _sgd,
    'adam': lambda lr, cfg: optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(lr))
    if cfg.weight_decay else optax.adam(lr),
    'adamw': lambda lr, cfg: optax.adamw(lr, weight_decay=cfg.weight_decay),
}


def warmup_steps(cfg, steps_per_epoch: int) -> int:
  return int(round(cfg.warmup_epochs * steps_per_epoch))


def learning_rate_schedule(cfg, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Warm-up (linear from 0) then the named schedule over the remaining steps (piecewise boundaries stay epochs of
  the phase)."""
  warmup = warmup_steps(cfg, steps_per_epoch)
  main = SCHEDULES[cfg.schedule](cfg.learning_rate, total_steps - warmup, steps_per_epoch, cfg)
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), main], [warmup])


def momentum_schedule(cfg, total_steps: int, steps_per_epoch: int) -> optax.Schedule | None:
  """torch OneCycleLR's momentum cycle, for `cycle_momentum=(base, max)`: from max down to base while the rate rises,
  back up to max while it anneals, with the rate's cosine shape and turning step (max through any warm-up); None
  when the momentum is fixed.

  Cycling it lowers heavy-ball SGD's effective step lr / (1 - momentum) at the top of the cycle (6.7 lr at 0.85
  against 10 lr at a fixed 0.9). torch users get it by default; kdjax's side-by-side with the PyTorch peer turns it
  on to run the peer's recipe.

  The turning step is optax's (pct_start x steps); torch's OneCycleLR turns one step earlier (pct_start x steps - 1),
  for the rate as for the momentum."""
  if not tuple(cfg.cycle_momentum):
    return None
  base, top = cfg.cycle_momentum
  warmup = warmup_steps(cfg, steps_per_epoch)
  steps = max(total_steps - warmup, 1)
  turn = int(cfg.pct_start * steps)  # optax.cosine_onecycle_schedule's peak step, so momentum bottoms out there

  def cosine(start, end, done):
    return start + (end - start) * (1.0 - jnp.cos(jnp.pi * jnp.clip(done, 0.0, 1.0))) / 2.0

  def cycle(count):
    return jnp.where(count < turn, cosine(top, base, count / max(turn, 1)),
                     cosine(base, top, (count - turn) / max(steps - turn, 1)))

  if warmup <= 0:
    return cycle
  return optax.join_schedules([optax.constant_schedule(top), cycle], [warmup])


def make_optimizer(cfg, total_steps: int, steps_per_epoch: int) -> optax.GradientTransformation:
  lr = learning_rate_schedule(cfg, total_steps, steps_per_epoch)
  momentum = momentum_schedule(cfg, total_steps, steps_per_epoch)
  tx = OPTIMIZERS[cfg.name](lr, cfg) if momentum is None else OPTIMIZERS[cfg.name](lr, cfg, momentum)
  if cfg.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx
