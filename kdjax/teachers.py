"""The frozen teacher of a KD run: one finished run's model, or the ensemble of several runs' models.

`teacher.workdir` names one run or a comma-separated list of runs (`runs/t1,runs/t2,runs/t3`). Each run's model is
rebuilt from what that run recorded, so ensemble members may differ in architecture, and filled from its own best
(or, with `teacher.checkpoint='last'`, final) checkpoint. Several members become one
`kdjax.models.ensemble.Ensemble` (logits = mean of the members' logits, features = the first member's), so the
trainer sees one model either way and nothing downstream changes.

A teacher gets its inputs normalised as in its own training: the student's pipeline normalises with the student
run's statistics, and `InputRenormalized` maps them to the teacher's recorded ones (an imported ImageNet model's,
or those of a teacher trained on another split) when they differ; each ensemble member gets its own.
"""
import os

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from kdjax import checkpoint as ckpt_lib
from kdjax import config as config_lib
from kdjax import export
from kdjax import plugins
from kdjax.errors import UserError
from kdjax.models import create_model
from kdjax.models.ensemble import Ensemble


def teacher_architecture(cfg, workdir: str) -> tuple[str, dict]:
  """(model name, constructor arguments) of the model trained in `workdir`, as that run recorded them.

  A training run records its model as `student` in config.json; an import (`kdjax.interop.torch_import`) records
  only a name, as `teacher`; a run that records neither (no config.json) is `teacher.name` with default arguments.
  """
  record = export.read_json(os.path.join(workdir, 'config.json'))
  plugins.load(record.get('plugins', ()))  # the modules that registered the run's model, if it is a user's own
  if 'student' in record:
    trained = dict(record['student'])
  elif 'imported_from' in record:
    trained = dict(record.get('teacher', {}))
  else:
    trained = {}
  return trained.pop('name', cfg.teacher.name), trained


def _recorded_classes(workdir: str) -> int | None:
  """How many classes the run in `workdir` learnt: data.json of a training run, config.json of an import."""
  data = export.read_json(os.path.join(workdir, export.DATA_FILE))
  if data:
    return len(data['class_names'])
  return export.read_json(os.path.join(workdir, 'config.json')).get('num_classes')


def _check_members(cfg, workdirs: list[str], names: list[str]) -> None:
  """Every run exists; one run trained `teacher.name`, several runs learnt the same number of classes."""
  for i, workdir in enumerate(workdirs):
    if not os.path.isdir(workdir):
      member = f' (ensemble member {i + 1} of {len(workdirs)})' if len(workdirs) > 1 else ''
      raise UserError(f'teacher.workdir {workdir!r}{member} does not exist; train a teacher there first or point '
                      '--config.teacher.workdir at a finished teacher run (or a comma-separated list of them)')
  if len(workdirs) == 1 and names[0] != cfg.teacher.name:  # one teacher: the config must name what it trained
    raise UserError(f'teacher.workdir {workdirs[0]} trained a {names[0]}, but teacher.name is {cfg.teacher.name}; '
                    f'set --config.teacher.name={names[0]}')
  counts = {workdir: count for workdir in workdirs if (count := _recorded_classes(workdir)) is not None}
  if len(set(counts.values())) > 1:
    listing = ', '.join(f'{workdir}: {count}' for workdir, count in counts.items())
    raise UserError(f'the teacher ensemble members learnt different numbers of classes ({listing}); list only '
                    'teacher runs of this dataset in --config.teacher.workdir')


def _restore_member(workdir: str, name: str, kwargs: dict, *, num_classes: int, image_shape, dtype,
                    which: str) -> nnx.Module:
  model = create_model(name, num_classes=num_classes, image_shape=image_shape, rngs=nnx.Rngs(0), dtype=dtype,
                       **kwargs)
  graphdef, variables = nnx.split(model)
  if not (os.path.exists(os.path.join(workdir, 'summary.json'))
          or 'imported_from' in export.read_json(os.path.join(workdir, 'config.json'))):
    logging.warning('teacher run %s has not finished (no summary.json): distilling from its %s checkpoint so far; '
                    're-run its command to finish it first', workdir, which)
  return nnx.merge(graphdef, ckpt_lib.restore_model_variables(workdir, variables, which=which))


class InputRenormalized(nnx.Module):
  """A teacher fed the student's normalised images, re-expressed in its own normalisation.

  x_student = (p - m_s) / s_s for pixels p in [0, 1]; the teacher wants (p - m_t) / s_t = x_student * s_s / s_t +
  (m_s - m_t) / s_t: one per-channel affine map, fused into the step.
  """

  def __init__(self, model: nnx.Module, scale: tuple[float, ...], shift: tuple[float, ...]):
    self.model, self.scale, self.shift = model, scale, shift

  @property
  def stage_channels(self):
    return self.model.stage_channels

  @property
  def head(self):
    return getattr(self.model, 'head', None)

  def __call__(self, x, *, train: bool = False):
    mapped = x.astype(jnp.float32) * jnp.asarray(self.scale) + jnp.asarray(self.shift)
    return self.model(mapped.astype(x.dtype), train=train)


def renormalized(model: nnx.Module, recorded, mean, std) -> nnx.Module:
  """`model` fed inputs normalised with (mean, std) when it was trained with `recorded` (None: as given)."""
  if recorded is None:
    return model
  teacher_mean, teacher_std = map(np.asarray, recorded)
  mean, std = np.asarray(mean), np.asarray(std)
  scale, shift = std / teacher_std, (mean - teacher_mean) / teacher_std
  if np.allclose(scale, 1.0, rtol=0, atol=1e-6) and np.allclose(shift, 0.0, rtol=0, atol=1e-6):
    return model
  return InputRenormalized(model, tuple(map(float, scale)), tuple(map(float, shift)))


def _check_learnt_data(workdir: str, num_classes: int, channels: int) -> None:
  """The teacher run learnt this data's number of classes and channels: checked from what it recorded before its
  checkpoint is read, whose shapes would only say that it holds another model."""
  learnt = _recorded_classes(workdir)
  if learnt is not None and learnt != num_classes:
    raise UserError(f'teacher run {workdir} learnt {learnt} classes, the data has {num_classes}; distil on the '
                    'dataset the teacher learnt (data.dataset), or train a teacher on this one')
  recorded = export.recorded_normalization(workdir)
  if recorded is not None and len(recorded[0]) != channels:
    raise UserError(f'the teacher was trained on {len(recorded[0])}-channel images, the data has {channels} '
                    'channels; distil on data of the kind the teacher saw')


def restore_teacher(cfg, *, num_classes: int, image_shape: tuple[int, int, int], dtype, mean, std) -> nnx.Module:
  """The teacher with its trained variables (the run's model, or the `Ensemble` of the listed runs' models), fed
  inputs that the data pipeline normalised with (mean, std)."""
  workdirs = config_lib.teacher_workdirs(cfg)
  architectures = [teacher_architecture(cfg, workdir) for workdir in workdirs]
  _check_members(cfg, workdirs, [name for name, _ in architectures])
  for workdir in workdirs:
    _check_learnt_data(workdir, num_classes, len(mean))
  # Each member fed as in its own training: members trained on other slices, or an import, may differ.
  members = [renormalized(_restore_member(workdir, name, kwargs, num_classes=num_classes, image_shape=image_shape,
                                          dtype=dtype, which=cfg.teacher.checkpoint),
                          export.recorded_normalization(workdir), mean, std)
             for workdir, (name, kwargs) in zip(workdirs, architectures)]
  return members[0] if len(members) == 1 else Ensemble(members)
