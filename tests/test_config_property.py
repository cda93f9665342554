"""Property test: random wrong configs always end in one clear UserError naming the key (never another error)."""
import hypothesis
import pytest
from hypothesis import strategies as st

from kdjax import config as config_lib
from kdjax.errors import UserError
from tests.tiny_configs import tiny

BASE = tiny.get_config('kd')
BASE.teacher.workdir = '/teacher'
VALID_KEYS = config_lib.flat_keys(BASE)
# `student.*` is free-form (model constructor arguments): the model registry checks it when building the model.
TYPO_TARGETS = [k for k in VALID_KEYS if not k.startswith('student')]


def _set(cfg, dotted, value):
  *parents, last = dotted.split('.')
  node = cfg
  for part in parents:
    node = node[part]
  with cfg.unlocked():
    node[last] = value


def _typo(draw_text, key):
  *parents, last = key.split('.')
  return '.'.join(parents + [draw_text(last)])


@st.composite
def typo_keys(draw):
  key = draw(st.sampled_from(TYPO_TARGETS))
  last = key.split('.')[-1]
  index = draw(st.integers(0, len(last)))
  mutated = last[:index] + draw(st.sampled_from('abcdxyz_')) + last[index:]
  parents = key.split('.')[:-1]
  candidate = '.'.join(parents + [mutated])
  hypothesis.assume(candidate not in VALID_KEYS)
  return candidate


@hypothesis.settings(max_examples=150, deadline=None, database=None)
@hypothesis.given(typo_keys(), st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=5)))
def test_unknown_keys(key, value):
  cfg = tiny.get_config('kd')
  cfg.teacher.workdir = '/teacher'
  _set(cfg, key, value)
  with pytest.raises(UserError) as info:
    config_lib.validate(cfg, 8)
  message = str(info.value)
  assert '\n' not in message
  assert key.split('.')[-1] in message


RANGE_KEYS = [k for k in VALID_KEYS if any(
    len(k.split('.')) == len(p.split('.')) and all(w in ('*', x) for w, x in zip(p.split('.'), k.split('.')))
    for p in config_lib.RANGES)]


@hypothesis.settings(max_examples=150, deadline=None, database=None)
@hypothesis.given(st.sampled_from(RANGE_KEYS), st.floats(min_value=-1e6, max_value=1e6, allow_nan=False))
def test_out_of_range_numbers(key, value):
  cfg = tiny.get_config('kd')
  cfg.teacher.workdir = '/teacher'
  current = cfg
  for part in key.split('.'):
    current = current[part]
  value = int(value) if isinstance(current, int) else value
  pattern = next(p for p in config_lib.RANGES if len(p.split('.')) == len(key.split('.')) and all(
      w in ('*', x) for w, x in zip(p.split('.'), key.split('.'))))
  hypothesis.assume(not config_lib.RANGES[pattern][0](value))
  _set(cfg, key, value)
  with pytest.raises(UserError, match=key.replace('.', r'\.')):
    config_lib.validate(cfg, 1)


CHOICE_KEYS = ['suite', 'compute_dtype', 'nonfinite', 'data.on_corrupt', 'data.augment',
               'phases.train.optimizer.name', 'phases.train.optimizer.schedule', 'phases.train.losses.kd.kind']


@hypothesis.settings(max_examples=100, deadline=None, database=None)
@hypothesis.given(st.sampled_from(CHOICE_KEYS), st.text(min_size=1, max_size=12))
def test_unknown_choices(key, value):
  cfg = tiny.get_config('kd')
  cfg.teacher.workdir = '/teacher'
  current = cfg
  for part in key.split('.'):
    current = current[part]
  hypothesis.assume(value != current)
  _set(cfg, key, value)
  try:
    config_lib.validate(cfg, 1)
  except UserError as error:
    assert 'choose one of' in str(error) and '\n' not in str(error)
  else:  # only another valid choice may pass
    from kdjax import objective, optim, suites
    from kdjax.data import augment
    valid = {'suite': suites.SUITES, 'compute_dtype': ('float32', 'bfloat16'), 'nonfinite': ('stop', 'skip'),
             'data.on_corrupt': ('error', 'skip'), 'data.augment': augment.AUGMENTATIONS,
             'phases.train.optimizer.name': optim.OPTIMIZERS, 'phases.train.optimizer.schedule': optim.SCHEDULES,
             'phases.train.losses.kd.kind': objective.TERMS}[key]
    assert value in valid


@hypothesis.settings(max_examples=100, deadline=None, database=None)
@hypothesis.given(st.sampled_from(['temperature', 'alpha']), st.floats(allow_nan=False, allow_infinity=False))
def test_loss_arguments(arg, value):
  cfg = tiny.get_config('kd')
  cfg.teacher.workdir = '/teacher'
  hypothesis.assume(not (0 <= value <= 1) if arg == 'alpha' else value <= 0)
  _set(cfg, f'phases.train.losses.kd.{arg}', value)
  with pytest.raises(UserError, match=f'`{arg}` must be'):
    config_lib.validate(cfg, 1)
