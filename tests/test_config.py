"""Config validation: every user mistake is one UserError naming the fix."""
import copy
import json

import pytest

from kdjax import config as config_lib
from kdjax.errors import UserError
from tests.tiny_configs import tiny


def _error(mutate, num_devices=1, arg='kd'):
  cfg = tiny.get_config(arg)
  cfg.teacher.workdir = '/somewhere'
  with cfg.unlocked():
    mutate(cfg)
  with pytest.raises(UserError) as info:
    config_lib.validate(cfg, num_devices)
  return str(info.value)


def test_tiny_configs_are_valid():
  for arg in ('ce', 'teacher'):
    config_lib.validate(tiny.get_config(arg), 8)


@pytest.mark.parametrize('mutate, expected', [
    (lambda c: c.phases.train.losses.kd.update(temperature=-1.0), '`temperature` must be > 0'),
    (lambda c: c.phases.train.losses.kd.update(alpha=1.5), '`alpha` must be in [0, 1]'),
    (lambda c: c.phases.train.losses.kd.update(temprature=2.0), 'did you mean `temperature`'),
    (lambda c: c.phases.train.losses.kd.update(kind='hintn_kd'), 'choose one of'),
    (lambda c: c.phases.train.losses.kd.update(weight=-1.0), 'weight` must be >= 0'),
    (lambda c: setattr(c, 'batch_size', 12), 'multiple of the device count (8)'),
    (lambda c: setattr(c, 'compute_dtype', 'float16'), 'choose one of: bfloat16, float32'),
    (lambda c: setattr(c, 'schedule', ('train', 'finetune')), 'names phase `finetune`'),
    (lambda c: c.phases.train.update(epochs=0.0), 'epochs` must be > 0'),
    (lambda c: c.phases.train.optimizer.update(name='lamb'), 'choose one of: adam, adamw, sgd'),
    (lambda c: c.phases.train.optimizer.update(schedule='exp'), 'choose one of: constant, cosine'),
    (lambda c: c.data.update(augment='mixup'), 'choose one of'),
    (lambda c: setattr(c, 'bath_size', 4), 'did you mean `batch_size`'),
    (lambda c: c.data.update(datset='x'), 'did you mean `data.dataset`'),
    (lambda c: c.teacher.update(workdir=''), 'teacher.workdir` is empty'),
    (lambda c: c.teacher.update(workdir=' , '), 'teacher.workdir` is empty'),
    # Caught before any data is read, not after (the model, the splits, the phases' patterns):
    (lambda c: c.student.update(name='mlp2x'), "unknown model 'mlp2x'"),
    (lambda c: c.student.update(hiden=64), 'hiden'),
    (lambda c: c.data.update(heldout_split='train[25%:'), "malformed split 'train[25%:'"),
    (lambda c: c.phases.train.update(trainable='^stages/(0/'), 'is not a regular expression'),
    (lambda c: c.repeats.update(seeds=()), 'give distinct seeds, at least one'),
    (lambda c: c.repeats.update(seeds=(0, 0)), 'give distinct seeds'),
    (lambda c: c.phases.train.optimizer.update(schedule='piecewise', boundaries_epochs=(2.0, 9.0)),
     '[9.0] lie outside the phase after its warm-up (0 to 4 epochs)'),
    (lambda c: c.phases.train.optimizer.update(schedule='piecewise', boundaries_epochs=(0.5,), warmup_epochs=1.0),
     '[0.5] lie outside the phase after its warm-up (1 to 4 epochs)'),
    # A sweep's every cell is validated as the run it will be: the bad value sits in the second cell.
    (lambda c: c.update(suite='sweep') or c.sweep.update(grid='phases.train.losses.kd.alpha=0.5,1.5'),
     'sweep cell alpha=1.5: config `phases.train.losses.kd`: `alpha` must be in [0, 1], got 1.5'),
])
def test_bad_values_name_the_fix(mutate, expected):
  assert expected in _error(mutate, num_devices=8)


def test_unknown_key_suggests_closest():
  error = config_lib.unknown_key_error('phases.train.optimiser.learning_rate', tiny.get_config('ce'))
  assert 'did you mean `phases.train.optimizer.learning_rate`' in str(error)


def test_stagewise_helper_builds_freezing_phases():
  opt = config_lib.optimizer()
  schedule, phases = config_lib.stagewise(3, 1.0, 2.0, opt, opt)
  assert schedule == ('stage0', 'stage1', 'stage2', 'classifier')
  assert phases.stage2.trainable == '^stages/(2)/'
  assert phases.classifier.trainable == '^head/'
  _, phases = config_lib.stagewise(3, 1.0, 2.0, opt, opt, freeze_earlier=False, finetune_backbone=True)
  assert phases.stage2.trainable == '^stages/(0|1|2)/'
  assert phases.classifier.trainable == '.*'
  schedule, phases = config_lib.joint(3, 5.0, opt, map_weights=(1.0, 0.5, 0.25))
  assert set(phases.joint.losses) == {'ce', 'feature0', 'feature1', 'feature2'}
  assert phases.joint.losses.feature2.weight == 0.25


def test_phases_built_from_one_optimizer_do_not_share_it():
  """Found on real runs: `--config.phases.stage0.optimizer.learning_rate=...` changed the classifier phase too,
  because every phase held the same ConfigDict."""
  opt = config_lib.optimizer('adam', learning_rate=1e-3)
  cfg = tiny.get_config('ce')
  cfg.schedule, cfg.phases = config_lib.stagewise(2, 1.0, 1.0, opt, opt)
  cfg.phases.stage0.optimizer.learning_rate = 0.5   # what a command-line override does
  assert cfg.phases.stage1.optimizer.learning_rate == 1e-3
  assert cfg.phases.classifier.optimizer.learning_rate == 1e-3
  assert opt.learning_rate == 1e-3


