"""A run's random streams: one per purpose, none sharing draws with another purpose or another seed."""
import jax
import numpy as np
import pytest
from flax import nnx

from kdjax import rng as rng_lib
from kdjax import train
from tests.tiny_configs import tiny


def _drawn_keys(seed: int, purpose: str, draws: int) -> list[bytes]:
  """The keys a stream hands out: `fold_in(base, n)` for n < draws, as nnx.Rngs and the train step derive them."""
  base = rng_lib.stream(seed, purpose)
  return [np.asarray(jax.random.key_data(jax.random.fold_in(base, n))).tobytes() for n in range(draws)]


def test_no_two_streams_or_seeds_share_a_key():
  # The old scheme seeded purpose k with seed + k and stepped with key(seed): seed 0's dropout drew seed 1's
  # initialisation, and step n's key was the n-th key the initialiser drew. Every key here must be distinct.
  keys = [key for seed in range(4) for purpose in rng_lib.STREAMS for key in _drawn_keys(seed, purpose, 64)]
  assert len(set(keys)) == len(keys) == 4 * len(rng_lib.STREAMS) * 64


def test_unknown_stream_is_refused():
  with pytest.raises(ValueError, match='unknown random stream'):
    rng_lib.stream(0, 'augment')


def test_a_run_draws_each_purpose_from_its_stream(tmp_path):
  """The student's initial weights come from the params stream and the step keys from the steps stream."""
  cfg = tiny.get_config('ce')
  cfg.seed = 3
  run = train.build_run(cfg, str(tmp_path / 'run'))
  expected = nnx.state(train.create_model(cfg.student.name, num_classes=run.data.num_classes,
                                          image_shape=run.data.image_shape, rngs=rng_lib.model_rngs(3),
                                          dtype=train.DTYPES[cfg.compute_dtype],
                                          **{k: v for k, v in cfg.student.items() if k != 'name'}), nnx.Param)
  for got, want in zip(jax.tree.leaves(run.params), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  _, state = run.phase_state(0)
  np.testing.assert_array_equal(np.asarray(state.rng), np.asarray(jax.random.key_data(rng_lib.stream(3, 'steps'))))
