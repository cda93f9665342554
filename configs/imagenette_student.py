"""Imagenette data-only baseline: the medium ResNet-34-type student trained on labels only.

Command: `python main.py --config configs/imagenette_student.py --workdir workdirs/imagenette_student`
Same data, image size and total epoch budget (40) as `imagenette_stagewise.py`, Adam lr 1e-4 as in the published
comparison. Arguments (comma-separated): `small` (resnet34_small), `smallest` (plain34_smallest), `subset` (train
on train[:25%], report the held-out train[25%:] as well), `repeats` (seeds 0,1,2 -> results.md), `smoke`.
"""
from kdjax.config import base_config, loss_term, optimizer, phase
from configs.imagenette_teacher import imagenette_data

STUDENTS = {'medium': 'resnet34_medium', 'small': 'resnet34_small', 'smallest': 'plain34_smallest'}
TOTAL_EPOCHS = 40


def apply_common_args(cfg, args):
  """Student size, subset mode and repeats, shared with the stage-wise configs."""
  cfg.student.name = STUDENTS['medium']
  for size, name in STUDENTS.items():
    if size in args:
      cfg.student.name = name
  if 'subset' in args:
    cfg.data.train_split = 'train[:25%]'
    cfg.data.heldout_split = 'train[25%:]'
  if 'repeats' in args:
    cfg.suite = 'repeats'
    cfg.repeats.seeds = (0, 1, 2)
  return cfg


def get_config(arg=''):
  args = (arg or '').split(',')
  cfg = apply_common_args(imagenette_data(base_config(), arg or ''), args)
  epochs = 0.5 if 'smoke' in args else TOTAL_EPOCHS
  cfg.phases.train = phase(epochs, {'ce': loss_term('ce')}, optimizer('adam', learning_rate=1e-4,
                                                                       schedule='constant'))
  cfg.eval_every_epochs = 2.0
  return cfg
