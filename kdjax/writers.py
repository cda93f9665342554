"""Metric writers and progress reports: CLU's where TensorFlow is importable, a TF-free twin elsewhere.

CLU 0.0.12's `metric_writers` and `periodic_actions` import TensorFlow at import time. The GPU machines we run on,
and many users, have no TensorFlow, so the same scalars go to TensorBoard event files through the `tensorboard`
package's own event-file writer, and to the console through absl logging. `tensorboard --logdir WORKDIR` shows
either.
"""
import functools
import importlib.util
import json
import os
import tempfile
import time
from typing import Mapping

import jax
from absl import logging


@functools.lru_cache(maxsize=None)
def clu_writers_available() -> bool:
  """Whether CLU's writers import: TensorFlow must be installed and import cleanly (one built for another NumPy
  or CUDA is installed but fails to import; the TF-free writer serves then)."""
  if importlib.util.find_spec('tensorflow') is None:
    return False
  try:
    from clu import metric_writers, periodic_actions  # noqa: F401  (both import TensorFlow)
  except Exception as error:  # a broken TF raises ImportError, or anything at all from its native libraries
    logging.warning('TensorFlow is installed but CLU\'s writers do not import (%s: %s); writing TensorBoard events'
                    ' without it', type(error).__name__, error)
    return False
  return True


def _backend(backend: str) -> str:
  """'clu' or 'tensorboard'; 'auto' is CLU's where it imports."""
  if backend != 'auto':
    return backend
  return 'clu' if clu_writers_available() else 'tensorboard'


class EventFileWriter:
  """Scalars to a TensorBoard event file, written with `tensorboard` only (no TensorFlow)."""

  def __init__(self, logdir: str):
    from tensorboard.summary.writer.event_file_writer import EventFileWriter as _Writer
    self._writer = _Writer(logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                         for k, v in scalars.items()])
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def write_hparams(self, hparams):
    pass  # hyper-parameters are written to config.json in the workdir

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class ConsoleWriter:
  """One log line per write, like CLU's LoggingWriter."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    logging.info('[%d] %s', step, ', '.join(f'{k}={float(v):.4g}' for k, v in sorted(scalars.items())))

  def write_hparams(self, hparams):
    logging.info('hparams: %s', json.dumps(hparams, default=str))

  def flush(self):
    pass

  def close(self):
    pass


class MultiWriter:
  def __init__(self, writers):
    self._writers = list(writers)

  def __getattr__(self, name):
    def call_all(*args, **kwargs):
      for writer in self._writers:
        getattr(writer, name)(*args, **kwargs)
    return call_all


def _is_event_file(name: str) -> bool:
  """TensorBoard's own test of an event file's name (`io_wrapper.IsTensorFlowEventsFile`)."""
  return 'tfevents' in name


def cut_event_files(workdir: str, upto_step: int) -> int:
  """Drop every event after `upto_step` from the event files in `workdir`; return how many were dropped.

  A resumed run redoes the steps after its checkpoint and logs them again, into a new event file. TensorBoard's
  data server keeps every point it reads, so without this cut the redone steps show twice (`report.History` cuts
  history.json back the same way). A file is rewritten to a hidden temporary whose name TensorBoard ignores, then
  renamed over itself: a crash leaves it whole, and its name, which orders the files, is kept. Records are copied
  as they were written (CLU's TF summaries or the TF-free writer's), and a record cut short by a kill is dropped.
  """
  from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
  from tensorboard.compat.proto import event_pb2
  from tensorboard.summary.writer.record_writer import RecordWriter
  dropped = 0
  for name in sorted(filter(_is_event_file, os.listdir(workdir))):
    path = os.path.join(workdir, name)
    records = list(RawEventFileLoader(path).Load())
    kept = [r for r in records if event_pb2.Event.FromString(r).step <= upto_step]
    if len(kept) == len(records) and os.path.getsize(path) == _records_size(records):
      continue
    fd, temporary = tempfile.mkstemp(prefix='.events-cut-', dir=workdir)
    with os.fdopen(fd, 'wb') as f:
      out = RecordWriter(f)
      for record in kept:
        out.write(record)
    os.chmod(temporary, os.stat(path).st_mode & 0o777)  # mkstemp's file is private; keep the original's mode
    os.replace(temporary, path)
    dropped += len(records) - len(kept)
  return dropped


def _records_size(records) -> int:
  """Bytes of these records in the TFRecord format: a 12-byte header and a 4-byte checksum around each."""
  return sum(len(r) + 16 for r in records)


def create_writer(workdir: str, backend: str = 'auto', upto_step: int | None = None):
  """CLU's default writer (backend 'clu'), the TF-free one ('tensorboard'), or CLU where it imports ('auto').

  Only process 0 writes event files; other processes log to the console. A run resumed at `upto_step` first drops
  the events its earlier invocations wrote after that step (see `cut_event_files`).
  """
  if upto_step is not None and jax.process_index() == 0 and os.path.isdir(workdir):
    dropped = cut_event_files(workdir, upto_step)
    if dropped:
      logging.info('dropped %d TensorBoard events after step %d, which this run logs again', dropped, upto_step)
  if _backend(backend) == 'clu':
    from clu import metric_writers
    return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() > 0:
    return ConsoleWriter()
  os.makedirs(workdir, exist_ok=True)
  return MultiWriter([ConsoleWriter(), EventFileWriter(workdir)])


class ProgressReporter:
  """Steps/s and ETA every `every_steps` steps and at the last step (CLU's ReportProgress does the same where TF is
  available)."""

  def __init__(self, num_train_steps: int, writer, every_steps: int):
    self._total, self._writer, self._every = num_train_steps, writer, max(1, every_steps)
    self._last_step, self._last_time = None, None

  def __call__(self, step: int):
    now = time.time()
    if self._last_step is None:
      self._last_step, self._last_time = step, now
      return
    if (step % self._every and step != self._total) or step == self._last_step:
      return
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    eta = (self._total - step) / rate if rate else float('inf')
    logging.info('step %d/%d: %.2f steps/s, ETA %.0f s', step, self._total, rate, eta)
    self._writer.write_scalars(step, {'steps_per_sec': rate})
    self._last_step, self._last_time = step, now


def create_progress(num_train_steps: int, writer, every_steps: int, backend: str = 'auto'):
  if _backend(backend) == 'clu':
    from clu import periodic_actions
    return periodic_actions.ReportProgress(num_train_steps=num_train_steps, writer=writer,
                                           every_steps=every_steps)
  return ProgressReporter(num_train_steps, writer, every_steps)
