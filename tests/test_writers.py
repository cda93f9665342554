"""Both metric-writer paths write TensorBoard scalars that TensorBoard's own reader reads back."""
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from kdjax import writers
from kdjax.errors import UserError
from tests.conftest import TINY, events_by_tag_and_step, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_scalars(logdir):
  """{tag: [(step, value)]} from simple-value scalars (TF-free writer) or scalar tensors (TF summaries)."""
  accumulator = EventAccumulator(logdir)
  accumulator.Reload()
  scalars = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()['scalars']}
  for tag in accumulator.Tags()['tensors']:
    scalars[tag] = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in accumulator.Tensors(tag)]
  return scalars


def _write(backend, logdir):
  writer = writers.create_writer(str(logdir), backend=backend)
  writer.write_scalars(1, {'train/loss': 2.5, 'eval/top1': 0.25})
  writer.write_scalars(2, {'train/loss': 1.5})
  progress = writers.create_progress(10, writer, every_steps=1, backend=backend)
  progress(1)
  progress(2)
  writer.flush()
  writer.close()


def test_tensorflow_free_writer(tmp_path):
  _write('tensorboard', tmp_path)
  scalars = _read_scalars(str(tmp_path))
  assert scalars['train/loss'] == [(1, 2.5), (2, 1.5)]
  assert scalars['eval/top1'] == [(1, 0.25)]
  assert 'steps_per_sec' in scalars


def test_clu_writer_when_tensorflow_is_present(tmp_path):
  pytest.importorskip('tensorflow')
  _write('clu', tmp_path)
  scalars = _read_scalars(str(tmp_path))
  assert [step for step, _ in scalars['train/loss']] == [1, 2]
  assert scalars['train/loss'][1][1] == pytest.approx(1.5)


