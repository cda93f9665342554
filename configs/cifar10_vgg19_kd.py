"""CIFAR-10: VGG-19-BN teacher -> 2-layer CNN student with KD at T=5 or T=20 (top-1 and top-5 reported).

Commands:
  `python main.py --config configs/cifar10_vgg19_kd.py:teacher --workdir workdirs/cifar10_vgg19_kd_teacher`
  `python main.py --config configs/cifar10_vgg19_kd.py:5 --workdir workdirs/cifar10_vgg19_kd_5`
  `python main.py --config configs/cifar10_vgg19_kd.py:20 --workdir workdirs/cifar10_vgg19_kd_20`
Not yet run on a GPU.
"""
from kdjax.config import config_args, default_workdir, loss_term, optimizer, phase
from configs import cifar10_student, cifar10_teacher


def get_config(arg='5'):
  temperature = r'\d+(\.\d*)?'
  config_args(arg, 'teacher', temperature, exclusive=[('teacher', temperature)])  # the teacher, or a student at T
  if arg == 'teacher':
    cfg = cifar10_teacher.get_config()
    cfg.student.name = 'vgg19_bn'
    cfg.phases.train.optimizer.learning_rate = 0.1
    return cfg
  cfg = cifar10_student.get_config()
  cfg.teacher.name = 'vgg19_bn'
  cfg.teacher.workdir = default_workdir(__file__, 'teacher')  # where `:teacher` runs
  cfg.phases.train.losses = {'kd': loss_term('hinton_kd', alpha=0.9, temperature=float(arg))}
  return cfg
