"""Both metric-writer paths write TensorBoard scalars that TensorBoard's own reader reads back."""
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from kdjax import writers

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
