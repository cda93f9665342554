"""Tiny-ImageNet (200 classes, 64x64): a ResNet-34 teacher, then a ResNet-18 student by Hinton KD.

Data: must be present locally. tfds has no Tiny-ImageNet builder (tensorflow_datasets 4.9.10's catalogue has none;
`imagenet_resized/64x64` is all 1,000 ImageNet classes, another dataset), so unzip `tiny-imagenet-200.zip` (from
http://cs231n.stanford.edu/tiny-imagenet-200.zip) on a machine with internet and pass the folder, or a `.tar.gz` of
it: `--config.data.dataset=/path/tiny-imagenet-200` (default `../shared/data/tiny-imagenet-200`). Its own layout is
read as is (`kdjax/data/tiny_imagenet.py`): train/<wnid>/images/ (100,000 images) for training, val/images/ labelled
by val/val_annotations.txt (10,000) for evaluation.
Commands (the teacher first; the student reads it from `teacher.workdir`), each with
`--config.data.dataset=/path/tiny-imagenet-200` unless the data is at the default path:
  `python main.py --config configs/tiny_imagenet_kd.py:teacher --workdir workdirs/tiny_imagenet_kd_teacher`
  `python main.py --config configs/tiny_imagenet_kd.py:kd --workdir workdirs/tiny_imagenet_kd_kd`
`:ce` trains the student on labels only (the baseline KD should beat); `,smoke` (e.g. `:kd,smoke`) runs a few steps
on 1% of the data at 32 px on a CPU. Models: the CIFAR-stem ResNets (3x3/1 stem conv, no max-pool), as usual at 64 px,
where ImageNet's 7x7/2 stem and max-pool would leave 2x2 maps before the pool. Recipe: SGD + Nesterov, lr 0.1 for
batch 128 with 2 warm-up epochs and cosine decay, weight decay 5e-4, pad-4 crops + flips, bf16, 100 epochs each; KD
is Hinton's (1-a) CE + a T^2 KL with a=0.9, T=4. Not yet run on a GPU, so no accuracy is claimed.
"""
from kdjax.config import base_config, config_args, default_workdir, loss_term, optimizer, phase

TINY_IMAGENET = '../shared/data/tiny-imagenet-200'
TEACHER, STUDENT = 'resnet34_cifar', 'resnet18_cifar'


def get_config(arg='kd'):
  args = config_args(arg or 'kd', 'teacher', 'kd', 'ce', 'smoke', exclusive=[('teacher', 'kd', 'ce')])
  cfg = base_config()
  cfg.data.dataset = TINY_IMAGENET
  cfg.data.train_split = 'train'
  cfg.data.eval_split = 'val'
  cfg.data.augment = 'crop_flip'
  cfg.compute_dtype = 'bfloat16'
  cfg.batch_size = 128
  cfg.eval_batch_size = 512
  cfg.eval_every_epochs = 5.0
  cfg.student.name = TEACHER if 'teacher' in args else STUDENT
  cfg.teacher.name = TEACHER
  cfg.teacher.workdir = default_workdir(__file__, 'teacher,smoke' if 'smoke' in args else 'teacher')
  epochs = 100
  if 'smoke' in args:
    cfg.data.train_split, cfg.data.eval_split = 'train[:1%]', 'val[:2%]'
    cfg.data.image_size = 32
    cfg.compute_dtype = 'float32'
    cfg.batch_size, cfg.eval_batch_size = 16, 40
    cfg.log_every_steps = 5
    epochs = 0.5
  sgd = optimizer('sgd', learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule='cosine',
                  warmup_epochs=2.0 if 'smoke' not in args else 0.0)
  losses = {'ce': loss_term('ce')}
  if 'kd' in args:
    losses = {'kd': loss_term('hinton_kd', alpha=0.9, temperature=4.0)}
  cfg.phases.train = phase(epochs, losses, sgd)
  return cfg
