"""JAX's persistent compilation cache, on by default for command-line runs.

A KD run compiles its train step once per phase; a sweep or repeats compiles it once per run, and resuming a
killed run compiles again. Compiled programs are keyed by their HLO, and the runs of a sweep that differ only in
float loss arguments or the seed lower to the same HLO (those values travel in the train state, see
`kdjax.objective.loss_arguments`), so with the cache on only the first of them pays for compilation.
"""
import os

import jax
from absl import logging

from kdjax.data import cache as cache_lib


def enable(cache_dir: str | None) -> str | None:
  """Point JAX's compilation cache at `<cache root>/jax_compilation` unless the user chose a folder already.

  JAX_COMPILATION_CACHE_DIR (JAX's own variable) wins, and an empty one turns the cache off. JAX keeps only
  programs that took at least `jax_persistent_cache_min_compile_time_secs` (1 s by default) to compile.
  """
  if 'JAX_COMPILATION_CACHE_DIR' in os.environ:
    return os.environ['JAX_COMPILATION_CACHE_DIR'] or None
  folder = os.path.join(cache_lib.cache_root(cache_dir), 'jax_compilation')
  jax.config.update('jax_compilation_cache_dir', folder)
  logging.info('compilation cache: %s', folder)
  return folder
