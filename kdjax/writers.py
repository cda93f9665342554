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


def create_writer(workdir: str, backend: str = 'auto'):
  """CLU's default writer (backend 'clu'), the TF-free one ('tensorboard'), or CLU where it imports ('auto').

  Only process 0 writes event files; other processes log to the console.
  """
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