def test_a_tensorflow_that_fails_to_import_falls_back_to_the_tensorflow_free_writer(tmp_path):
  """A TF built for another NumPy or CUDA is installed (find_spec sees it) but raises on import. In a subprocess:
  TensorBoard caches a failed TF import for the rest of the process."""
  broken = tmp_path / 'site' / 'tensorflow'
  broken.mkdir(parents=True)
  (broken / '__init__.py').write_text('raise ImportError("built against another NumPy")\n')
  script = ('import sys; from kdjax import writers; from tests import test_writers; '
            'assert not writers.clu_writers_available(); test_writers._write("auto", sys.argv[1])')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / 'site'), ROOT]))
  done = subprocess.run([sys.executable, '-c', script, str(tmp_path / 'logs')], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "TensorFlow is installed but CLU's writers do not import" in done.stderr
  assert _read_scalars(str(tmp_path / 'logs'))['train/loss'] == [(1, 2.5), (2, 1.5)]


class _Recorder:
  def __init__(self):
    self.steps = []

  def write_scalars(self, step, values):
    self.steps.append(step)


def test_tensorflow_free_progress_reports_every_n_steps_and_the_last():
  """As CLU's ReportProgress: every `every_steps` steps after the first call, and at the last step (25 % 10 != 0)."""
  recorder = _Recorder()
  progress = writers.ProgressReporter(25, recorder, every_steps=10)
  for step in range(1, 26):
    progress(step)
  assert recorder.steps == [10, 20, 25]


@pytest.mark.parametrize('backend', ['tensorboard', 'clu'])
def test_a_resumed_run_logs_each_step_once(tmp_path, backend):
  """A run killed after logging steps 1-4, resumed from its checkpoint at step 2, logs 3 and 4 again: the event
  files then hold steps 3 and 4 once, with the resumed run's values, and the first file keeps its name."""
  if backend == 'clu':
    pytest.importorskip('tensorflow')
  first = writers.create_writer(str(tmp_path), backend=backend, upto_step=0)
  for step in range(1, 5):
    first.write_scalars(step, {'train/loss': float(step)})
  first.close()
  (name,) = [n for n in os.listdir(tmp_path) if 'tfevents' in n]
  mode = os.stat(tmp_path / name).st_mode
  second = writers.create_writer(str(tmp_path), backend=backend, upto_step=2)
  for step in (3, 4):
    second.write_scalars(step, {'train/loss': 10.0 * step})
  second.close()
  assert events_by_tag_and_step(str(tmp_path)) == {
      ('train/loss', 1): [1.0], ('train/loss', 2): [2.0], ('train/loss', 3): [30.0], ('train/loss', 4): [40.0]}
  assert os.stat(tmp_path / name).st_mode == mode


def test_a_record_cut_short_by_a_kill_is_dropped_and_the_rest_kept(tmp_path):
  writer = writers.create_writer(str(tmp_path), backend='tensorboard')
  writer.write_scalars(1, {'train/loss': 1.0})
  writer.write_scalars(2, {'train/loss': 2.0})
  writer.close()
  (name,) = [n for n in os.listdir(tmp_path) if 'tfevents' in n]
  path = tmp_path / name
  whole = path.read_bytes()
  path.write_bytes(whole + whole[-30:-5])  # half a record: a kill in the middle of a write
  assert writers.cut_event_files(str(tmp_path), upto_step=5) == 0
  assert path.read_bytes() == whole
  assert writers.cut_event_files(str(tmp_path), upto_step=1) == 1
  assert events_by_tag_and_step(str(tmp_path)) == {('train/loss', 1): [1.0]}


def test_the_environment_picks_the_writer(monkeypatch):
  """$KDJAX_METRIC_WRITER chooses where no backend is passed; a bad value, or `clu` without TensorFlow, is one error
  naming the fix."""
  monkeypatch.delenv(writers.WRITER_ENV, raising=False)
  assert writers._backend(None) == ('clu' if writers.clu_writers_available() else 'tensorboard')
  monkeypatch.setenv(writers.WRITER_ENV, 'tensorboard')
  assert writers._backend(None) == 'tensorboard'
  assert writers._backend('auto') == ('clu' if writers.clu_writers_available() else 'tensorboard')  # passed wins
  monkeypatch.setenv(writers.WRITER_ENV, 'tensorflow')
  with pytest.raises(UserError, match="KDJAX_METRIC_WRITER='tensorflow' is not a metric writer; set it to one of"):
    writers._backend(None)
  monkeypatch.setenv(writers.WRITER_ENV, 'clu')
  monkeypatch.setattr(writers.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(UserError, match=r"KDJAX_METRIC_WRITER=clu needs TensorFlow.*unset it"):
    writers._backend(None)


def test_a_run_left_to_choose_writes_through_clu_where_tensorflow_imports(tmp_path):
  """main.py with $KDJAX_METRIC_WRITER unset (the tests set it): CLU's writer and progress report, whose scalars
  are tensor summaries (the TF-free writer's are simple values)."""
  pytest.importorskip('tensorflow')
  run_main('--config', f'{TINY}:ce', '--workdir', str(tmp_path), '--config.data.train_split=train[:10%]',
           env={writers.WRITER_ENV: None}, check=True)
  accumulator = EventAccumulator(str(tmp_path))
  accumulator.Reload()
  assert {'train/ce', 'eval/top1', 'steps_per_sec'} <= set(accumulator.Tags()['tensors'])
  assert not accumulator.Tags()['scalars']


def test_the_tensorflow_free_writer_imports_no_tensorflow_where_it_is_installed(tmp_path):
  """Writing and cutting event files leave TensorFlow unimported (TensorBoard's own writer and reader import it
  wherever it is installed: ~9 s at each start of a run). In a subprocess: this one may have imported it."""
  pytest.importorskip('tensorflow')
  script = ('import sys; from kdjax import writers; from tests import test_writers; '
            'test_writers._write("tensorboard", sys.argv[1]); writers.cut_event_files(sys.argv[1], upto_step=1); '
            'loaded = sorted(m for m in ("tensorflow", "keras", "sklearn") if m in sys.modules); '
            'assert not loaded, loaded')
  done = subprocess.run([sys.executable, '-c', script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert events_by_tag_and_step(str(tmp_path)) == {('train/loss', 1): [2.5], ('eval/top1', 1): [0.25]}
