"""Multi-process training through `jax.distributed`: 2 processes on localhost (CPU, Gloo collectives).

Two `main.py` processes with one CPU device each train the tiny CE config as one 2-device run, and must end where
a single process with 2 devices ends: same global batch, same order, same parameters up to the float noise of
reducing the gradients across processes instead of inside one. This is the path a multi-host GPU/TPU run takes
(coordinator, per-process batch shards, one checkpoint written together, files and event logs from process 0).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kdjax import checkpoint as ckpt_lib
from tests.conftest import ROOT, TINY

TIMEOUT_S = 240


def _gloo_missing() -> str:
  """Why this jaxlib cannot run CPU collectives across processes ('' when it can)."""
  try:
    from jax._src.lib import _jax
  except ImportError as error:
    return f'jaxlib internals moved ({error}); cannot tell whether Gloo CPU collectives exist'
  if not hasattr(_jax, 'make_gloo_tcp_collectives'):
    return 'this jaxlib was built without Gloo CPU collectives (make_gloo_tcp_collectives)'
  return ''


pytestmark = pytest.mark.skipif(bool(_gloo_missing()), reason=_gloo_missing() or 'n/a')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# `python -c` this, then STEP and main.py's arguments: main.py in a process that cannot read checkpoint STEP of
# checkpoints/ (as a host with a failing disk or mount would), while the other processes can.
_CANNOT_READ_ONE_STEP = """
import os, runpy, sys
import orbax.checkpoint as ocp
unreadable = int(sys.argv.pop(1))
restore = ocp.CheckpointManager.restore
def restore_or_fail(self, step, *args, **kwargs):
  if step == unreadable and os.path.basename(str(self.directory)) == 'checkpoints':
    raise OSError(f'checkpoint {step} cannot be read by this process (injected by the test)')
  return restore(self, step, *args, **kwargs)
