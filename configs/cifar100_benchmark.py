"""The CIFAR-100 KD benchmark recipe (as in the published CIFAR-100 tables): resnet32x4 -> resnet8x4.

SGD lr 0.05, batch 64, 240 epochs, x0.1 at epochs 150/180/210, weight decay 5e-4, momentum 0.9, crop+flip.
Args: `teacher` (resnet32x4 on labels), `kd` (CE weight 0.1 + KD weight 0.9 at T=4), `dkd` (CE + DKD with
alpha 1, beta 8, T 4, 20-epoch warm-up), `crd` (CE + CRD weight 0.8: 128-d affine embeddings of the pooled last
stage, each contrasted with the example's own row of the other side's memory bank against 16384 random rows as in
RepDistiller (`nce_k`), those of its class left out; nce_t 0.07, momentum 0.5), `fitnets` (CE + 100 x the MSE of
the second stage's map through the references' conv-BN-ReLU regressor), `ce` (the student on labels).
Data: `cifar100` from tfds (needs `tfds build cifar100` with internet) or `--config.data.dataset=PATH` of an image
folder / .tar.gz; `:kd,cifar10` runs the same recipe on `../shared/data/cifar10-jpeg.tar.gz`.
Commands, the teacher first (each student reads the workdir its teacher command runs in without --workdir):
  python main.py --config configs/cifar100_benchmark.py:teacher     # -> workdirs/cifar100_benchmark_teacher
  python main.py --config configs/cifar100_benchmark.py:kd          # or :dkd, :crd, :fitnets, :ce
  python main.py --config configs/cifar100_benchmark.py:teacher,cifar10 && ... :kd,cifar10   # on CIFAR-10
CRD contrasts with InfoNCE, not the paper's NCE (see `kdjax.losses.crd_nce`), on every dataset. Not yet run on a
GPU; `cifar10_methods.py` runs the same methods at a CPU budget.
Where this differs from the reference code (RepDistiller, mdistiller): bfloat16 compute (they run float32); the
student distils from the teacher run's best checkpoint on the test split (RepDistiller's scripts use the last epoch's:
`--config.teacher.checkpoint=last` reads that one); DKD's beta is mdistiller's 8 for this pair (it
tunes beta per pair: 2 for resnet56 -> resnet20, 6 for vgg13 -> vgg8). Both report the best test accuracy over the
epochs, so the student is evaluated every epoch, as they do.
"""
from kdjax.config import base_config, config_args, default_workdir, loss_term, optimizer, phase


# The loss terms of each method of the benchmark recipe, by its published weights, given DKD's linear warm-up in
# epochs (20 of 240 in the recipe). Shared with `cifar10_methods.py`, which runs the same methods at a CPU budget.
METHOD_LOSSES = {
    'ce': lambda warmup_epochs: {'ce': loss_term('ce')},
    'kd': lambda warmup_epochs: {'ce': loss_term('ce', weight=0.1),
                                 'kd': loss_term('kd', weight=0.9, temperature=4.0)},
    'dkd': lambda warmup_epochs: {'ce': loss_term('ce'),
                                  'dkd': loss_term('dkd', alpha=1.0, beta=8.0, temperature=4.0,
                                                   warmup_epochs=float(warmup_epochs))},
    # CRD's embedding heads are affine, as RepDistiller's `Embed` (an nn.Linear with its bias).
    'crd': lambda warmup_epochs: {'ce': loss_term('ce'), 'crd': loss_term('crd', weight=0.8, head_bias=True)},
    # FitNets as RepDistiller runs it (no separate hint stage): CE + 100 x MSE of the second stage's output (its
    # hint layer 2) through the reference regressor, conv-BN-ReLU, trained jointly.
    'fitnets': lambda warmup_epochs: {'ce': loss_term('ce'),
                                      'hint': loss_term('feature_mse', weight=100.0, student_stage=2, teacher_stage=2,
                                                        adapter='always', regressor='conv_bn_relu')},
}


def get_config(arg='kd'):
  args = config_args(arg, 'teacher', 'cifar10', *METHOD_LOSSES, exclusive=[('teacher', *METHOD_LOSSES)])
  cfg = base_config()
  cfg.data.dataset = '../shared/data/cifar10-jpeg.tar.gz' if 'cifar10' in args else 'cifar100'
  cfg.data.augment = 'crop_flip'
  cfg.batch_size = 64
  cfg.compute_dtype = 'bfloat16'
  cfg.student.name = 'resnet32x4' if 'teacher' in args else 'resnet8x4'
  cfg.teacher.name = 'resnet32x4'
  # Where `:teacher` (or `:teacher,cifar10`) runs without --workdir.
  cfg.teacher.workdir = default_workdir(__file__, 'teacher,cifar10' if 'cifar10' in args else 'teacher')
  sgd = optimizer('sgd', learning_rate=0.05, momentum=0.9, weight_decay=5e-4, schedule='piecewise',
                  boundaries_epochs=(150, 180, 210), decay_factor=0.1)
  method = next((a for a in args if a in METHOD_LOSSES), 'ce')
  cfg.phases.train = phase(240, METHOD_LOSSES[method](20), sgd)
  if method == 'crd':
    cfg.phases.train.losses.crd.negatives = 16384  # RepDistiller's; the CPU-sized cifar10_methods keeps 4096
  cfg.eval_every_epochs = 1.0  # the references' best-of-240 evaluations
  return cfg
