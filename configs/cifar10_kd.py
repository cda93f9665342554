"""CIFAR-10 Hinton KD: the 2-layer CNN student of cifar10_student.py distilled from the cifar10_teacher.py run.

Command (after the teacher run): `python main.py --config configs/cifar10_kd.py --workdir workdirs/cifar10_kd`
(`--config.teacher.workdir=DIR` if the teacher ran elsewhere). Loss: (1-a)*CE + a*T^2*KL with a=0.5, T=4.
"""
from kdjax.config import config_args, default_workdir, loss_term
from configs import cifar10_student


def get_config(arg=None):
  config_args(arg, 'smoke')
  cfg = cifar10_student.get_config(arg)
  cfg.teacher.name = 'resnet18_cifar'
  cfg.teacher.workdir = default_workdir('cifar10_teacher.py', arg)  # that command's workdir, `:smoke` for `:smoke`
  cfg.phases.train.losses = {'kd': loss_term('hinton_kd', alpha=0.5, temperature=4.0)}
  return cfg