def test_a_sub_config_at_two_places_is_refused():
  cfg = tiny.get_config('ce')
  opt = config_lib.optimizer('adam')
  cfg.phases.a = config_lib.phase(1, {'ce': config_lib.loss_term('ce')}, opt)
  cfg.phases.a.optimizer = opt
  cfg.phases.b = config_lib.phase(1, {'ce': config_lib.loss_term('ce')}, opt)
  cfg.phases.b.optimizer = opt
  cfg.schedule = ('a', 'b')
  with pytest.raises(UserError, match='`phases.a.optimizer` and `phases.b.optimizer` are one shared object'):
    config_lib.validate(cfg)


def test_a_run_recorded_before_a_key_existed_still_matches():
  """A key kdjax added since a run was recorded, at its default, is no difference (the run resumes, a suite reuses
  it); set to anything else, it is."""
  cfg = tiny.get_config('ce')
  current = json.loads(cfg.to_json_best_effort())
  recorded = copy.deepcopy(current)
  del recorded['phases']['train']['frozen_eval']
  del recorded['data']['heldout_split']
  assert config_lib.differing_keys(current, recorded) == []
  cfg.phases.train.frozen_eval = True
  assert config_lib.differing_keys(json.loads(cfg.to_json_best_effort()), recorded) == ['phases.train.frozen_eval']
  recorded['phases']['train']['epochs'] = 99.0
  assert config_lib.differing_keys(current, recorded) == ['phases.train.epochs']


def test_a_loss_term_recorded_before_an_argument_existed_still_matches():
  """A loss term's argument added since (here feature_mse's `regressor`) counts at its kind's default."""
  cfg = tiny.get_config('ce')
  cfg.phases.train.losses.hint = config_lib.loss_term('feature_mse', weight=0.5)
  current = json.loads(cfg.to_json_best_effort())
  recorded = copy.deepcopy(current)
  del recorded['phases']['train']['losses']['hint']['regressor']
  assert config_lib.differing_keys(current, recorded) == []
  cfg.phases.train.losses.hint.regressor = 'conv_bn_relu'
  assert config_lib.differing_keys(json.loads(cfg.to_json_best_effort()), recorded) == [
      'phases.train.losses.hint.regressor']


def test_only_the_scheduled_phases_decide_whether_a_teacher_is_needed():
  cfg = tiny.get_config('stagewise')  # feature phases need the teacher, the classifier phase does not
  assert cfg.teacher.workdir == '' and config_lib.uses_teacher(cfg)
  with pytest.raises(UserError, match='teacher.workdir` is empty'):
    config_lib.validate(cfg)
  cfg.schedule = ('classifier',)
  assert not config_lib.uses_teacher(cfg)
  config_lib.validate(cfg)


def test_the_default_demo_is_a_ce_teacher_a_ce_student_and_a_kd_student_of_it():
  """README's first command (`python main.py`, suite kd_comparison): what each of its three runs trains."""
  import runpy
  from kdjax import suites
  cfg = runpy.run_path('configs/default.py')['get_config']()
  runs = suites.kd_comparison_configs(cfg, '/work/demo')
  assert list(runs) == ['teacher', 'student_ce', 'student_kd']
  teacher, ce, kd = runs.values()
  assert teacher.student.name == cfg.teacher.name and not teacher.teacher.workdir
  assert [dict(teacher.phases[p].losses) for p in teacher.schedule] == [{'ce': config_lib.loss_term('ce')}]
  assert teacher.phases[teacher.schedule[0]].epochs == cfg.teacher.epochs
  assert ce.student.name == kd.student.name == cfg.student.name and not ce.teacher.workdir
  assert all(set(ce.phases[p].losses) == {'ce'} for p in ce.schedule)
  assert kd.teacher.workdir == '/work/demo/teacher'
  assert [set(kd.phases[p].losses) for p in kd.schedule] == [set(cfg.phases[p].losses) for p in cfg.schedule]
  assert any('kd' in kd.phases[p].losses for p in kd.schedule)
  for run in runs.values():
    config_lib.validate(run, 1)
    assert run.suite == 'single'


def test_joint_mode_needs_one_weight_per_map():
  from kdjax.errors import UserError as Refused
  schedule, phases = config_lib.joint(2, 1.0, config_lib.optimizer('adam'), map_weights=(1.0, 3.0))
  assert [phases.joint.losses[f'feature{k}'].weight for k in range(2)] == [1.0, 3.0]
  for weights in ((1.0,), (1.0, 2.0, 3.0)):
    with pytest.raises(Refused, match='give one per map'):
      config_lib.joint(2, 1.0, config_lib.optimizer('adam'), map_weights=weights)
  with pytest.raises(Refused, match='at least one feature map'):
    config_lib.joint(0, 1.0, config_lib.optimizer('adam'))


@pytest.mark.parametrize('name', ['loss', 'top1', 'top5', 'agreement'])
def test_a_loss_term_named_like_a_logged_metric_is_refused(name):
  cfg = tiny.get_config('ce')
  cfg.phases.train.losses = {name: config_lib.loss_term('ce')}
  with pytest.raises(UserError, match=f'`phases.train.losses.{name}`: .*names a logged metric'):
    config_lib.validate(cfg, 1)
