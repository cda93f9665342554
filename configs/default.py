"""The embedded default: teacher, CE student and KD student on scikit-learn's bundled 8x8 digits.

Command: `python main.py` (no download, CPU, under a minute). Data: 1,797 real handwritten digits shipped with
scikit-learn (a fixed ~80/20 train/test split, see kdjax/data/digits.py). It trains a 3-layer CNN teacher, then a
small 2-layer MLP student (32 hidden units) on labels only and with Hinton KD from that teacher, and prints a table
of the three test accuracies (also in workdirs/default/results.md).
"""
from kdjax.config import base_config, config_args, loss_term, optimizer, phase


def get_config(arg=None):
  config_args(arg)
  cfg = base_config()
  cfg.suite = 'kd_comparison'
  cfg.data.dataset = 'digits'
  cfg.data.augment = 'none'          # digits must not be flipped; 8x8 leaves no room to crop
  cfg.student.name = 'mlp2'
  cfg.student.hidden = 32
  cfg.teacher.name = 'cnn3'
  cfg.teacher.epochs = 30.0
  cfg.batch_size = 64
  cfg.schedule = ('train',)
  cfg.phases.train = phase(15, {'kd': loss_term('hinton_kd', alpha=0.7, temperature=4.0)},
                           optimizer('adam', learning_rate=3e-3, schedule='cosine'))
  cfg.eval_every_epochs = 5.0
  cfg.log_every_steps = 100
  return cfg
