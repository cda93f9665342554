"""What the benchmark scripts share: phases built the way `kdjax.train` builds them, timers and reports.

The benchmarks must measure the step that training really runs, so nothing here re-implements a step: a phase is
assembled from kdjax's own pieces (the model registry, `build_objective`, `make_optimizer`, `init_state`,
`PhaseStep`, `jit_train_program`, `ResidentDataset`) in the order `kdjax.train.train_and_evaluate` uses them, over the
1-D data mesh of all local devices. Timed loops call `jax.block_until_ready` only after their last step, so the host
runs ahead of the device as it does in training.
"""
import dataclasses
import datetime
import math
import os
import platform
import sys
import time
from typing import Any

import flax
import jax
import numpy as np
from flax import nnx

from kdjax import config as config_lib
from kdjax import mesh as mesh_lib
from kdjax import metrics as metrics_lib
from kdjax import objective as objective_lib
from kdjax import optim
from kdjax import report
from kdjax import rng as rng_lib
from kdjax import run_data
from kdjax import state as state_lib
from kdjax import steps
from kdjax import teacher_cache
from kdjax.data import augment
from kdjax.data import loader
from kdjax.data import sources
from kdjax.errors import UserError
from kdjax.models import create_model
from kdjax.train import DTYPES

# kdjax's cnn2 has a 128-unit hidden layer with dropout by default; the PyTorch peer's CNN2 has neither. The
# benchmarks build the peer's shape so that both sides run the same model.
ARCH_KWARGS = {'cnn2': dict(hidden=0, dropout=0.0)}
NUM_SYNTHETIC_CLASSES = 10


def peer_recipe(learning_rate: float) -> Any:
  """The PyTorch peer's optimizer: SGD, Nesterov momentum, L2 5e-4, one-cycle schedule rising for 25 % of the steps
  (its OneCycleLR's pct_start), with the momentum cycled between 0.85 and 0.95 as its OneCycleLR does by default."""
  return config_lib.optimizer('sgd', learning_rate, nesterov=True, weight_decay=5e-4, schedule='onecycle',
                              pct_start=0.25, cycle_momentum=(0.85, 0.95))


def parse_kd(spec: str) -> tuple[float, float]:
  """'alpha:temperature' (a third ':lr' field, as the peer takes, is ignored here)."""
  alpha, temperature = (float(v) for v in spec.split(':')[:2])
  return alpha, temperature


def phase_losses(kd: tuple[float, float]) -> dict[str, tuple[str, dict]]:
  """Each benchmarked phase: (which model trains, its loss terms). The KD phases add the frozen teacher (run, or
  looked up in its output cache)."""
  alpha, temperature = kd
  ce = {'ce': config_lib.loss_term('ce')}
  hinton = {'kd': config_lib.loss_term('hinton_kd', alpha=alpha, temperature=temperature)}
  return {'teacher': ('teacher', ce), 'student_ce': ('student', ce), 'student_kd': ('student', hinton),
          'student_kd_cached': ('student', hinton)}


# ---------------------------------------------------------------------------------------------------------------
# Data.

