"""Both metric-writer paths write TensorBoard scalars that TensorBoard's own reader reads back."""
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from kdjax import writers


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
