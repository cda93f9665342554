"""`kdjax.feature_match`: relative map errors and the teacher's head on the student's features."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import feature_match
from tests.conftest import TINY, run_main


class _Model:
  """(logits, maps) from fixed functions of the input; `head` optional, as on kdjax's models."""

  def __init__(self, maps, logits, head=None):
    self.maps, self.logits = maps, logits
    if head is not None:
      self.head = head

  def __call__(self, x, *, train):
    assert not train
    return self.logits(x), [f(x) for f in self.maps]


def _batches(rng, sizes):
  return [(jnp.asarray(rng.normal(size=(n, 2, 2, 3)), jnp.float32), rng.integers(0, 3, n)) for n in sizes]


def test_relative_error_and_teacher_head_against_hand_computed_values():
  batches = _batches(np.random.default_rng(0), (5, 3))
  head = lambda m, train: m.mean(axis=(1, 2))                       # 3 channels -> 3 "classes"
  teacher = _Model([lambda x: x, lambda x: x[:, :1]], lambda x: x.mean(axis=(1, 2)), head=head)
  # Map 0 twice the teacher's: error sum(t^2) / sum(t^2) = 1; map 1 of another shape: not comparable.
  student = _Model([lambda x: 2 * x, lambda x: x], lambda x: -x.mean(axis=(1, 2)))
  report = feature_match.compare(student, teacher, batches)
  assert report['examples'] == 8
  assert report['relative_error'][0] == pytest.approx(1.0, rel=1e-6)
  assert report['relative_error'][1] is None
  assert report['teacher_head_top1'] is None                         # last maps differ in shape
  pooled = np.concatenate([np.asarray(x).mean(axis=(1, 2)) for x, _ in batches])
  labels = np.concatenate([y for _, y in batches])
  assert report['teacher_top1'] == pytest.approx(np.mean(pooled.argmax(-1) == labels))
  assert report['student_top1'] == pytest.approx(np.mean((-pooled).argmax(-1) == labels))
  assert report['agreement'] == pytest.approx(np.mean(pooled.argmax(-1) == (-pooled).argmax(-1)))

  # Last maps of one shape: the teacher's head reads the student's map (here 0.5x the teacher's: same argmax).
  student = _Model([lambda x: 0.5 * x], lambda x: x.mean(axis=(1, 2)))
  teacher = _Model([lambda x: x], lambda x: x.mean(axis=(1, 2)), head=head)
  report = feature_match.compare(student, teacher, batches)
  assert report['relative_error'] == [pytest.approx(0.25, rel=1e-6)]  # (0.5 - 1)^2
  assert report['teacher_head_top1'] == pytest.approx(report['teacher_top1'])


def test_match_mode_of_a_run_against_itself_is_exact(teacher_workdir):
  proc = run_main('--config', f'{TINY}:teacher', '--workdir', teacher_workdir, '--mode=match',
                  f'--config.teacher.workdir={teacher_workdir}', check=True)
  report = json.loads(proc.stdout.strip().splitlines()[-1])['match']
  summary = json.load(open(f'{teacher_workdir}/summary.json'))
  assert report['relative_error'] and all(e == 0.0 for e in report['relative_error'])
  assert report['agreement'] == 1.0
  assert report['student_top1'] == report['teacher_top1'] == report['teacher_head_top1']
  assert report['student_top1'] == pytest.approx(summary['best_eval_top1'], abs=1e-6)
