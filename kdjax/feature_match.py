"""How close a distilled student's feature maps are to its teacher's: `python main.py --mode=match`.

A stage-wise or feature-distillation run can lose to training on labels for two different reasons: the student
did not reach the teacher's maps (an optimisation budget problem: more steps or a larger learning rate help), or it
reached them and they do not serve the student's own head. The training loss alone does not tell which, since its
scale differs from map to map. This reports, on a split:

* per map k, the relative error sum((s_k - t_k)^2) / sum(t_k^2) between student and teacher map k, where their
  shapes agree (0 = the teacher's map exactly, 1 = no better than predicting zeros); `None` where they differ (an
  adapter would be needed to compare them);
* the accuracy of the teacher's own head on the student's last map (when it has the teacher's shape): what the
  student's features are worth to a classifier that already knows the teacher's features;
* the student's and the teacher's accuracy and their top-1 agreement.

Both models see the same normalised images (the student's, as in training) and run in inference mode.
"""
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np


def _batch_sums(student, teacher, images, labels):
  student_logits, student_maps = student(images, train=False)
  teacher_logits, teacher_maps = teacher(images, train=False)
  sums = dict(student_top1=jnp.sum(student_logits.argmax(-1) == labels),
              teacher_top1=jnp.sum(teacher_logits.argmax(-1) == labels),
              agreement=jnp.sum(student_logits.argmax(-1) == teacher_logits.argmax(-1)))
  for k, (s, t) in enumerate(zip(student_maps, teacher_maps)):
    if s.shape == t.shape:
      s, t = s.astype(jnp.float32), t.astype(jnp.float32)
      sums[f'error_{k}'] = jnp.sum((s - t) ** 2)
      sums[f'energy_{k}'] = jnp.sum(t ** 2)
  head = getattr(teacher, 'head', None)
  if head is not None and student_maps[-1].shape == teacher_maps[-1].shape:
    sums['teacher_head_top1'] = jnp.sum(head(student_maps[-1], train=False).argmax(-1) == labels)
  return sums


def compare(student, teacher, batches: Iterable[tuple[jax.Array, np.ndarray]]) -> dict:
  """The report above, from NNX models returning (logits, maps) and (normalised images, labels) batches."""
  forward = jax.jit(lambda x, y: _batch_sums(student, teacher, x, y))
  totals, count, num_maps = {}, 0, 0
  for images, labels in batches:
    sums = forward(images, jnp.asarray(labels))
    totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
    count += len(labels)
    num_maps = num_maps or len(jax.eval_shape(lambda x: student(x, train=False), images)[1])
  relative_error = [totals[f'error_{k}'] / max(totals[f'energy_{k}'], 1e-30) if f'error_{k}' in totals else None
                    for k in range(num_maps)]
  return dict(examples=count, relative_error=relative_error,
              teacher_head_top1=totals['teacher_head_top1'] / count if 'teacher_head_top1' in totals else None,
              **{k: totals[k] / count for k in ('student_top1', 'teacher_top1', 'agreement')})