def synthetic_images(num_examples: int, image_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
  """Random uint8 images and labels: speed does not depend on pixel values, and no download is needed."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num_examples, image_size, image_size, 3), dtype=np.uint8)
  labels = rng.integers(0, NUM_SYNTHETIC_CLASSES, num_examples).astype(np.int32)
  return images, labels, NUM_SYNTHETIC_CLASSES


def load_images(dataset: str, image_size: int, num_examples: int, cache_dir: str = ''
                ) -> tuple[np.ndarray, np.ndarray, int]:
  """`synthetic`, or the training split of any kdjax dataset source (resized to image_size unless 0)."""
  if dataset == 'synthetic':
    return synthetic_images(num_examples, image_size)
  split = sources.load_split(os.path.expanduser(dataset), 'train', image_size=image_size or None,
                             cache_dir=cache_dir or None)
  count = min(num_examples, len(split.labels)) if num_examples else len(split.labels)
  return split.images[:count], split.labels[:count].astype(np.int32), len(split.class_names)


def resident(images: np.ndarray, labels: np.ndarray, mesh) -> loader.ResidentDataset:
  return loader.ResidentDataset.from_arrays(images, labels, mesh)


# ---------------------------------------------------------------------------------------------------------------
# Phases.

@dataclasses.dataclass
class Phase:
  """One phase's jitted train and eval steps and its (replicated) state, as `kdjax.train` holds them."""
  name: str
  train_fn: Any         # jax.jit of steps.train_step (student state donated): the bare step
  steps_fn: Any         # jax.jit of steps.train_program: what the trainer dispatches (gather, step, metrics)
  metrics_template: Any  # an empty accumulator of steps_fn: each loop starts from a fresh copy (they are donated)
  eval_program: steps.EvalProgram  # what `kdjax.train.Run.evaluate` dispatches per eval batch
  state: state_lib.TrainState
  teacher_vars: Any     # the train step's teacher argument (variables, or a cached table); None without a teacher
  eval_teacher_vars: Any  # the eval step's teacher variables; None without a teacher


def make_preprocess(images: np.ndarray, dtype, augment_name: str = 'crop_flip') -> steps.Preprocess:
  size = images.shape[1]
  mean, std = run_data.channel_stats(images)
  return steps.Preprocess(
      augment=lambda rng, x: augment.AUGMENTATIONS[augment_name](rng, x, image_size=size),
      evaluate=lambda x: augment.eval_transform(x, image_size=size), mean=mean, std=std, dtype=dtype,
      image_size=size)


def build_model(name: str, *, num_classes: int, image_shape, dtype, seed: int) -> nnx.Module:
  return create_model(name, num_classes=num_classes, image_shape=tuple(image_shape),
                      rngs=rng_lib.model_rngs(seed), dtype=dtype, **ARCH_KWARGS.get(name, {}))


def frozen_teacher(name: str, *, num_classes: int, image_shape, dtype, mesh) -> tuple[steps.Teacher, Any]:
  """A freshly initialised teacher: its speed is a trained one's (only the values of its weights differ)."""
  graphdef, variables = nnx.split(build_model(name, num_classes=num_classes, image_shape=image_shape,
                                              dtype=dtype, seed=100))
  return steps.Teacher(graphdef), mesh_lib.replicate(variables, mesh)


def cached_teacher(teacher: tuple, dataset: loader.ResidentDataset, augment_name: str,
                   preprocess: steps.Preprocess, batch_size: int) -> tuple[tuple, float]:
  """((CachedTeacher, its table on the devices), seconds to build the table), as `teacher.cache=True` runs do."""
  try:
    pipeline = teacher_cache.check_cacheable(augment_name, [])
  except UserError as error:
    raise SystemExit(f'student_kd_cached: {error}')
  t0 = time.perf_counter()
  table = teacher_cache.build_table(*teacher, dataset, pipeline, preprocess, batch_size)
  table = mesh_lib.replicate(table, dataset.mesh)
  jax.block_until_ready(table)
  return (teacher_cache.CachedTeacher(pipeline.sample), table), time.perf_counter() - t0


def build_phase(name: str, model_name: str, losses: dict, *, teacher: tuple | None, num_classes: int,
                image_shape, preprocess: steps.Preprocess, opt_cfg, total_steps: int,
                dataset: loader.ResidentDataset, batch_size: int, mesh, seed: int = 0,
                eval_teacher: tuple | None = None, eval_batch_size: int | None = None) -> Phase:
  """A phase's state and jitted steps, in the order `train_and_evaluate` makes them.

  `teacher` is what the train step uses, (Teacher, variables) or (CachedTeacher, table); evaluation runs the real
  teacher, `eval_teacher` (default: `teacher`), as training does.
  """
  student = build_model(model_name, num_classes=num_classes, image_shape=image_shape, dtype=preprocess.dtype,
                        seed=seed)
  adapters = objective_lib.Adapters({}, rngs=nnx.Rngs(rng_lib.stream(seed, 'adapters')), dtype=preprocess.dtype)
  student_def, params, model_state = nnx.split(student, nnx.Param, ...)
  adapter_def, adapter_params = nnx.split(adapters, nnx.Param)
  tx = optim.make_optimizer(opt_cfg, total_steps, dataset.steps_per_epoch(batch_size))
  trainable, _ = state_lib.split_trainable(params, '.*')
  opt_state = tx.init((trainable, adapter_params))
  state = state_lib.init_state(params, model_state, adapter_params, opt_state, seed, len(losses),
                               loss_args=objective_lib.loss_arguments(config_lib.phase(1, losses).losses))
  replicated = mesh_lib.replicated(mesh)
  objective, term_names = objective_lib.build_objective(config_lib.phase(1, losses).losses)
  teacher_def, teacher_vars = teacher if teacher is not None else (None, None)
  eval_def, eval_vars = eval_teacher or teacher or (None, None)
  spec = steps.PhaseStep(student_def=student_def, adapter_def=adapter_def, teacher=teacher_def, objective=objective,
                         term_names=term_names, tx=tx, trainable='.*', frozen_bn=True, preprocess=preprocess,
                         first_step=0, steps_per_epoch=dataset.steps_per_epoch(batch_size))
  state = mesh_lib.replicate(state, mesh)
  return Phase(name=name, train_fn=steps.jit_train_step(spec, replicated),
               steps_fn=steps.jit_train_program(spec, batch_size, mesh_lib.batch_sharded(mesh), replicated),
               metrics_template=steps.empty_metrics(spec, replicated),
               eval_program=steps.jit_eval_program(student_def, eval_def, preprocess, eval_batch_size or batch_size,
                                                   mesh), state=state,
               teacher_vars=teacher_vars, eval_teacher_vars=eval_vars)


# ---------------------------------------------------------------------------------------------------------------
# Timing.

def compile_timed(jitted, *args) -> tuple[Any, float]:
  """(compiled executable, seconds to trace, lower and compile it): the one-off cost before the first step."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def train_loop(phase: Phase, state, dataset: loader.ResidentDataset, batch_size: int, first: int, count: int,
               log_every: int):
  """`count` steps exactly as `kdjax.train` runs them: one dispatch of the fused program (gather, step, metric
  accumulation on the device) per step, the metrics read at each log step. `first` is the state's step (the program
  reads its batch's place in the epoch from it)."""
  split = (dataset.images, dataset.labels)
  steps_per_epoch = dataset.steps_per_epoch(batch_size)
  replicated = mesh_lib.replicated(dataset.mesh)
  acc, order, order_epoch = metrics_lib.empty_like(phase.metrics_template, replicated), None, None
  for step in range(first, first + count):
    epoch = step // steps_per_epoch  # the program takes its batch's place in the epoch from state.step
    if order_epoch != epoch:
      order, order_epoch = dataset.epoch_order(0, epoch), epoch
    state, acc = phase.steps_fn(state, phase.teacher_vars, split, order, acc)
    if (step + 1) % log_every == 0:
      jax.device_get(acc.compute())
      acc = metrics_lib.empty_like(phase.metrics_template, replicated)
  return state, acc


def time_train(phase: Phase, state, dataset, batch_size: int, steps_: int, warmup: int, log_every: int):
  """(new state, seconds for `steps_` steady-state steps of the training loop), after `warmup` untimed steps
  (which also compile the loop program)."""
  state, acc = train_loop(phase, state, dataset, batch_size, 0, warmup, log_every)
  jax.block_until_ready((state, acc))
  t0 = time.perf_counter()
  state, acc = train_loop(phase, state, dataset, batch_size, warmup, steps_, log_every)
  jax.block_until_ready((state, acc))
  return state, time.perf_counter() - t0


def time_step_only(compiled, state, teacher_vars, batches: list, steps_: int, warmup: int):
  """(new state, seconds) of the step alone on pre-gathered batches: the loop's cost minus gather and merge."""
  for i in range(warmup):
    state, _ = compiled(state, teacher_vars, batches[i % len(batches)])
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for i in range(steps_):
    state, _ = compiled(state, teacher_vars, batches[i % len(batches)])
  jax.block_until_ready(state)
  return state, time.perf_counter() - t0


def eval_pass(phase: Phase, state, dataset: loader.ResidentDataset, program: steps.EvalProgram | None = None
              ) -> float:
  """Seconds of one pass over the split as `kdjax.train.Run.evaluate` makes it (`steps.evaluate`: one program per
  batch, metrics merged on the devices); `program` defaults to `phase.eval_program` (e.g. one with its compiled
  form)."""
  t0 = time.perf_counter()
  jax.block_until_ready(steps.evaluate(program or phase.eval_program, state.params, state.model_state,
                                       phase.eval_teacher_vars, dataset))
  return time.perf_counter() - t0


def median_time(fn, repeats: int) -> float:
  """Median wall seconds of `fn()` (which must block): robust to one slow run on a shared machine."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


# ---------------------------------------------------------------------------------------------------------------
# Memory and environment.

def peak_device_bytes() -> int | None:
  """The runtime's peak bytes in use on device 0 since the process started, or None where not reported (CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def compiled_memory(compiled) -> dict[str, int | None]:
  """XLA's per-device buffer plan of a compiled step: arguments, temporaries, and their total.

  The total is arguments + outputs - donated (aliased) + temporaries: what the step needs resident at once. It is
  computed rather than read from `peak_memory_in_bytes`, which the CPU backend reports as the arguments alone
  (measured with JAX 0.10.2: the same figure at batch 16, 64 and 256 while the temporaries grew 16-fold).
  """
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {'argument_bytes': None, 'temp_bytes': None, 'peak_bytes': None}
  total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
           + analysis.temp_size_in_bytes)
  return {'argument_bytes': int(analysis.argument_size_in_bytes), 'temp_bytes': int(analysis.temp_size_in_bytes),
          'peak_bytes': int(total)}


