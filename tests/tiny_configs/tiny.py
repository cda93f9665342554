"""Tiny runs on the bundled digits for integration tests: `get_config('ce'|'teacher'|'kd'|'crd'|'stagewise')`.

The KD and stage-wise variants expect `--config.teacher.workdir` to point at a finished 'teacher' run.
"""
from kdjax.config import base_config, loss_term, optimizer, phase, stagewise


def get_config(arg='ce'):
  cfg = base_config()
  cfg.data.dataset = 'digits'
  cfg.data.augment = 'none'
  cfg.data.train_split = 'train[:50%]'
  cfg.student.name = 'cnn2'
  cfg.student.hidden = 16
  cfg.student.dropout = 0.0
  cfg.teacher.name = 'cnn3'
  cfg.batch_size = 32
  cfg.eval_batch_size = 64
  cfg.log_every_steps = 10
  cfg.eval_every_epochs = 1.0
  opt = optimizer('adam', learning_rate=3e-3, schedule='cosine')
  cfg.phases.train = phase(4, {"ce": loss_term("ce")}, opt)
  if arg == 'teacher':
    cfg.student.name = 'cnn3'
    cfg.student.dropout = 0.0
  elif arg == 'kd':
    cfg.phases.train.losses = {'kd': loss_term('hinton_kd', alpha=0.5, temperature=4.0)}
  elif arg == 'crd':
    cfg.phases.train.losses = {'ce': loss_term('ce'), 'crd': loss_term('crd', weight=0.8, embed_dim=16, negatives=64)}
  elif arg == 'stagewise':
    cfg.schedule, cfg.phases = stagewise(2, 1.0, 2.0, opt, opt)
  return cfg
