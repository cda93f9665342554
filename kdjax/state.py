"""The training state as plain pytrees, and the split of a student's parameters into trainable and frozen parts.

Models are NNX modules used functionally: `nnx.split` once outside the step gives a static graphdef and state
pytrees; the jitted step `nnx.merge`s them back (the Flax performance guide's functional training loop). Only the
pytrees below cross the jit boundary, so they are what is donated, sharded and checkpointed.
"""
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from kdjax import rng as rng_lib


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; the teacher is not in it (frozen, never checkpointed here)."""
  step: jax.Array             # global step, across phases
  params: nnx.State           # the student's nnx.Param leaves
  model_state: nnx.State      # the student's other variables (BatchNorm statistics, RNG counters)
  adapter_params: nnx.State   # learned 1x1 adapters and embedding heads of feature losses (empty when none)
  memory: Any                 # stateful loss terms' memory by term name (CRD's embedding banks); {} when none
  loss_args: Any              # the current phase's float loss arguments and weights (objective.loss_arguments)
  opt_state: Any              # the current phase's optimizer state, over the trainable leaves only
  rng: jax.Array              # base key; the step's key is fold_in(rng, step)
  nonfinite_updates: jax.Array    # how many updates were refused because loss or gradients were not finite
  first_nonfinite_step: jax.Array  # -1, or the step of the first refused update
  first_nonfinite_terms: jax.Array  # per loss term of that step: was it non-finite


def path_string(path) -> str:
  return '/'.join(str(part) for part in path)


def trainable_filter(pattern: str):
  """An NNX filter selecting the variables whose '/'-joined path matches `pattern` (re.search)."""
  regex = re.compile(pattern)
  return lambda path, _: regex.search(path_string(path)) is not None


def split_trainable(tree: nnx.State, pattern: str) -> tuple[nnx.State, nnx.State]:
  """(matching, rest) of an nnx.State, by path regex."""
  return nnx.split_state(tree, trainable_filter(pattern), ...)


def merge(*trees: nnx.State) -> nnx.State:
  return nnx.merge_state(*trees)


def init_state(student_params, model_state, adapter_params, opt_state, seed: int, num_terms: int,
               memory=None, loss_args=None) -> TrainState:
  return TrainState(step=jnp.int32(0), params=student_params, model_state=model_state,
                    adapter_params=adapter_params, memory=memory or {}, loss_args=loss_args or {},
                    opt_state=opt_state, rng=jax.random.key_data(rng_lib.stream(seed, 'steps')),
                    nonfinite_updates=jnp.int32(0), first_nonfinite_step=jnp.int32(-1),
                    first_nonfinite_terms=jnp.zeros((num_terms,), bool))
