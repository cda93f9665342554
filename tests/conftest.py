"""Every test sees 8 simulated CPU devices, so sharding is exercised everywhere (set before JAX is imported)."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# JAX's persistent compilation cache, shared by every test of this session: the pytest-xdist workers and the
# main.py processes the tests start (a kill-and-resume test compiles the same programs after each kill). A compiled
# program is keyed by its HLO, compile options, devices and JAX version, so a hit runs the program that a compile
# would have made; the cache only saves compile time. It is a fresh folder per session, never ~/.cache (a test run
# neither reads nor leaves a user's cache), made once by the process that loads this first (pytest-xdist's
# controller) and inherited by the workers through the environment. Tests of the cache itself set their own.
_SESSION_CACHE_VAR = 'KDJAX_TEST_COMPILATION_CACHE'
_OWN_COMPILATION_CACHE = None
if _SESSION_CACHE_VAR not in os.environ:
  _OWN_COMPILATION_CACHE = os.environ[_SESSION_CACHE_VAR] = tempfile.mkdtemp(prefix='kdjax-tests-xla-')
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.environ[_SESSION_CACHE_VAR]
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'  # the tests' programs are small: keep them all
# Metric writers: the TF-free one, in every test and every main.py a test starts. Where TensorFlow is installed (CI
# installs the `tf` extra) CLU's writer would import it in each of those processes, about 5 s of each one's start;
# tests/test_writers.py tests CLU's writer, and a run that picks it, by name.
os.environ.setdefault('KDJAX_METRIC_WRITER', 'tensorboard')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'tiny_configs', 'tiny.py')


def pytest_collection_modifyitems(items):
  """Tests marked `long` first (a stable sort: the rest keep their order). Under pytest-xdist the other worker
  works through the short ones meanwhile, instead of a long test started last running alone at the end."""
  items.sort(key=lambda item: item.get_closest_marker('long') is None)


def pytest_sessionfinish(session):
  """The process that made the session's compilation cache removes it (workers finish before the controller)."""
  if _OWN_COMPILATION_CACHE is not None:
    shutil.rmtree(_OWN_COMPILATION_CACHE, ignore_errors=True)


def run_main(*args, env=None, timeout=300, check=False):
  """Run `python main.py ARGS` in a fresh process; returns the CompletedProcess (stdout+stderr text).

  `env` adds to this process's environment; a value of None removes that variable.
  """
  full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, env=full_env)
  if check and proc.returncode != 0:
    raise AssertionError(f'main.py {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  return proc


@pytest.fixture
def cache_dir(tmp_path):
  """A decode cache of the test's own, so tests never share (or pollute) ~/.cache/kdjax."""
  return str(tmp_path / 'cache')


@pytest.fixture(scope='session')
def teacher_workdir(tmp_path_factory):
  """A finished tiny teacher run (cnn3 on digits), shared by the KD and stage-wise tests, which only read it.

  Trained once per session: by the first pytest-xdist worker that needs it, in the folder the workers share, while
  the others wait on a lock (each training its own, both at once on 2 cores, took 25 s instead of 11).
  """
  import fcntl
  from kdjax import train
  from tests.tiny_configs import tiny
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if 'PYTEST_XDIST_WORKER' in os.environ else base  # the session's folder above the workers'
  workdir = shared / 'teacher'
  with open(shared / 'teacher.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if training raised
    if not (workdir / 'summary.json').exists():  # written last: a run that failed midway is resumed here
      train.train_and_evaluate(tiny.get_config('teacher'), str(workdir))
  return str(workdir)


def events_by_tag_and_step(logdir):
  """{(tag, step): [value, ...]} over every event file of `logdir`, as written: TensorBoard's data server shows
  each of them (its legacy EventAccumulator would hide repeats by purging out-of-order steps). Imported lazily:
  most tests never read event files."""
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  from tensorboard.util import tensor_util
  points = {}
  for name in sorted(os.listdir(logdir)):
    assert not name.startswith('.events-cut-'), 'a temporary was left behind'
    if 'tfevents' not in name:
      continue
    for event in EventFileLoader(os.path.join(logdir, name)).Load():
      for value in event.summary.value:
        number = (value.simple_value if value.HasField('simple_value')
                  else float(tensor_util.make_ndarray(value.tensor)))
        points.setdefault((value.tag, event.step), []).append(number)
  return points
