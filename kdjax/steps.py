"""The pure train and eval steps: `(state, teacher, batch) -> (state, metrics)`, and the program that runs them.

Everything static (graphdefs, the objective, the optimizer, the augmentation) is bound into a `PhaseStep` before
`jax.jit`, so a step is: augment on device, frozen teacher forward, student forward and backward, optax update,
metrics. What the trainer dispatches is `train_program`: gather the batch from the device-resident split, the step,
and the metric accumulation, as one XLA program. The teacher's variables are an argument
(never differentiated, never donated); the student state and the metric accumulator are donated.
"""
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kdjax import config as config_lib
from kdjax import mesh as mesh_lib
from kdjax import metrics as metrics_lib
from kdjax import state as state_lib
from kdjax.data import loader


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen model's graphdef; its variables are a separate (non-donated, non-differentiated) step argument."""
  graphdef: Any

  def forward(self, variables, images):
    model = nnx.merge(self.graphdef, variables)
    logits, features = model(images, train=False)
    return jax.lax.stop_gradient((logits, features))

  def outputs(self, variables, images, batch, key):
    """The train step's teacher outputs: a forward pass on the student's (augmented) images.

    `kdjax.teacher_cache.CachedTeacher` has the same method and looks them up instead.
    """
    del batch, key
    return self.forward(variables, images)


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """uint8 batch -> normalised float input in the compute dtype (train: augmented with the step's key)."""
  augment: Callable      # (rng, uint8 images) -> float32 in [0, 1]
  evaluate: Callable     # (uint8 images) -> float32 in [0, 1]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  dtype: Any
  image_size: int        # what the model sees (augment and evaluate resize to it)

  def normalize(self, images):
    return ((images - jnp.asarray(self.mean)) / jnp.asarray(self.std)).astype(self.dtype)

  def train(self, rng, images):
    return self.normalize(self.augment(rng, images))

  def eval(self, images):
    return self.normalize(self.evaluate(images))


@dataclasses.dataclass(frozen=True)
class PhaseStep:
  """What one phase's train step needs besides its arguments."""
  student_def: Any
  adapter_def: Any
  teacher: Any            # Teacher, kdjax.teacher_cache.CachedTeacher, or None: anything with `outputs`
  objective: Callable
  term_names: tuple[str, ...]
  tx: optax.GradientTransformation
  trainable: str           # regex over student parameter paths
  frozen_bn: bool          # frozen stages keep their BatchNorm statistics
  preprocess: Preprocess
  # Where the phase starts and how long an epoch is, so loss terms see the phase's progress in epochs.
  first_step: int
  steps_per_epoch: int
  trainable_adapters: str = '.*'  # regex over adapter paths: the adapters this phase's terms use
  train_modes: tuple[bool, ...] | None = None  # per stage, then the head: False runs it in inference mode

  def epoch(self, step: jax.Array) -> jax.Array:
    """The phase's progress in epochs at optimizer step `step` (0.0 at the phase's first step)."""
    return (step - self.first_step).astype(jnp.float32) / self.steps_per_epoch


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def train_step(spec: PhaseStep, state: state_lib.TrainState, teacher_vars, batch):
  """One optimizer step of the student on one (sharded) batch."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  images = spec.preprocess.train(key, batch['image'])
  labels = batch['label']
  teacher_out = None if spec.teacher is None else spec.teacher.outputs(teacher_vars, images, batch, key)
  trainable, frozen = state_lib.split_trainable(state.params, spec.trainable)
  adapters_on, adapters_off = state_lib.split_trainable(state.adapter_params, spec.trainable_adapters)

  def loss_fn(trainable, adapters_on, model_state):
    # Fresh Variable objects at this trace level: BatchNorm writes its statistics into them.
    model_state = jax.tree.map(lambda x: x, model_state)
    model = nnx.merge(spec.student_def, state_lib.merge(trainable, frozen), model_state)
    student_out = model(images, train=True if spec.train_modes is None else spec.train_modes)
    adapters = nnx.merge(spec.adapter_def, state_lib.merge(adapters_on, adapters_off))
    loss, terms, memory = spec.objective(student_out, teacher_out, labels, adapters, spec.epoch(state.step),
                                         memory=state.memory, index=batch.get('index'), key=jax.random.fold_in(key, 1),
                                         loss_args=state.loss_args or None)
    return loss, (terms, student_out[0], nnx.state(model, nnx.Not(nnx.Param)), memory)

  (loss, (terms, logits, model_state, memory)), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      trainable, adapters_on, state.model_state)
  updates, opt_state = spec.tx.update(grads, state.opt_state, (trainable, adapters_on))
  trainable, adapters_on = optax.apply_updates((trainable, adapters_on), updates)
  if spec.frozen_bn:
    model_state = _keep_frozen(state.model_state, model_state, spec.trainable)
  term_values = jnp.stack([terms[name] for name in spec.term_names])
  finite = jnp.isfinite(loss) & _all_finite(grads)
  candidate = state.replace(step=state.step + 1, params=state_lib.merge(trainable, frozen),
                            model_state=model_state, adapter_params=state_lib.merge(adapters_on, adapters_off),
                            opt_state=opt_state,
                            memory=memory)
  refused = state.replace(
      step=state.step + 1, nonfinite_updates=state.nonfinite_updates + 1,
      opt_state=_schedules_step_on(state.opt_state, opt_state),
      first_nonfinite_step=jnp.where(state.first_nonfinite_step < 0, state.step, state.first_nonfinite_step),
      first_nonfinite_terms=jnp.where(state.first_nonfinite_step < 0, ~jnp.isfinite(term_values),
                                      state.first_nonfinite_terms))
  new_state = jax.tree.map(lambda good, bad: jnp.where(finite, good, bad), candidate, refused)
  outputs = {'loss': loss, **terms,
             **metrics_lib.classification_outputs(logits, labels, None if teacher_out is None else teacher_out[0])}
  assert sorted(outputs) == sorted(metric_names(spec)), (sorted(outputs), metric_names(spec))  # at trace time
  return new_state, metrics_lib.collection(outputs).single_from_model_output(**outputs)


def _schedules_step_on(old_opt_state, new_opt_state):
  """A refused update's optimizer state: the old one, except that learning-rate schedules count the step, so that
  skipped updates (`nonfinite='skip'`) do not leave the schedule behind the run's steps and phase ends."""
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  return jax.tree.map(lambda old, new: new if is_schedule(old) else old, old_opt_state, new_opt_state,
                      is_leaf=is_schedule)


def _keep_frozen(old_model_state, new_model_state, pattern):
  """Old BatchNorm statistics at frozen paths, the new model state everywhere else.

  The phase must not move frozen stages, and their running statistics are part of what it would move. Only
  statistics are kept: RNG counters (dropout in a frozen head that still feeds the loss) must go on advancing, or
  every step would draw the same dropout mask.
  """
  frozen_stats = nnx.All(nnx.BatchStat, nnx.Not(state_lib.trainable_filter(pattern)))
  _, new_rest = nnx.split_state(new_model_state, frozen_stats, ...)
  old_frozen, _ = nnx.split_state(old_model_state, frozen_stats, ...)
  return state_lib.merge(new_rest, old_frozen)


def eval_step(student_def, teacher: Teacher | None, preprocess: Preprocess, params, model_state, teacher_vars, batch):
  """Accuracy, top-5, cross-entropy and (with a teacher) agreement on one masked batch.

  It takes the model's variables, not the whole `TrainState`: the optimizer state's structure changes from phase to
  phase, and a jitted eval of the state would be traced and lowered again at every phase."""
  images = preprocess.eval(batch['image'])
  model = nnx.merge(student_def, params, model_state)
  logits, _ = model(images, train=False)
  outputs = metrics_lib.classification_outputs(
      logits, batch['label'], None if teacher is None else teacher.forward(teacher_vars, images)[0])
  outputs['loss'] = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch['label'])
  mask = batch['mask']
  return metrics_lib.collection(outputs).single_from_model_output(mask=mask, **outputs)


def train_program(spec: PhaseStep, batch_size: int, batch_sharding, state: state_lib.TrainState, teacher_vars,
                  split: tuple[jax.Array, jax.Array], order: jax.Array, acc):
  """What the trainer dispatches per step, as one XLA program: gather the step's batch of this epoch's `order` from
  the resident split (`split` = (images, labels), replicated), run `train_step`, add its metrics to the
  accumulator `acc`.

  Gathering and accumulating inside the step's program leaves one dispatch per step instead of three (gather, step,
  metric merge), and the batch's position in the epoch comes from the state's step counter, so nothing crosses from
  the host on a step (`order` changes once an epoch). Several steps per dispatch (a `fori_loop` over this body) were
  tried and dropped: on the CPU backend the loop ran 4.7x slower than separate dispatches (see benchmarks/README.md).
  """
  images, labels = split
  index = state.step % spec.steps_per_epoch
  batch = loader.gather_batch(images, labels, order, index, batch_size=batch_size, sharding=batch_sharding)
  state, step_metrics = train_step(spec, state, teacher_vars, batch)
  return state, metrics_lib.accumulate(acc, step_metrics)


def metric_names(spec: PhaseStep) -> tuple[str, ...]:
  """What `train_step` averages: the loss, each term, top-1 and top-5, and agreement where a teacher runs."""
  own = [name for name in config_lib.RESERVED_TERM_NAMES if name != 'agreement' or spec.teacher is not None]
  return (*own, *spec.term_names)


def empty_metrics(spec: PhaseStep, sharding):
  """The zero of `train_program`'s metric accumulator (the step's metric collection, empty), placed with
  `sharding` (replicated, like the program's output accumulator). Built from the names, not by tracing the step
  once more: that trace cost as much as the program's own for every phase."""
  return jax.device_put(metrics_lib.collection(metric_names(spec)).empty(), sharding)


def jit_train_step(spec: PhaseStep, state_sharding):
  """One step on a given batch: what the benchmarks time as the bare step and the roofline analyses."""
  return jax.jit(functools.partial(train_step, spec), donate_argnums=0, out_shardings=(state_sharding, None))


def jit_train_program(spec: PhaseStep, batch_size: int, batch_sharding, state_sharding):
  return jax.jit(functools.partial(train_program, spec, batch_size, batch_sharding), donate_argnums=(0, 4),
                 out_shardings=(state_sharding, state_sharding))


def eval_metric_names(teacher) -> tuple[str, ...]:
  """What `eval_step` averages: cross-entropy, top-1 and top-5, and agreement where a teacher runs."""
  return ('loss', 'top1', 'top5', *(('agreement',) if teacher is not None else ()))


def eval_program(student_def, teacher, preprocess: Preprocess, batch_size: int, batch_sharding, params, model_state,
                 teacher_vars, split: tuple[jax.Array, jax.Array], index: jax.Array, acc):
  """What evaluation dispatches per batch, as one XLA program: batch `index` of the resident `split` in order,
  gathered on the devices, its metrics added to `acc`; returns (index + 1, acc).

  Nothing crosses from the host per batch (the loop it replaced copied two index arrays and ran three programs per
  batch: gather, eval, merge). The split's size is part of the program's shape, so each eval split (validation,
  a held-out part of the training split) is traced once."""
  batch = loader.eval_batch(*split, index, batch_size=batch_size, sharding=batch_sharding)
  batch_metrics = eval_step(student_def, teacher, preprocess, params, model_state, teacher_vars, batch)
  return index + 1, metrics_lib.accumulate(acc, batch_metrics)


@dataclasses.dataclass(frozen=True)
class EvalProgram:
  """`eval_program` jitted for a mesh, with the batch size and metric names it was built with (so a pass cannot be
  run with another batch size than the program gathers)."""
  fn: Callable          # (params, model_state, teacher_vars, split, index, acc) -> (index + 1, acc)
  batch_size: int
  names: tuple[str, ...]


def jit_eval_program(student_def, teacher, preprocess: Preprocess, batch_size: int, mesh) -> EvalProgram:
  """`eval_program` jitted for `mesh`; the accumulator is donated and both outputs stay replicated (placed like
  the inputs `eval_start` makes, so the loop never compiles twice)."""
  replicated = mesh_lib.replicated(mesh)
  fn = jax.jit(functools.partial(eval_program, student_def, teacher, preprocess, batch_size,
                                 mesh_lib.batch_sharded(mesh)),
               donate_argnums=5, out_shardings=(replicated, replicated))
  return EvalProgram(fn=fn, batch_size=batch_size, names=eval_metric_names(teacher))


def eval_start(program: EvalProgram, mesh):
  """The first (index, accumulator) of an eval pass, placed as the program returns them."""
  return mesh_lib.replicate((jnp.int32(0), metrics_lib.collection(program.names).empty()), mesh)


def evaluate(program: EvalProgram, params, model_state, teacher_vars, dataset: loader.ResidentDataset):
  """One pass of `program` over `dataset`: the merged metric collection, on the devices."""
  index, acc = eval_start(program, dataset.mesh)
  for _ in range(dataset.num_eval_batches(program.batch_size)):
    index, acc = program.fn(params, model_state, teacher_vars, (dataset.images, dataset.labels), index, acc)
  return acc
