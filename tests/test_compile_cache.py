"""Runs that differ only in float loss arguments share one compiled train program (persistent compilation cache)."""
import json
import os

import pytest

from tests.conftest import TINY, run_main


@pytest.mark.long
def test_sweep_cells_differing_in_alpha_and_temperature_share_the_compiled_step(tmp_path, teacher_workdir):
  """A 2 x 2 alpha x temperature sweep through main.py, with the cache where main.py puts it by default
  (`<data.cache_dir>/jax_compilation`): four runs, one compiled train program."""
  cache_dir = tmp_path / 'cache'
  env = {'JAX_COMPILATION_CACHE_DIR': None,  # unset: main.py chooses the folder
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', 'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
  run_main('--config', f'{TINY}:kd', '--workdir', str(tmp_path / 'sweep'), f'--config.teacher.workdir={teacher_workdir}',
           f'--config.data.cache_dir={cache_dir}', '--config.suite=sweep', '--config.repeats.seeds=(0,)',
           '--config.phases.train.epochs=1',
           '--config.sweep.grid=phases.train.losses.kd.alpha=0.3,0.7;phases.train.losses.kd.temperature=2.0,6.0',
           env=env, check=True, timeout=600)
  results = json.loads((tmp_path / 'sweep' / 'results.json').read_text())
  assert len(results['runs']) == 4, results['runs'].keys()
  entries = os.listdir(cache_dir / 'jax_compilation')
  programs = {name.rsplit('-', 1)[0] for name in entries if name.startswith('jit_train_program-')}
  assert len(programs) == 1, sorted(entries)