ocp.CheckpointManager.restore = restore_or_fail
sys.argv[0] = os.path.join(os.getcwd(), 'main.py')
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def _start(workdir, log, devices, extra_env=None, args=(), program=('main.py',)):
  """`main.py` (or `program`, the arguments of python before main.py's) on the tiny CE config in a fresh process
  with `devices` CPU devices; output to `log`."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
         **(extra_env or {})}
  with open(log, 'w') as out:
    return subprocess.Popen([sys.executable, *program, '--config', f'{TINY}:ce', '--workdir', workdir, *args],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _failing(proc, log) -> bool:
  """Exited with an error, or printed a traceback: a multi-process run that failed can hang for minutes before it
  exits (the survivors, and the failed process itself at its shutdown barrier, wait for their peers)."""
  if proc.poll() not in (None, 0):
    return True
  with open(log, errors='replace') as f:
    return 'Traceback (most recent call last)' in f.read()


def _wait_all(procs: dict, logs: dict) -> None:
  """Wait for every process; once one fails, stop them all and show the failing logs."""
  deadline = time.time() + TIMEOUT_S
  failed = []
  try:
    while any(p.poll() is None for p in procs.values()):
      failed = [name for name, p in procs.items() if _failing(p, logs[name])]
      if failed or time.time() > deadline:
        break
      time.sleep(0.5)
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
      p.wait()
  bad = {name: p.returncode for name, p in procs.items() if p.returncode != 0 or name in failed}
  if bad:
    tails = '\n'.join(f'--- {name} (rc {procs[name].returncode}):\n{open(logs[name]).read()[-3000:]}' for name in bad)
    raise AssertionError(f'processes failed (or timed out after {TIMEOUT_S} s): {bad}\n{tails}')


def _final_variables(workdir) -> dict[str, np.ndarray]:
  """{path: array} of the newest checkpoint, restored onto one local device whatever topology saved it.

  A checkpoint written by 2 processes records their devices (CPU ids 0 and 2048 here), which this process does not
  have, so Orbax needs an explicit target sharding.
  """
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')), item_handlers={
      'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()})
  step = manager.latest_step()
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                        manager.item_metadata(step)['state'])
  raw = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
  manager.close()
  return {**ckpt_lib._flatten_raw(raw['params']), **ckpt_lib._flatten_raw(raw['model_state']),
          'step': np.asarray(raw['step'])}


def _printed_summary(log) -> dict:
  lines = [line for line in open(log).read().splitlines() if line.startswith('{"train"')]
  assert lines, f'no summary line in {log}'
  return json.loads(lines[-1])['train']


@pytest.mark.long
def test_two_processes_match_one_process_with_the_same_devices(tmp_path):
  """2 processes x 1 CPU device == 1 process x 2 CPU devices: same final parameters, same eval accuracy."""
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  port = _free_port()
  logs = {name: str(tmp_path / f'{name}.log') for name in ('process0', 'process1', 'single')}
  procs = {f'process{i}': _start(multi, logs[f'process{i}'], 1, {
      'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': str(i)})
           for i in range(2)}
  procs['single'] = _start(single, logs['single'], 2)  # concurrently: the 3 processes share the cores
  _wait_all(procs, logs)

  a, b = _final_variables(multi), _final_variables(single)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=2e-5, err_msg=key)
  with open(os.path.join(multi, 'summary.json')) as f:
    summary_multi = json.load(f)
  with open(os.path.join(single, 'summary.json')) as f:
    summary_single = json.load(f)
  assert summary_multi['steps'] == summary_single['steps']
  assert summary_multi['eval_top1'] == pytest.approx(summary_single['eval_top1'], abs=1e-6)
  assert summary_multi['eval_top1'] > 0.5
  # Every process computed the same global metrics; only process 0 wrote event files.
  printed = [_printed_summary(logs[f'process{i}']) for i in range(2)]
  assert printed[0]['eval_top1'] == printed[1]['eval_top1'] == summary_multi['eval_top1']
  assert len([f for f in os.listdir(multi) if f.startswith('events.out.tfevents')]) == 1


def _two_processes(workdir, tmp_path, tag, args=(), programs=None):
  """Two main.py processes of one run; `programs` maps a process's name to its `_start` program."""
  port = _free_port()
  logs = {f'process{i}': str(tmp_path / f'{tag}{i}.log') for i in range(2)}
  procs = {name: _start(workdir, logs[name], 1, {'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}',
                                                 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': name[-1]}, args,
                        **({'program': programs[name]} if name in (programs or {}) else {}))
           for name in logs}
  _wait_all(procs, logs)
  return logs


# The fault tests' run: checkpoints every 10 steps, all kept, and dropout, whose RNG state (a typed key) is placed
# and restored across processes too.
FAULT_ARGS = ['--config.checkpoint_every_steps=10', '--config.keep_checkpoints=10', '--config.student.dropout=0.5']


@pytest.fixture(scope='module')
def finished_two_process_run(tmp_path_factory):
  """A finished two-process run with FAULT_ARGS; each fault test resumes a copy of it with its newest checkpoint
  unreadable, and must end where it ended."""
  folder = tmp_path_factory.mktemp('two_process_run')
  workdir = str(folder / 'multi')
  _two_processes(workdir, folder, 'first', FAULT_ARGS)
  return workdir


def _copy_with_reference(run, tmp_path):
  """A copy of `run` to resume, its final variables and its checkpoint steps."""
  workdir = str(tmp_path / 'multi')
  shutil.copytree(run, workdir)
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  return workdir, _final_variables(workdir), steps


def _plain(variables: dict) -> dict:
  """RNG keys as their raw data, which numpy compares."""
  keys = lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  return {name: np.asarray(keys(x)) for name, x in variables.items()}


def _assert_resumed_from_the_previous_checkpoint(workdir, reference, steps):
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  assert os.path.isdir(os.path.join(workdir, 'corrupt_checkpoints', str(steps[-1])))
  assert all(os.path.isdir(os.path.join(ckpt_dir, str(s))) for s in steps)  # the end step was saved again
  resumed, reference = _plain(_final_variables(workdir)), _plain(reference)
  assert resumed.keys() == reference.keys()
  for key in reference:
    np.testing.assert_allclose(resumed[key], reference[key], rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.long
def test_two_processes_fall_back_together_from_a_corrupted_checkpoint(tmp_path, finished_two_process_run):
  """Both processes fail to read the torn latest checkpoint; process 0 alone moves it aside, both wait for the
  move, and both resume from the previous one, ending where the uninterrupted run ended."""
  workdir, reference, steps = _copy_with_reference(finished_two_process_run, tmp_path)
  assert any(jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) for x in reference.values())  # dropout's RNG
  for root, _, files in os.walk(os.path.join(workdir, 'checkpoints', str(steps[-1]), 'state')):
    for name in files:
      with open(os.path.join(root, name), 'r+b') as f:
        f.truncate(os.path.getsize(os.path.join(root, name)) // 3)
  logs = _two_processes(workdir, tmp_path, 'second', FAULT_ARGS)
  for name, log in logs.items():
    assert f'checkpoint {steps[-1]} in' in open(log).read(), name
  _assert_resumed_from_the_previous_checkpoint(workdir, reference, steps)


@pytest.mark.long
def test_a_checkpoint_one_process_cannot_read_is_set_aside_by_both(tmp_path, finished_two_process_run):
  """Process 1 alone fails to read the newest checkpoint (process 0 reads it): both must still agree, set it aside
  and resume from the previous one, ending where the uninterrupted run ended, rather than process 0 waiting for
  process 1 inside a restore that process 1 has left."""
  workdir, reference, steps = _copy_with_reference(finished_two_process_run, tmp_path)
  logs = _two_processes(workdir, tmp_path, 'second', FAULT_ARGS,
                        programs={'process1': ('-c', _CANNOT_READ_ONE_STEP, str(steps[-1]))})
  assert 'another process failed to restore it' in open(logs['process0']).read()
  assert 'injected by the test' in open(logs['process1']).read()
  _assert_resumed_from_the_previous_checkpoint(workdir, reference, steps)
