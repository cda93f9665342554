"""CIFAR-10 KD with Adam + weight decay, linear decay, dropout and augmentation (2-layer CNN from ResNet-18).

Command: `python main.py --config configs/cifar10_adam_kd.py --workdir workdirs/cifar10_adam_kd` (after the
cifar10_teacher.py run). AdamW lr 1e-3, weight decay 5e-4, linear decay to 0 with 1 warm-up epoch, head dropout
0.5, crop+flip. Not yet run on a GPU.
"""
from kdjax.config import config_args, loss_term, optimizer, phase
from configs import cifar10_kd


def get_config(arg=None):
  config_args(arg, 'smoke')
  cfg = cifar10_kd.get_config(arg)
  cfg.student.dropout = 0.5
  cfg.phases.train = phase(cfg.phases.train.epochs, {'kd': loss_term('hinton_kd', alpha=0.5, temperature=4.0)},
                           optimizer('adamw', learning_rate=1e-3, weight_decay=5e-4, schedule='linear',
                                     warmup_epochs=1.0))
  return cfg
