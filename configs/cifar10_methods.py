"""The benchmark recipe's methods (CE, KD, DKD, CRD, FitNets) on CIFAR-10 at a CPU budget: ResNet-20 -> ResNet-8.

The issue's resnet32x4 -> resnet8x4 runs (`cifar100_benchmark.py`, 240 epochs) need a GPU; this config runs the same
loss sets (`cifar100_benchmark.METHOD_LOSSES`: KD = CE 0.1 + KD 0.9 at T 4; DKD alpha 1, beta 8, T 4 with its
warm-up; CRD weight 0.8 with memory banks of every training example; FitNets CE + 100 x hint on stage 2) and the
same optimizer (SGD 0.05, momentum 0.9, weight decay 5e-4, batch 64, crop+flip, x0.1 at 150/180/210 of 240
epochs), with the schedule and DKD's warm-up (20 of 240 epochs) scaled to `EPOCHS`. The teacher is
`cifar10_teacher.py:resnet20_cpu` (82.6%). DKD keeps the recipe's beta 8, which mdistiller uses for resnet32x4 ->
resnet8x4; for its small-ResNet pairs (resnet56 -> resnet20) it uses 2, so this config's DKD row is the recipe's,
not a DKD tuned for this pair.

Commands (teacher first; see `cifar10_stagewise.py`):
  python main.py --config configs/cifar10_methods.py:kd --workdir workdirs/cifar10_methods_kd
Arguments (comma-separated): one of `ce`, `kd`, `dkd`, `crd`, `fitnets` (default `kd`); `repeats` (seeds 0, 1, 2).
"""
from configs.cifar100_benchmark import METHOD_LOSSES
from configs.cifar10_teacher import CIFAR10
from kdjax.config import base_config, config_args, default_workdir, optimizer, phase

EPOCHS = 6.0
RECIPE_EPOCHS, RECIPE_BOUNDARIES, RECIPE_WARMUP_EPOCHS = 240, (150, 180, 210), 20
BATCH = 64


def get_config(arg='kd'):
  args = config_args(arg or 'kd', *METHOD_LOSSES, 'repeats', exclusive=[METHOD_LOSSES])
  method = next((a for a in args if a in METHOD_LOSSES), 'kd')
  cfg = base_config()
  cfg.data.dataset = CIFAR10
  cfg.data.augment = 'crop_flip'
  cfg.compute_dtype = 'float32'
  cfg.batch_size = BATCH
  cfg.student.name = 'resnet8'
  cfg.teacher.name = 'resnet20'
  cfg.teacher.workdir = default_workdir('cifar10_teacher.py', 'resnet20_cpu') if method != 'ce' else ''
  scale = EPOCHS / RECIPE_EPOCHS
  sgd = optimizer('sgd', learning_rate=0.05, momentum=0.9, weight_decay=5e-4, schedule='piecewise',
                  boundaries_epochs=tuple(b * scale for b in RECIPE_BOUNDARIES), decay_factor=0.1)
  cfg.phases.train = phase(EPOCHS, METHOD_LOSSES[method](RECIPE_WARMUP_EPOCHS * scale), sgd)
  cfg.eval_every_epochs = 1.0
  cfg.log_every_steps = 200
  if 'repeats' in args:
    cfg.suite = 'repeats'
    cfg.repeats.seeds = (0, 1, 2)
  return cfg
