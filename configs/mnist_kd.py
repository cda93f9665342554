"""MNIST: 2-layer MLP, 3-layer CNN or CNN-ensemble students distilled from a VGG-16-BN or ResNet-164 teacher.

Data: `../shared/data/mnist-png.tar.gz` (real MNIST as PNG folders, 60,000/10,000) or `--config.data.dataset=mnist`
(tfds). Commands (arg = `teacher_<vgg16|resnet164>` or `<mlp|cnn3|ensemble>_from_<vgg16|resnet164>`):
  `python main.py --config configs/mnist_kd.py:teacher_vgg16 --workdir workdirs/mnist_kd_teacher_vgg16`
  `python main.py --config configs/mnist_kd.py:mlp_from_vgg16 --workdir workdirs/mnist_kd_mlp_from_vgg16`
MNIST is resized to 32 px (VGG's five pooling stages need it). Not yet run on a GPU.
"""
from kdjax.config import base_config, config_args, default_workdir, loss_term, optimizer, phase

MNIST = '../shared/data/mnist-png.tar.gz'
TEACHERS = {'vgg16': 'vgg16_bn', 'resnet164': 'resnet164'}
STUDENTS = {'mlp': dict(name='mlp2', hidden=800), 'cnn3': dict(name='cnn3'),
            'ensemble': dict(name='ensemble', members=('cnn3', 'cnn3', 'cnn3'))}


def get_config(arg='teacher_vgg16'):
  runs = (f'teacher_({"|".join(TEACHERS)})', f'({"|".join(STUDENTS)})_from_({"|".join(TEACHERS)})')
  config_args(arg, *runs, exclusive=[runs])
  cfg = base_config()
  cfg.data.dataset = MNIST
  cfg.data.image_size = 32
  cfg.data.augment = 'none'
  cfg.batch_size = 256
  cfg.compute_dtype = 'bfloat16'
  if arg.startswith('teacher_'):
    cfg.student.name = TEACHERS[arg[len('teacher_'):]]
    cfg.phases.train = phase(10, {'ce': loss_term('ce')}, optimizer('sgd', learning_rate=0.1, schedule='onecycle'))
    return cfg
  student, _, teacher = arg.partition('_from_')
  cfg.student = STUDENTS[student]
  cfg.teacher.name = TEACHERS[teacher]
  cfg.teacher.workdir = default_workdir(__file__, f'teacher_{teacher}')  # where `:teacher_<name>` runs
  cfg.phases.train = phase(10, {'kd': loss_term('hinton_kd', alpha=0.7, temperature=4.0)},
                           optimizer('adam', learning_rate=1e-3, schedule='cosine'))
  return cfg
