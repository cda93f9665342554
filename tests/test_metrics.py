"""Top-k accuracy (ties and NaNs are not counted as right); accumulators carried through a checkpoint's JSON meta."""
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import metrics


def test_top_k_counts_the_label_among_the_k_highest():
  logits = jnp.asarray([[0.1, 0.9, 0.5, 0.2], [0.8, 0.1, 0.3, 0.0]])
  labels = jnp.asarray([2, 2])
  np.testing.assert_array_equal(metrics.top_k_correct(logits, labels, 1), [0, 0])
  np.testing.assert_array_equal(metrics.top_k_correct(logits, labels, 2), [1, 1])
  np.testing.assert_array_equal(metrics.top_k_correct(logits, labels, 9), [1, 1])  # k clipped to 4 classes


def test_constant_logits_score_as_argmax_does_not_100_percent():
  labels = jnp.asarray([0, 1, 2, 3, 0])
  top1 = metrics.top_k_correct(jnp.zeros((5, 4)), labels, 1)
  np.testing.assert_array_equal(top1, [1, 0, 0, 0, 1])  # argmax of a constant row is class 0
  np.testing.assert_array_equal(metrics.top_k_correct(jnp.zeros((5, 4)), labels, 2), [1, 1, 0, 0, 1])
  tie = jnp.asarray([[0.0, 2.0, 2.0, 1.0]])  # classes 1 and 2 tie at the top: argmax says 1
  assert float(metrics.top_k_correct(tie, jnp.asarray([1]), 1)[0]) == 1.0
  assert float(metrics.top_k_correct(tie, jnp.asarray([2]), 1)[0]) == 0.0


def test_a_row_with_nan_logits_is_never_right():
  logits = jnp.asarray([[jnp.nan, 0.0, 0.0], [0.0, jnp.nan, 1.0], [0.0, 1.0, 0.0]])
  np.testing.assert_array_equal(metrics.top_k_correct(logits, jnp.asarray([0, 2, 1]), 1), [0, 0, 1])


def test_agreement_counts_argmax_matches_and_never_a_nan_row():
  """argmax of a NaN row is 0: a diverged student must not "agree" wherever the teacher predicts class 0."""
  student = jnp.asarray([[2.0, 1.0, 0.0], [jnp.nan, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  teacher = jnp.asarray([[5.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 2.0], [jnp.nan, 0.0, 0.0]])
  outputs = metrics.classification_outputs(student, jnp.asarray([0, 0, 1, 0]), teacher)
  np.testing.assert_array_equal(outputs['agreement'], [1, 0, 0, 0])


def test_an_accumulator_survives_json_exactly_and_only_into_the_same_metrics():
  """A checkpoint's meta carries the accumulated train metrics: JSON and back gives the same totals and counts in
  their dtypes; a record of other metrics (another phase's terms) is not taken."""
  import json
  collection = metrics.collection(['loss', 'top1'])
  acc = collection.empty()
  for values in ([1.0, 2.0], [0.1, 0.7]):
    outputs = dict(loss=jnp.asarray(values, jnp.float32), top1=jnp.asarray(values, jnp.float32) / 3)
    acc = metrics.accumulate(acc, collection.single_from_model_output(**outputs))
  record = json.loads(json.dumps(metrics.to_json(acc)))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  back = metrics.from_json(collection.empty(), record, sharding)
  for restored, original in zip(jax.tree.leaves(back), jax.tree.leaves(acc)):
    assert restored.dtype == original.dtype
    np.testing.assert_array_equal(restored, original)
  assert metrics.from_json(metrics.collection(['loss', 'top1', 'kd']).empty(), record, sharding) is None
