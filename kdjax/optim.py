"""A phase's optax optimizer, built from its `optimizer` config through two registries (rules and schedules)."""
from typing import Callable

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


def _sgd(lr, cfg):
  chain = [optax.add_decayed_weights(cfg.weight_decay)] if cfg.weight_decay else []
  return optax.chain(*chain, optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov))


# (learning-rate schedule, optimizer config) -> optax transformation
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


def make_optimizer(cfg, total_steps: int, steps_per_epoch: int) -> optax.GradientTransformation:
  tx = OPTIMIZERS[cfg.name](learning_rate_schedule(cfg, total_steps, steps_per_epoch), cfg)
  if cfg.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx
