"""One thin wrapper over Orbax's CheckpointManager: latest (for resume), best (by eval accuracy), teacher loading.

A workdir holds `checkpoints/` (the latest few, for auto-resume) and `best/` (the single best by eval top-1). Each
checkpoint is the `TrainState` plus a JSON `meta` (phase, epoch, best accuracy so far, the run's timings), so a
resumed run knows which phase it is in and a KD run can read its teacher without the teacher's training code.
"""
import os
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from absl import logging

from kdjax import mesh as mesh_lib
from kdjax import state as state_lib
from kdjax.errors import UserError


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
  # Multi-process: `latest` and `best` often save the same step at once; Orbax names its cross-process barriers
  # by step, so each manager needs its own prefix or the two saves collide on one barrier.
  return ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=os.path.basename(os.path.normpath(directory)))))


class Checkpoints:
  """`latest` keeps the last `keep` checkpoints; `best` keeps one. Saves are asynchronous; `close` waits."""

  def __init__(self, workdir: str, keep: int = 2):
    self._workdir = workdir
    self.latest = _manager(os.path.join(workdir, 'checkpoints'), keep)
    self.best = _manager(os.path.join(workdir, 'best'), 1)

  def save(self, state, meta: dict, *, best: bool = False) -> None:
    """Save `state` as the latest checkpoint, and as the best one with `best`.

    The best copy is finished before the latest one starts. The other order loses it to a kill between the two: the
    resumed run restores the latest checkpoint, whose meta already counts this step's accuracy as the best so far,
    so no later evaluation improves on it and best/ never gets the step.
    """
    step = int(jax.device_get(state.step))
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if best:
      if self.best.save(step, args=args):
        self.best.wait_until_finished()
      else:  # Orbax skips a step at or below its newest one
        logging.warning('best checkpoint at step %d not saved: %s already holds step %d', step,
                        self.best.directory, self.best.latest_step())
    if step not in self.latest.all_steps():
      self.latest.save(step, args=args)

  def restore_latest(self, abstract_for_meta: Callable[[dict], Any]) -> tuple[Any, dict] | None:
    """The newest checkpoint that restores, else the one before, and so on; with no checkpoints/, the best one
    (`_restore_best`); None when the workdir has neither.

    `abstract_for_meta(meta)` gives the target structure (it depends on the phase the checkpoint was taken in).
    Checkpoints newer than the one that restores (torn by a kill, corrupted on disk) are moved to
    `corrupt_checkpoints/` with a warning -- never deleted -- so that their steps can be saved again. When none
    restores, the failure is not a torn write but a workdir this run cannot read (another config or kdjax
    version, a device out of memory): it stops with a UserError and moves nothing, rather than silently training
    from step 0 over a finished run.
    """
    failed = []
    for step in sorted(self.latest.all_steps(), reverse=True):
      restored, error = _restore(self.latest, step, abstract_for_meta)
      if mesh_lib.all_processes(error is None):
        for bad_step, bad_error in failed:
          self._move_aside(bad_step, bad_error)
        return restored.state, restored.meta
      failed.append((step, error))
    if failed:
      step, error = failed[0]
      raise UserError(
          f'none of the {len(failed)} checkpoints in {self.latest.directory} restores (newest, step {step}: '
          f'{type(error).__name__}: {str(error)[:300]}); they were kept. If this workdir belongs to another config '
          'or kdjax version, pass a new --workdir; to start over here, move checkpoints/ and best/ away')
    return self._restore_best(abstract_for_meta)

  def _restore_best(self, abstract_for_meta):
    """With no checkpoints/, the best checkpoint is where the run resumes: a kill during the run's first save
    leaves just that one (the best copy is finished first, see `save`), and it is a whole train state with its meta,
    the very one the latest copy would have held. Resuming is exact, so a run whose checkpoints/ was deleted by hand
    also ends as it would have. Unreadable, it is kept and the run refused, as a fresh run could not replace it."""
    step = self.best.latest_step()
    if step is None:
      return None
    restored, error = _restore(self.best, step, abstract_for_meta)
    if not mesh_lib.all_processes(error is None):
      raise UserError(f'{self._workdir} has a best checkpoint (step {step}) that does not restore '
                      f'({type(error).__name__}: {str(error)[:300]}) and no checkpoints/ to resume from, so a fresh '
                      'run could not replace it; pass a new --workdir, or move best/ away to start over')
    logging.warning('%s has no checkpoints/ (a kill during the first save, or deleted): resuming from the best '
                    'checkpoint, step %d', self._workdir, step)
    return restored.state, restored.meta

  def _move_aside(self, step: int, error: Exception | None) -> None:
    """Move checkpoint `step` to corrupt_checkpoints/: process 0 moves it, every process waits for the move and
    reloads the step list, so that all of them fall back to the same previous checkpoint."""
    aside = os.path.join(self._workdir, 'corrupt_checkpoints', str(step))
    suffix = 1
    while os.path.exists(aside):  # the same step torn twice: keep both copies
      aside, suffix = os.path.join(self._workdir, 'corrupt_checkpoints', f'{step}.{suffix}'), suffix + 1
    logging.warning('checkpoint %d in %s cannot be restored (%s); moved to %s, falling back to the previous one',
                    step, self.latest.directory, f'{type(error).__name__}: {error}' if error else
                    'another process failed to restore it', aside)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.replace(os.path.join(self.latest.directory, str(step)), aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'kdjax: checkpoint {step} moved aside')
    self.latest.reload()

  def close(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()
    self.latest.close()
    self.best.close()


def _reader(directory, **handlers) -> ocp.CheckpointManager:
  """A manager that reads `directory` in this process alone, so that a read failing here leaves no peer waiting.

  Orbax ends each restore with a barrier over the manager's processes: a process that cannot read a checkpoint its
  peers can (a failing disk or mount on one host) never reaches that barrier, and its peers' barrier then pairs up
  with the agreement that follows (`mesh.all_processes`), which crashes the run. Read apart, the processes meet only
  in that agreement, and all fall back (or stop) together. Restored arrays still carry the target's shardings: each
  process reads the shards of its own devices, as a restore by all processes together does.
  """
  me = jax.process_index()
  return ocp.CheckpointManager(directory, item_handlers=handlers or None, options=ocp.CheckpointManagerOptions(
      read_only=True, multiprocessing_options=ocp.options.MultiprocessingOptions(
          primary_host=me, active_processes={me})))


def _restore(manager: ocp.CheckpointManager, step: int, abstract_for_meta) -> tuple[Any, Exception | None]:
  """(restored state and meta, None), or (None, the error) for a checkpoint that does not restore in this process
  (read alone: see `_reader`)."""
  reader = _reader(manager.directory)
  try:
    meta = reader.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return reader.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_for_meta(meta)), meta=ocp.args.JsonRestore())), None
  except Exception as failure:  # pylint: disable=broad-except
    return None, failure
  finally:
    reader.close()


def _flatten_raw(tree, prefix='') -> dict[str, np.ndarray]:
  """{'a/0/kernel': array} from Orbax's raw restore (dict keys are strings, nnx leaves are {'value': x})."""
  flat = {}
  for key, value in tree.items():
    if key == 'value' and not isinstance(value, dict):
      flat[prefix.rstrip('/')] = value
    elif isinstance(value, dict):
      flat.update(_flatten_raw(value, f'{prefix}{key}/'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


# Which checkpoint of a finished run a teacher or an initialisation reads (`teacher.checkpoint`, `init.checkpoint`):
# the sub-directories tried in order. `best` is the highest eval top-1 (kdjax's default, as torchdistill keeps);
# `last` is the final state (RepDistiller's and mdistiller's teachers). A run without checkpoints/ (an import, or a
# kill during its first save) has only best/, which is then its last state too.
CHECKPOINT_CHOICES = {'best': ('best', 'checkpoints'), 'last': ('checkpoints', 'best')}


def restore_model_variables(workdir: str, variables, *, keep_fresh: str = '', role: str = 'teacher',
                            which: str = 'best') -> Any:
  """Fill an NNX model's variables (params + BatchNorm statistics) from a finished run's `which` checkpoint (see
  CHECKPOINT_CHOICES).

  Raises a UserError when the run has no checkpoint or its shapes do not fit the model, listing the first
  mismatches, so a teacher of the wrong architecture or class count is caught before training starts. Variables
  whose path matches `keep_fresh` (a regex, e.g. '^head/') keep their fresh values: fine-tuning a model on a
  dataset with other classes.
  """
  for sub in CHECKPOINT_CHOICES[which]:
    directory = os.path.abspath(os.path.join(workdir, sub))
    if not os.path.isdir(directory):
      continue
    manager = _reader(directory, state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
    step = manager.latest_step()
    if step is None:
      manager.close()
      continue
    try:
      # Restore onto this process's first device whatever topology the run was saved from (its device count may
      # differ from ours); the caller places the result on the mesh.
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                            manager.item_metadata(step)['state'])
      raw, error = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state, None
    except Exception as failure:  # pylint: disable=broad-except
      raw, error = None, failure
    finally:
      manager.close()
    if not mesh_lib.all_processes(error is None):
      why = f'{type(error).__name__}: {str(error)[:300]}' if error else 'another process of this run could not'
      raise UserError(f'{role} checkpoint {directory}/{step} cannot be read ({why}); check that the files are whole '
                      f'and readable on every host, or train that run again') from error
    saved = {**_flatten_raw(raw['params']), **_flatten_raw(raw['model_state'])}
    logging.info('%s: the %s checkpoint of %s is %s/%d', role, which, workdir, sub, step)
    return _fill(variables, saved, f'{directory}/{step}', keep_fresh, role)
  raise UserError(f'no checkpoint in {workdir}; ' + _NO_CHECKPOINT_FIX[role].format(workdir=workdir))


# What to do about a workdir without a checkpoint, by what it was read as (`role`).
_NO_CHECKPOINT_FIX = {
    'teacher': 'train the teacher run first (e.g. python main.py --config configs/cifar10_teacher.py --workdir '
               '{workdir}) or fix teacher.workdir',
    'init': 'train that run first or fix init.workdir',
    'run': 'train it first (the same command without --mode) or pass the --workdir of a trained run',
}


def _fill(variables, saved: dict[str, np.ndarray], where: str, keep_fresh: str, role: str):
  """Copy the saved parameters and BatchNorm statistics in; RNG state (dropout keys) keeps its fresh values."""
  fresh = state_lib.trainable_filter(keep_fresh) if keep_fresh else (lambda path, _: False)
  flat = [(path, v) for path, v in nnx.to_flat_state(variables)
          if isinstance(v, (nnx.Param, nnx.BatchStat)) and not fresh(path, v)]
  mismatches = []
  for path, variable in flat:
    key = state_lib.path_string(path)
    if key not in saved:
      mismatches.append(f'{key} missing')
    elif tuple(saved[key].shape) != tuple(variable.get_value().shape):
      mismatches.append(f'{key} {tuple(saved[key].shape)} in checkpoint vs {tuple(variable.get_value().shape)} in model')
  if mismatches:
    other_classes = " (or init.keep_fresh='^head/' for other classes)" if role == 'init' else ''
    raise UserError(f'{role} checkpoint {where} does not fit the configured {role} model: '
                    f'{"; ".join(mismatches[:3])}{" ..." if len(mismatches) > 3 else ""} '
                    f'({len(mismatches)} mismatches); configure the model that run trained{other_classes}')
  for path, variable in flat:
    variable.set_value(np.asarray(saved[state_lib.path_string(path)], dtype=variable.get_value().dtype))
  return variables
