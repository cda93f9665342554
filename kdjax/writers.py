"""Metric writers and progress reports: CLU's where TensorFlow is importable, a TF-free twin elsewhere.

CLU 0.0.12's `metric_writers` and `periodic_actions` import TensorFlow at import time. The GPU machines we run on,
and many users, have no TensorFlow, so the same scalars go to TensorBoard event files through a writer of kdjax's
own on the `tensorboard` package's record format and protos, and to the console through absl logging.
`tensorboard --logdir WORKDIR` shows either.

`KDJAX_METRIC_WRITER` picks one for every run of a process and the processes it starts: `auto` (the default: CLU's
where it imports), `clu` or `tensorboard`. Importing TensorFlow takes about 5 s on a CPU, most of a tiny run's
start-up, so the test suite, which starts `main.py` many times, sets `tensorboard` (tests/conftest.py).
"""
import functools
import importlib.util
import itertools
import json
import os
import socket
import struct
import tempfile
import time
from typing import Mapping

import jax
from absl import logging

from kdjax.errors import UserError

WRITER_ENV = 'KDJAX_METRIC_WRITER'
BACKENDS = ('auto', 'clu', 'tensorboard')


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


def requested_backend() -> str:
  """$KDJAX_METRIC_WRITER, 'auto' where unset; a value no writer can serve is one error naming the fix. Cheap (it
  imports nothing), so main.py checks it before any data is read."""
  backend = os.environ.get(WRITER_ENV) or 'auto'
  if backend not in BACKENDS:
    raise UserError(f'{WRITER_ENV}={backend!r} is not a metric writer; set it to one of {", ".join(BACKENDS)} '
                    'or unset it')
  if backend == 'clu' and importlib.util.find_spec('tensorflow') is None:
    raise UserError(f'{WRITER_ENV}=clu needs TensorFlow, which CLU\'s writers import: '
                    "pip install -e '.[tf]', or unset it for the TF-free writer")
  return backend


def _backend(backend: str | None) -> str:
  """'clu' or 'tensorboard': `backend`, else $KDJAX_METRIC_WRITER's; 'auto' is CLU's where it imports."""
  if backend is None:
    backend = requested_backend()
  if backend != 'auto':
    return backend
  return 'clu' if clu_writers_available() else 'tensorboard'


class EventFileWriter:
  """Scalars to a TensorBoard event file, written with `tensorboard`'s record format and protos only.

  Not `tensorboard`'s own EventFileWriter: that one opens files through `tensorboard.compat.tf`, which imports
  TensorFlow (and with it Keras and scikit-learn, about 9 s on a CPU) wherever TensorFlow is installed. Each write
  is flushed, so a TensorBoard open on the workdir shows the run as it goes and a kill loses no logged step.
  """
  _opened = itertools.count()  # orders the files of one process opened within the same second

  def __init__(self, logdir: str):
    from tensorboard.summary.writer.record_writer import RecordWriter
    name = 'events.out.tfevents.%010d.%s.%d.%d' % (time.time(), socket.gethostname(), os.getpid(),
                                                    next(self._opened))
    self._file = open(os.path.join(logdir, name), 'wb')
    self._records = RecordWriter(self._file)
    self._write(file_version='brain.Event:2')

  def _write(self, **fields):
    """One Event record with `fields`, stamped with the time."""
    from tensorboard.compat.proto import event_pb2
    self._records.write(event_pb2.Event(wall_time=time.time(), **fields).SerializeToString())
    self._file.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    from tensorboard.compat.proto import summary_pb2
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                         for k, v in scalars.items()])
    self._write(step=int(step), summary=summary)

  def write_hparams(self, hparams):
    pass  # hyper-parameters are written to config.json in the workdir

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


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
  from tensorboard.compat.proto import event_pb2
  from tensorboard.summary.writer.record_writer import RecordWriter
  dropped = 0
  for name in sorted(filter(_is_event_file, os.listdir(workdir))):
    path = os.path.join(workdir, name)
    records, whole_bytes = read_records(path)
    kept = [r for r in records if event_pb2.Event.FromString(r).step <= upto_step]
    if len(kept) == len(records) and os.path.getsize(path) == whole_bytes:
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


def read_records(path: str) -> tuple[list[bytes], int]:
  """The records of a TFRecord file (an event file) up to the first one cut short or damaged, as TensorBoard reads
  them, and the bytes they span (less than the file's size after such a record); without TensorBoard's own reader,
  which imports TensorFlow wherever it is installed (see EventFileWriter).

  A record is its length (8 bytes, little-endian), that length's masked CRC-32C (4), the data, the data's (4).
  """
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
  with open(path, 'rb') as f:
    content = f.read()
  records, at = [], 0
  while at + 12 <= len(content):
    header = content[at:at + 8]
    (length,) = struct.unpack('<Q', header)
    end = at + 12 + length + 4
    if end > len(content) or struct.unpack('<I', content[at + 8:at + 12])[0] != masked_crc32c(header):
      break
    data = content[at + 12:at + 12 + length]
    if struct.unpack('<I', content[end - 4:end])[0] != masked_crc32c(data):
      break
    records.append(data)
    at = end
  return records, at


def create_writer(workdir: str, backend: str | None = None, upto_step: int | None = None):
  """CLU's default writer (backend 'clu'), the TF-free one ('tensorboard'), or CLU where it imports ('auto');
  None: as $KDJAX_METRIC_WRITER says.

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


def create_progress(num_train_steps: int, writer, every_steps: int, backend: str | None = None):
  if _backend(backend) == 'clu':
    from clu import periodic_actions
    return periodic_actions.ReportProgress(num_train_steps=num_train_steps, writer=writer,
                                           every_steps=every_steps)
  return ProgressReporter(num_train_steps, writer, every_steps)
