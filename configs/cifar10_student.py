"""CIFAR-10 student on labels only: the 2-layer CNN, crop+flip, SGD one-cycle, 15 epochs, bf16.

Command: `python main.py --config configs/cifar10_student.py --workdir workdirs/cifar10_student`
The CE baseline that `configs/cifar10_kd.py` must beat. `get_config('smoke')` is a tiny CPU budget.
"""
from kdjax.config import base_config, config_args, loss_term, optimizer, phase
from configs import cifar10_teacher


def get_config(arg=None):
  args = config_args(arg, 'smoke')
  cfg = cifar10_teacher.get_config(arg)
  cfg.student.name = 'cnn2'
  cfg.target_top1 = 0.0  # the teacher's 94% target is not the student's
  cfg.phases.train = phase(1 if 'smoke' in args else 15, {'ce': loss_term('ce')},
                           optimizer('sgd', learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                     schedule='onecycle'))
  return cfg
