"""Every experiment config file loads and validates (teachers pointed at a placeholder)."""
import glob
import os
import runpy

import pytest

from kdjax import config as config_lib
from tests.conftest import ROOT

ARGS = {
    'default.py': [None], 'cifar10_teacher.py': [None, 'smoke', 'resnet20_cpu'],
    'cifar10_student.py': [None, 'smoke'],
    'cifar10_stagewise.py': ['', 'repeats', 'ce,repeats', 'finetune', 'subset,repeats', 'ce,subset', 'joint3,repeats', 'cumulative'],
    'cifar10_kd.py': [None, 'smoke'], 'cifar10_kd_grid.py': [None], 'cifar10_vgg19_kd.py': ['teacher', '5', '20'],
    'cifar10_adam_kd.py': [None], 'cifar10_methods.py': ['ce', 'kd', 'dkd', 'crd,repeats', 'fitnets'],
    'cifar100_benchmark.py': ['teacher', 'kd', 'dkd', 'ce', 'kd,cifar10', 'crd', 'fitnets'],
    'mnist_kd.py': ['teacher_vgg16', 'teacher_resnet164', 'mlp_from_vgg16', 'cnn3_from_resnet164',
                    'ensemble_from_vgg16'],
    'imagenette_teacher.py': ['', 'smoke'], 'imagenette_student.py': ['', 'small,subset', 'smallest,repeats', 'published'],
    'imagenette_stagewise.py': ['', 'smoke', 'joint3', 'joint5,small', 'finetune,subset,repeats', 'published'],
    'tiny_imagenet_kd.py': ['teacher', 'kd', 'ce', 'teacher,smoke', 'kd,smoke'],
}
CASES = [(name, arg) for name, args in ARGS.items() for arg in args]


def test_every_config_file_is_covered():
  files = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))} - {'__init__.py'}
  assert files == set(ARGS)


@pytest.mark.parametrize('name, arg', CASES)
def test_config_validates(name, arg):
  get_config = runpy.run_path(os.path.join(ROOT, 'configs', name))['get_config']
  cfg = get_config(arg) if arg is not None else get_config()
  with cfg.unlocked():
    if config_lib.uses_teacher(cfg) and cfg.suite != 'kd_comparison':
      cfg.teacher.workdir = cfg.teacher.workdir or '/teacher'
  config_lib.validate(cfg, 8)


@pytest.mark.parametrize('name', sorted(ARGS))
def test_config_refuses_an_argument_it_does_not_take(name):
  """A mistyped argument (`:dkdd`, `:smokee`) stops the command instead of running the default recipe."""
  from kdjax.errors import UserError
  get_config = runpy.run_path(os.path.join(ROOT, 'configs', name))['get_config']
  known = next((arg for arg in ARGS[name] if arg), None)
  with pytest.raises(UserError, match=r"config argument\(s\) 'bogus' not understood; this config file takes"):
    get_config(f'{known},bogus' if known else 'bogus')


@pytest.mark.parametrize('name, arg', [('cifar100_benchmark.py', 'kd,dkd'), ('cifar10_vgg19_kd.py', 'teacher,5'),
                                       ('mnist_kd.py', 'teacher_vgg16,mlp_from_vgg16'),
                                       ('imagenette_stagewise.py', 'joint3,finetune'),
                                       ('cifar10_stagewise.py', 'ce,joint4'), ('tiny_imagenet_kd.py', 'kd,ce')])
def test_config_refuses_arguments_that_exclude_each_other(name, arg):
  from kdjax.errors import UserError
  get_config = runpy.run_path(os.path.join(ROOT, 'configs', name))['get_config']
  with pytest.raises(UserError, match='exclude each other; pick one'):
    get_config(arg)


def test_smoke_combines_with_the_cpu_teacher_recipe():
  get_config = runpy.run_path(os.path.join(ROOT, 'configs', 'cifar10_teacher.py'))['get_config']
  cfg = get_config('resnet20_cpu,smoke')
  assert cfg.student.name == 'resnet20' and cfg.phases.train.epochs == 1.0 and cfg.data.train_split == 'train[:2%]'


def test_docstring_workdirs_are_where_the_commands_run_by_default():
  """A config docstring's `--config configs/X.py[:arg] --workdir W` names W = default_workdir(X, arg), the folder
  the students' default teacher.workdir reads: following the docstring must not hide a teacher from its students."""
  import re
  found = 0
  for path in sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))):
    for file, arg, workdir in re.findall(r'--config (configs/\w+\.py)(?::([\w,.]+))? --workdir (workdirs/[\w.,-]+)',
                                         open(path).read()):
      assert workdir == config_lib.default_workdir(file, arg), (os.path.basename(path), file, arg, workdir)
      found += 1
  assert found >= 15


def test_published_imagenette_variants_take_the_comparisons_optimizer_and_batch():
  from configs import imagenette_stagewise, imagenette_student
  for module in (imagenette_student, imagenette_stagewise):
    cfg = module.get_config('published')
    assert cfg.batch_size == 64 and module.get_config('').batch_size == 256
    for name in cfg.schedule:
      opt = cfg.phases[name].optimizer
      assert (opt.name, opt.learning_rate, opt.schedule) == ('adam', 1e-4, 'constant'), name