def cost(compiled) -> dict[str, float]:
  """XLA's cost analysis of a compiled program (per device for a sharded one): flops and bytes accessed."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return {'flops': float(analysis.get('flops', 0.0)), 'bytes_accessed': float(analysis.get('bytes accessed', 0.0))}


def environment(script: str, argv: list[str] | None) -> dict[str, Any]:
  """What a figure depends on besides the code: the devices, the versions, when, and the exact command."""
  device = jax.local_devices()[0]
  args = sys.argv[1:] if argv is None else list(argv)
  return {'device_kind': device.device_kind, 'platform': device.platform, 'device_count': jax.device_count(),
          'jax_version': jax.__version__, 'flax_version': flax.__version__, 'python': platform.python_version(),
          'cpu_count': os.cpu_count(),
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'command': ' '.join(['python', '-m', f'benchmarks.{script}', *args]),
          'xla_flags': os.environ.get('XLA_FLAGS', '')}


# ---------------------------------------------------------------------------------------------------------------
# Reports.

def fmt(value: Any) -> str:
  """A table cell: thousands separators for big numbers, 3 significant digits for small ones, '—' for None."""
  if value is None:
    return '—'
  if isinstance(value, str):
    return value
  if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
    return str(value)
  if abs(value) >= 100:
    return f'{value:,.0f}'
  return f'{value:.3g}'


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
  """`columns` are (key, header) pairs; a missing key prints as '—'."""
  lines = ['| ' + ' | '.join(header for _, header in columns) + ' |',
           '|' + '|'.join('---' for _ in columns) + '|']
  lines += ['| ' + ' | '.join(fmt(row.get(key)) for key, _ in columns) + ' |' for row in rows]
  return '\n'.join(lines)


def publish(script: str, argv: list[str] | None, args, title: str, rows: list[dict],
            columns: list[tuple[str, str]], **fields) -> dict:
  """A script's report: its environment, settings and `fields`; printed as a title line and the rows' table, and
  written to `args.json` (if set). Returned for the caller (and the tests)."""
  report = dict(environment(script, argv), benchmark=script, settings=vars(args), **fields)
  print(f"\n{report['device_kind']} x{report['device_count']}, jax {report['jax_version']}, {title}\n")
  print(markdown_table(rows, columns))
  write_json(args.json, report)
  return report


def write_json(path: str, payload: dict) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  report.write_json(path, payload, indent=2, default=str)  # atomic: a step killed mid-write keeps the last one
  print(f'wrote {path}')


def mib(num_bytes: int | None) -> float | None:
  return None if num_bytes is None else num_bytes / 2**20


def dtype_of(name: str):
  return DTYPES[name]
