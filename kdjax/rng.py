"""The random streams of a run, all drawn from its one `config.seed`.

Each purpose has its own key, `fold_in(key(seed), index of the purpose)`, so no two purposes of a run, and no two
seeds, share draws. (Seeding each purpose with `seed + k`, as kdjax once did, gave seed 0's dropout the draws of
seed 1's initialisation; and the train step's keys, `fold_in(key(seed), step)`, were the keys the initialiser of
the same run drew its first layers from.)
"""

import jax
from flax import nnx

# Append only: a purpose's index is part of every key drawn for it, so reordering would change every run.
STREAMS = ('params', 'dropout', 'adapters', 'memory', 'steps')


def stream(seed: int, purpose: str) -> jax.Array:
  """The base key of `purpose` (one of STREAMS) in the run seeded with `seed`: a typed key."""
  if purpose not in STREAMS:
    raise ValueError(f'unknown random stream {purpose!r}; streams are {STREAMS}')
  return jax.random.fold_in(jax.random.key(seed), STREAMS.index(purpose))


def model_rngs(seed: int) -> nnx.Rngs:
  """The `nnx.Rngs` a student is built with: its parameters and its dropout from their own streams."""
  return nnx.Rngs(params=stream(seed, 'params'), dropout=stream(seed, 'dropout'))
