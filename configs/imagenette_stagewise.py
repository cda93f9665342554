"""Stage-wise feature-map distillation on Imagenette: the headline kdjax experiment.

Command: `python main.py --config configs/imagenette_stagewise.py --workdir workdirs/imagenette_stagewise`
(after `configs/imagenette_teacher.py` has finished in workdirs/imagenette_teacher, or with
`--config.teacher.workdir=DIR` pointing at any ResNet-34 teacher run or imported checkpoint).
Phases: stage k = 0..4 trains student stage k alone to match teacher feature map k (MSE, with a learned 1x1
adapter where channel counts differ), 5 epochs each; then the classifier head on labels for 15 epochs with the
backbone frozen. Every phase Adam 1e-3 with its own cosine decay (`imagenette_student.student_optimizer`; the
published comparison's Adam 1e-4 constant with `published`); the 40-epoch total equals `imagenette_student.py`'s
budget. Arguments (comma-separated): `small`, `smallest` (student size), `joint3`, `joint4`, `joint5` (the first n
feature maps and the labels together in one 40-epoch phase), `finetune` (classifier phase trains everything),
`subset`, `published`, `repeats`, `smoke`.
"""
from kdjax.config import base_config, config_args, default_workdir, joint, stagewise
from configs.imagenette_student import COMMON_ARGS, STUDENTS, TOTAL_EPOCHS, apply_common_args, student_optimizer
from configs.imagenette_teacher import imagenette_data

STAGE_EPOCHS, CLASSIFIER_EPOCHS = 5.0, 15.0


def get_config(arg=''):
  args = config_args(arg, *COMMON_ARGS, r'joint\d', 'finetune', exclusive=[STUDENTS, (r'joint\d', 'finetune')])
  cfg = apply_common_args(imagenette_data(base_config(), arg or ''), args)
  cfg.teacher.name = 'resnet34'
  cfg.teacher.workdir = default_workdir('imagenette_teacher.py', 'smoke' if 'smoke' in args else '')
  scale = 0.1 if 'smoke' in args else 1.0
  adam = student_optimizer(args)
  joint_maps = [int(a[len('joint'):]) for a in args if a.startswith('joint')]
  if joint_maps:
    cfg.schedule, cfg.phases = joint(joint_maps[0], TOTAL_EPOCHS * scale, adam)
  else:
    cfg.schedule, cfg.phases = stagewise(5, STAGE_EPOCHS * scale, CLASSIFIER_EPOCHS * scale, adam, adam,
                                         finetune_backbone='finetune' in args)
  cfg.eval_every_epochs = 5.0 * scale
  return cfg
