"""Tests for kdjax.losses.

Expected values come from closed forms worked out by hand or from plain-numpy reference implementations written
here independently of the code under test (loops over pairs and triplets, float64), never from the functions being
tested.
"""

import functools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
from jax.extend.core import jaxprs_in_params
import numpy as np
import pytest

from kdjax import losses

RNG = np.random.default_rng(0)


class _Jitted:
  """`L.name(*arrays, **hparams)` calls `losses.name` under `jax.jit`, compiled once per (name, hparams).

  Why: in eager mode every primitive is compiled separately the first time it sees a shape, which makes a single
  RKD call cost over a second of CPU; one XLA compile per function keeps the whole file fast on a shared CPU. The
  hyper-parameters are closed over (static), exactly as a trainer would use them.
  """

  def __init__(self):
    self._cache = {}

  def __getattr__(self, name):
    fn = getattr(losses, name)

    def call(*args, **hparams):
      key = (name, tuple(sorted(hparams.items())))
      if key not in self._cache:
        self._cache[key] = jax.jit(functools.partial(fn, **hparams))
      return self._cache[key](*args)

    return call


L = _Jitted()


def _normal(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_kl(p, q):
  return float(np.sum(p * (np.log(p) - np.log(q))))


# ---------------------------------------------------------------------------------------------------------------
# Cross-entropy.
# ---------------------------------------------------------------------------------------------------------------


def test_cross_entropy_uniform_logits_is_log_k():
  logits = np.zeros((4, 7), np.float32)
  labels = np.array([0, 3, 6, 2])
  np.testing.assert_allclose(L.cross_entropy(logits, labels), math.log(7), rtol=1e-6)


def test_cross_entropy_hand_case_and_label_smoothing_closed_form():
  # p = [1/4, 1/2, 1/4], label 1: CE = log 2.
  logits = np.log(np.array([[1.0, 2.0, 1.0]], np.float32))
  labels = np.array([1])
  np.testing.assert_allclose(L.cross_entropy(logits, labels), math.log(2), rtol=1e-6)
  # eps = 0.3, K = 3: target = [0.1, 0.8, 0.1] -> 0.8 log 2 + 0.2 * 2 log 2 = 1.2 log 2.
  np.testing.assert_allclose(
      L.cross_entropy(logits, labels, label_smoothing=0.3), 1.2 * math.log(2), rtol=1e-6)


def test_cross_entropy_label_smoothing_general_formula():
  logits = _normal(5, 6, seed=1)
  labels = np.array([0, 1, 2, 3, 5])
  eps = 0.1
  log_p = _np_log_softmax(logits)
  nll = -log_p[np.arange(5), labels]
  uniform = -log_p.mean(axis=-1)
  expected = np.mean((1 - eps) * nll + eps * uniform)
  np.testing.assert_allclose(L.cross_entropy(logits, labels, label_smoothing=eps), expected, rtol=1e-5)


def test_cross_entropy_accepts_bf16_and_returns_f32_scalar():
  out = losses.cross_entropy(  # Eager on purpose: everything else in this file runs under jit.
      jnp.asarray(_normal(3, 4), jnp.bfloat16), np.array([0, 1, 2]))
  assert out.shape == () and out.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------------------------
# Hinton KD.
# ---------------------------------------------------------------------------------------------------------------


def test_kd_divergence_hand_case():
  # Teacher p = [1/2, 1/2], student q = [1/4, 3/4]: KL = 1/2 log 2 + 1/2 log(2/3) = 1/2 log(4/3).
  teacher = np.log(np.array([[0.5, 0.5]], np.float32))
  student = np.log(np.array([[0.25, 0.75]], np.float32))
  np.testing.assert_allclose(L.kd_divergence(student, teacher, temperature=1.0), 0.5 * math.log(4 / 3),
                             rtol=1e-5)
  # Same distributions after dividing logits by T = 2, times T^2 = 4.
  np.testing.assert_allclose(L.kd_divergence(2 * student, 2 * teacher, temperature=2.0),
                             2.0 * math.log(4 / 3), rtol=1e-5)


def test_kd_divergence_matches_numpy_reference():
  s, t, temp = _normal(6, 5, seed=2), _normal(6, 5, seed=3), 3.0
  log_q, log_p = _np_log_softmax(s / temp), _np_log_softmax(t / temp)
  expected = temp**2 * np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1))
  np.testing.assert_allclose(L.kd_divergence(s, t, temperature=temp), expected, rtol=1e-5)


def test_kd_divergence_survives_extreme_logits():
  # Teacher puts ~e^-200 on a class the student is certain of: no overflow, no NaN, matches float64.
  s = np.array([[200.0, 0.0, 0.0]], np.float32)
  t = np.array([[0.0, 200.0, 0.0]], np.float32)
  log_q, log_p = _np_log_softmax(s), _np_log_softmax(t)
  expected = np.sum(np.exp(log_p) * (log_p - log_q))
  np.testing.assert_allclose(L.kd_divergence(s, t, temperature=1.0), expected, rtol=1e-5)


def test_hinton_kd_alpha_zero_is_cross_entropy():
  s, t, y = _normal(4, 5, seed=4), _normal(4, 5, seed=5), np.array([0, 1, 2, 4])
  got = L.hinton_kd(s, t, y, alpha=0.0, temperature=4.0, label_smoothing=0.1)
  assert float(got) == float(L.cross_entropy(s, y, label_smoothing=0.1))


def test_hinton_kd_alpha_one_is_scaled_kl():
  s, t, y = _normal(4, 5, seed=6), _normal(4, 5, seed=7), np.array([0, 1, 2, 4])
  temp = 4.0
  log_q, log_p = _np_log_softmax(s / temp), _np_log_softmax(t / temp)
  expected = temp**2 * np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1))
  np.testing.assert_allclose(L.hinton_kd(s, t, y, alpha=1.0, temperature=temp), expected, rtol=1e-5)


def test_hinton_kd_mixes_terms_linearly():
  s, t, y = _normal(4, 5, seed=8), _normal(4, 5, seed=9), np.array([3, 1, 2, 4])
  ce = L.cross_entropy(s, y)
  kd = L.kd_divergence(s, t, temperature=2.0)
  np.testing.assert_allclose(L.hinton_kd(s, t, y, alpha=0.3, temperature=2.0), 0.7 * ce + 0.3 * kd,
                             rtol=1e-6)


def test_kd_high_temperature_limit_is_logit_matching():
  # Hinton et al. 2015, Sec. 2.1: T^2 KL -> (1 / 2K) sum_k (z_s,k - z_t,k)^2 for zero-mean logits.
  k = 10
  s, t = _normal(8, k, seed=10), _normal(8, k, seed=11)
  zs, zt = s - s.mean(-1, keepdims=True), t - t.mean(-1, keepdims=True)
  expected = np.mean(np.sum((zs - zt) ** 2, axis=-1) / (2 * k))
  np.testing.assert_allclose(L.kd_divergence(s, t, temperature=1000.0), expected, rtol=1e-2)


# ---------------------------------------------------------------------------------------------------------------
# DKD.
# ---------------------------------------------------------------------------------------------------------------

# Label 0. Teacher p = [1/2, 1/4, 1/4], student q = [1/4, 1/4, 1/2].
_DKD_TEACHER = np.log(np.array([[0.5, 0.25, 0.25]], np.float32))
_DKD_STUDENT = np.log(np.array([[0.25, 0.25, 0.5]], np.float32))
_DKD_LABELS = np.array([0])


def test_dkd_tckd_hand_case():
  # Binary target/non-target: teacher [1/2, 1/2], student [1/4, 3/4] -> KL = 1/2 log(4/3).
  got = L.dkd(_DKD_STUDENT, _DKD_TEACHER, _DKD_LABELS, alpha=1.0, beta=0.0, temperature=1.0)
  np.testing.assert_allclose(got, 0.5 * math.log(4 / 3), rtol=1e-5)


def test_dkd_nckd_hand_case():
  # Target masked, renormalised: teacher [1/2, 1/2], student [1/3, 2/3]
  # -> KL = 1/2 log(3/2) + 1/2 log(3/4) = 1/2 log(9/8).
  got = L.dkd(_DKD_STUDENT, _DKD_TEACHER, _DKD_LABELS, alpha=0.0, beta=1.0, temperature=1.0)
  np.testing.assert_allclose(got, 0.5 * math.log(9 / 8), rtol=1e-5)


def test_dkd_default_weights_and_temperature_scaling():
  expected = 16.0 * (1.0 * 0.5 * math.log(4 / 3) + 8.0 * 0.5 * math.log(9 / 8))
  got = L.dkd(4 * _DKD_STUDENT, 4 * _DKD_TEACHER, _DKD_LABELS)  # alpha=1, beta=8, T=4.
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_dkd_matches_numpy_reference_on_a_batch():
  s, t = _normal(6, 5, seed=12) * 3, _normal(6, 5, seed=13) * 3
  y = np.array([0, 4, 2, 2, 1, 3])
  temp, alpha, beta = 2.0, 0.7, 3.0
  total = 0.0
  for i in range(6):
    p = np.exp(_np_log_softmax(t[i] / temp))
    q = np.exp(_np_log_softmax(s[i] / temp))
    tckd = _np_kl(np.array([p[y[i]], 1 - p[y[i]]]), np.array([q[y[i]], 1 - q[y[i]]]))
    rest = np.arange(5) != y[i]
    nckd = _np_kl(p[rest] / p[rest].sum(), q[rest] / q[rest].sum())
    total += temp**2 * (alpha * tckd + beta * nckd)
  got = L.dkd(s, t, y, alpha=alpha, beta=beta, temperature=temp)
  np.testing.assert_allclose(got, total / 6, rtol=1e-4)


def test_linear_warmup():
  assert float(L.linear_warmup(0, 20)) == 0.0
  assert float(L.linear_warmup(5, 20)) == 0.25
  assert float(L.linear_warmup(20, 20)) == 1.0
  assert float(L.linear_warmup(100, 20)) == 1.0
  assert float(L.linear_warmup(3, 0)) == 1.0
  assert float(jax.jit(losses.linear_warmup)(jnp.asarray(10), 20)) == 0.5


# ---------------------------------------------------------------------------------------------------------------
# DIST and logit standardisation.
# ---------------------------------------------------------------------------------------------------------------


def _np_pearson(a, b):
  a = a - a.mean()
  b = b - b.mean()
  return float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))


def test_dist_matches_numpy_reference():
  s, t = _normal(5, 4, seed=14), _normal(5, 4, seed=15)
  temp, beta, gamma = 2.0, 1.5, 0.5
  p_s = np.exp(_np_log_softmax(s / temp))
  p_t = np.exp(_np_log_softmax(t / temp))
  inter = 1 - np.mean([_np_pearson(p_s[i], p_t[i]) for i in range(5)])
  intra = 1 - np.mean([_np_pearson(p_s[:, c], p_t[:, c]) for c in range(4)])
  expected = temp**2 * (beta * inter + gamma * intra)
  np.testing.assert_allclose(L.dist(s, t, beta=beta, gamma=gamma, temperature=temp), expected, rtol=1e-5)


def test_dist_perfectly_anticorrelated_hand_case():
  # Two examples, two classes, T = 1: student rows are the teacher rows swapped, so every row and every column is
  # perfectly anti-correlated: inter = intra = 1 - (-1) = 2.
  t = np.log(np.array([[0.8, 0.2], [0.3, 0.7]], np.float32))
  s = t[:, ::-1].copy()
  np.testing.assert_allclose(L.dist(s, t), 4.0, rtol=1e-5)


def test_lskd_matches_numpy_reference():
  s, t = _normal(4, 6, seed=16) * 5 + 2, _normal(4, 6, seed=17)
  temp = 2.0

  def z(x):
    x = np.asarray(x, np.float64)
    c = x - x.mean(-1, keepdims=True)
    return c / (np.sqrt((c**2).mean(-1, keepdims=True)) + 1e-7)

  log_q, log_p = _np_log_softmax(z(s) / temp), _np_log_softmax(z(t) / temp)
  expected = temp**2 * np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1))
  np.testing.assert_allclose(L.logit_standardized_kd(s, t, temperature=temp), expected, rtol=1e-5)


def test_lskd_hand_standardisation():
  # [1, 2, 3] standardises to [-sqrt(3/2), 0, sqrt(3/2)] (population std sqrt(2/3)); so does [10, 20, 30].
  # Against the teacher [3, 2, 1] (the reverse), T = 1: KL(rev(q) || q) with q = softmax(z).
  a = math.sqrt(1.5)
  q = np.exp([-a, 0.0, a])
  q /= q.sum()
  expected = _np_kl(q[::-1], q)
  got = L.logit_standardized_kd(np.array([[10.0, 20.0, 30.0]]), np.array([[3.0, 2.0, 1.0]]), temperature=1.0)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@hypothesis.settings(max_examples=20, deadline=None, database=None)
@hypothesis.given(shift=st.floats(-50, 50), scale=st.floats(0.05, 20))
def test_lskd_invariant_to_student_shift_and_scale(shift, scale):
  s, t = _normal(4, 6, seed=18), _normal(4, 6, seed=19)
  base = L.logit_standardized_kd(s, t)
  moved = L.logit_standardized_kd(s * scale + shift, t)
  np.testing.assert_allclose(moved, base, rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Feature losses.
# ---------------------------------------------------------------------------------------------------------------


def test_feature_mse_hand_case():
  s = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
  t = np.array([[1.0, 0.0], [0.0, 4.0]], np.float32)
  np.testing.assert_allclose(L.feature_mse(s, t), (0 + 4 + 9 + 0) / 4, rtol=1e-6)


def test_feature_mse_shape_mismatch_names_both_shapes():
  with pytest.raises(ValueError) as info:
    losses.feature_mse(np.zeros((2, 4, 4, 8)), np.zeros((2, 4, 4, 16)))
  assert '(2, 4, 4, 8)' in str(info.value) and '(2, 4, 4, 16)' in str(info.value)


def test_similarity_preserving_hand_case():
  # G_s = I. G_t = all-ones -> rows [1, 1] / sqrt(2). ||diff||^2 = 2 (1 - 1/sqrt2)^2 + 2 (1/2) = 4 - 2 sqrt2; / 4.
  s = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  t = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
  np.testing.assert_allclose(L.similarity_preserving(s, t), 1 - math.sqrt(2) / 2, rtol=1e-6)


def test_similarity_preserving_matches_numpy_reference_on_maps():
  s, t = _normal(5, 3, 3, 4, seed=20), _normal(5, 2, 2, 7, seed=21)

  def g(f):
    f = f.reshape(5, -1).astype(np.float64)
    gram = f @ f.T
    return gram / np.linalg.norm(gram, axis=1, keepdims=True)

  expected = np.sum((g(s) - g(t)) ** 2) / 25
  np.testing.assert_allclose(L.similarity_preserving(s, t), expected, rtol=1e-5)


def test_attention_transfer_hand_cases():
  # p = 1: student map [1, 0]; teacher map [3, 4] / 5. Mean of [0.4, -0.8]^2 = 0.4.
  s = np.array([[[[1.0], [0.0]]]], np.float32)  # (1, 1, 2, 1)
  t = np.array([[[[3.0], [4.0]]]], np.float32)
  np.testing.assert_allclose(L.attention_transfer(s, t, p=1), 0.4, rtol=1e-6)
  # p = 2 with two student channels: student map mean([1, 1]^2) = 1 at position 0, 0 at 1 -> [1, 0];
  # teacher [9, 16] / sqrt(337).
  s2 = np.array([[[[1.0, -1.0], [0.0, 0.0]]]], np.float32)
  a_t = np.array([9.0, 16.0]) / math.sqrt(337)
  expected = np.mean((np.array([1.0, 0.0]) - a_t) ** 2)
  np.testing.assert_allclose(L.attention_transfer(s2, t), expected, rtol=1e-6)


def test_attention_transfer_rejects_spatial_mismatch():
  with pytest.raises(ValueError, match=r'\(2, 4, 4, 3\).*\(2, 8, 8, 3\)'):
    losses.attention_transfer(np.zeros((2, 4, 4, 3)), np.zeros((2, 8, 8, 3)))


def test_attention_transfer_invariant_to_channel_permutation():
  s, t = _normal(3, 4, 4, 6, seed=22), _normal(3, 4, 4, 10, seed=23)
  perm = RNG.permutation(6)
  np.testing.assert_allclose(L.attention_transfer(s[..., perm], t), L.attention_transfer(s, t),
                             rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# RKD and PKT.
# ---------------------------------------------------------------------------------------------------------------


def _np_huber(x):
  ax = np.abs(x)
  return np.where(ax < 1, 0.5 * x * x, ax - 0.5)


def _np_rkd_distance(s, t):
  def normalised(x):
    n = len(x)
    d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
    return d / (d.sum() / (n * (n - 1)))

  return np.mean(_np_huber(normalised(s) - normalised(t)))


def _np_rkd_angle(s, t):
  def cosines(x):
    n = len(x)
    out = np.zeros((n, n, n))
    for j in range(n):  # Vertex.
      for i in range(n):
        for k in range(n):
          if i == j or k == j:
            continue
          u, v = x[i] - x[j], x[k] - x[j]
          out[j, i, k] = np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))
    return out

  return np.mean(_np_huber(cosines(s) - cosines(t)))


def test_rkd_distance_hand_case():
  # Student: right isosceles triangle, distances 1, 1, sqrt2, mean (2 + sqrt2) / 3.
  # Teacher: points 0, 1, 2 on a line, distances 1, 2, 1, mean 4/3.
  s = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
  t = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], np.float32)
  m_s, m_t = (2 + math.sqrt(2)) / 3, 4 / 3
  # Pairs (0,1), (0,2), (1,2); each appears twice in the 3x3 matrix; all differences are < 1.
  diffs = [1 / m_s - 1 / m_t, 1 / m_s - 2 / m_t, math.sqrt(2) / m_s - 1 / m_t]
  expected = 2 * sum(0.5 * d * d for d in diffs) / 9
  np.testing.assert_allclose(L.rkd_distance(s, t), expected, rtol=1e-5)


def test_rkd_matches_numpy_reference():
  s, t = _normal(5, 4, seed=24), _normal(5, 2, 3, seed=25) * 10  # Teacher (N, 2, 3) is flattened.
  t_flat = t.reshape(5, -1).astype(np.float64)
  np.testing.assert_allclose(L.rkd_distance(s, t), _np_rkd_distance(s.astype(np.float64), t_flat), rtol=1e-4)
  np.testing.assert_allclose(L.rkd_angle(s, t), _np_rkd_angle(s.astype(np.float64), t_flat), rtol=1e-4)
  np.testing.assert_allclose(
      L.relational_kd(s, t),
      25 * L.rkd_distance(s, t) + 50 * L.rkd_angle(s, t), rtol=1e-6)


def test_rkd_angle_hand_case():
  # Equilateral triangle (all angles 60 deg, cos 1/2) vs a right isosceles triangle (angles 90, 45, 45).
  s = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]], np.float32)
  t = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
  # For each vertex there are 2 ordered (i, k) pairs with i != k; the i == k entries are cos 0 = 1 on both sides.
  # Teacher cosines per vertex: vertex 0 (right angle) 0, vertices 1 and 2 cos 45 = 1/sqrt2.
  d_right = 0.5 - 0.0
  d_45 = 0.5 - 1 / math.sqrt(2)
  expected = (2 * 0.5 * d_right**2 + 4 * 0.5 * d_45**2) / 27
  np.testing.assert_allclose(L.rkd_angle(s, t), expected, rtol=1e-5)


def _np_pkt(s, t, eps=1e-7):
  """The authors' code (passalis/probabilistic_kt `cosine_similarity_loss`), in NumPy."""
  def cond(x):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    k = (x @ x.T + 1) / 2
    return k / k.sum(axis=1, keepdims=True)

  p, q = cond(t), cond(s)
  return np.mean(p * np.log((p + eps) / (q + eps)))


def test_pkt_hand_case():
  # Student: three orthogonal unit vectors -> kernel rows [1, 1/2, 1/2] -> [1/2, 1/4, 1/4] (and permutations).
  # Teacher: e1, e1, e2 -> kernel rows [1, 1, 1/2] (twice) -> [0.4, 0.4, 0.2], and [1/2, 1/2, 1] -> [1/4, 1/4, 1/2].
  s = np.eye(3, dtype=np.float32)
  t = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
  # Row 0 against the student's [1/2, 1/4, 1/4]; row 1 is its mirror image; row 2 equals the student's row 2.
  row0 = 0.4 * math.log(0.4 / 0.5) + 0.4 * math.log(0.4 / 0.25) + 0.2 * math.log(0.2 / 0.25)
  np.testing.assert_allclose(L.pkt(s, t), 2 * row0 / 9, rtol=1e-4)  # the mean of all 9 entries


def test_pkt_is_the_elementwise_mean_so_it_goes_as_one_over_the_batch():
  """The batch repeated 4 times leaves every row's KL unchanged (each probability is split over 4 copies) and
  spreads it over 4x the entries per row: the authors' elementwise mean gives a quarter of the loss (a per-row KL
  would give the same loss)."""
  s, t = _normal(8, 5, seed=28), _normal(8, 9, seed=29)
  small, big = float(L.pkt(s, t)), float(L.pkt(np.tile(s, (4, 1)), np.tile(t, (4, 1))))
  np.testing.assert_allclose(big, small / 4, rtol=1e-3)


def test_pkt_matches_numpy_reference():
  s, t = _normal(6, 5, seed=26), _normal(6, 9, seed=27)
  np.testing.assert_allclose(L.pkt(s, t), _np_pkt(s.astype(np.float64), t.astype(np.float64)), rtol=1e-5)


_SCALE_INVARIANT = tuple(
    jax.jit(fn) for fn in (losses.similarity_preserving, losses.rkd_distance, losses.rkd_angle, losses.pkt))


@hypothesis.settings(max_examples=15, deadline=None, database=None)
@hypothesis.given(scale=st.floats(0.01, 100.0))
def test_relational_losses_invariant_to_positive_scaling(scale):
  s, t = _normal(6, 8, seed=28), _normal(6, 5, seed=29)
  for fn in _SCALE_INVARIANT:
    np.testing.assert_allclose(fn(s * scale, t), fn(s, t), rtol=1e-4, atol=1e-6, err_msg=fn.__name__)
    np.testing.assert_allclose(fn(s, t * scale), fn(s, t), rtol=1e-4, atol=1e-6, err_msg=fn.__name__)


def test_rkd_distance_invariant_to_translation():
  """Distances do not see where the batch sits: embeddings far from the origin (norms 1000x their spread) give the
  same loss. Without centring, |a|^2 + |b|^2 - 2 a.b cancels 1e6-sized terms in float32 and the loss is noise."""
  s, t = _normal(8, 16, seed=30), _normal(8, 16, seed=31)
  np.testing.assert_allclose(L.rkd_distance(s + 1000.0, t - 1000.0), L.rkd_distance(s, t), rtol=1e-3)


def _dot_precisions(fn, *args) -> list:
  """The precision of every dot_general in `fn`'s jaxpr, nested jaxprs included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        found.append(eqn.params['precision'])
      for sub in jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize('fn', [losses.similarity_preserving, losses.rkd_distance, losses.rkd_angle, losses.pkt,
                                losses.relational_kd], ids=lambda fn: fn.__name__)
def test_relational_products_run_at_full_float32_precision(fn):
  """On GPUs JAX's default float32 product is TF32 (10-bit mantissa); the relational losses ask for HIGHEST."""
  s, t = _normal(6, 8, seed=32), _normal(6, 8, seed=33)
  precisions = _dot_precisions(fn, s, t)
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  assert precisions and all(p == highest for p in precisions), precisions


def test_crd_products_run_at_full_float32_precision():
  anchor = _unit(_normal(4, 8, seed=34))
  rows = np.stack([_unit(_normal(5, 8, seed=35 + i)) for i in range(4)])
  precisions = _dot_precisions(functools.partial(L.crd_nce, nce_t=0.07), anchor, anchor, rows, rows)
  assert precisions and all(p == (jax.lax.Precision.HIGHEST,) * 2 for p in precisions), precisions


# ---------------------------------------------------------------------------------------------------------------
# CRD.
# ---------------------------------------------------------------------------------------------------------------


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_crd_hand_case():
  # One anchor per side; its bank rows: the positive (column 0) equal to it, one orthogonal negative. Each
  # direction is -log(e^{1/tau} / (e^{1/tau} + 1)) = log(1 + e^{-1/tau}).
  s = np.array([[1.0, 0.0]], np.float32)
  t = np.array([[1.0, 0.0]], np.float32)
  rows = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
  np.testing.assert_allclose(L.crd_nce(s, t, rows, rows, nce_t=1.0), 2 * math.log1p(math.exp(-1.0)), rtol=1e-6)
  np.testing.assert_allclose(L.crd_nce(s, t, rows, rows), 2 * math.log1p(math.exp(-1 / 0.07)), rtol=1e-4)


def test_crd_matches_numpy_reference_with_masked_negatives():
  n, k, d, tau = 4, 6, 8, 0.1
  s, t = _unit(_normal(n, d, seed=30)), _unit(_normal(n, d, seed=31))
  rows_s, rows_t = _unit(_normal(n, 1 + k, d, seed=32)), _unit(_normal(n, 1 + k, d, seed=33))
  valid = np.random.default_rng(0).random((n, k)) < 0.6
  valid[0] = False  # a row with no valid negative contributes 0

  def nce(anchor, rows):
    total = 0.0
    for i in range(n):
      candidates = np.concatenate([rows[i, :1], rows[i, 1:][valid[i]]])
      total += -_np_log_softmax(candidates @ anchor[i] / tau)[0]
    return total / n

  expected = nce(s, rows_t) + nce(t, rows_s)
  np.testing.assert_allclose(losses.crd_nce(s, t, rows_s, rows_t, valid=valid, nce_t=tau), expected, rtol=1e-5)
  np.testing.assert_allclose(losses.crd_nce(s, t, rows_s, rows_t, valid=np.ones((n, k), bool), nce_t=tau),
                             L.crd_nce(s, t, rows_s, rows_t, nce_t=tau), rtol=1e-6)


def test_crd_lower_when_anchors_align_with_their_bank_rows():
  n, k, d = 8, 16, 12
  rows_s, rows_t = _unit(_normal(n, 1 + k, d, seed=35)), _unit(_normal(n, 1 + k, d, seed=36))
  t = rows_s[:, 0]
  aligned = L.crd_nce(_unit(rows_t[:, 0] + 0.05 * _normal(n, d, seed=37)), t, rows_s, rows_t)
  random = L.crd_nce(_unit(_normal(n, d, seed=38)), t, rows_s, rows_t)
  assert float(aligned) < float(random)


def test_crd_cannot_be_lowered_by_drifting_away_from_the_banks():
  """Anchors that both move away from everything in the banks (the same new direction for student and teacher)
  score chance, log(1 + K) per direction: the positive is a bank row, so agreeing with each other now is not
  rewarded. With the positive taken from the other side's current embedding, this drift would score ~0."""
  n, k, d, tau = 3, 2, 8, 0.07
  eye = np.eye(d, dtype=np.float32)
  rows = np.stack([eye[[i, (i + 1) % n, (i + 2) % n]] for i in range(n)])  # own row e_i, negatives: the others
  aligned = L.crd_nce(eye[:n], eye[:n], rows, rows, nce_t=tau)
  drifted = eye[n:2 * n]  # orthogonal to every bank row
  np.testing.assert_allclose(aligned, 2 * math.log1p(k * math.exp(-1 / tau)), rtol=1e-4)
  np.testing.assert_allclose(L.crd_nce(drifted, drifted, rows, rows, nce_t=tau), 2 * math.log(1 + k), rtol=1e-6)


def test_update_memory_keeps_unit_rows_and_touches_only_indices():
  memory = jnp.asarray(_unit(_normal(10, 4, seed=39)))
  idx = np.array([2, 7, 5])
  emb = _unit(_normal(3, 4, seed=40))
  new = L.update_memory(memory, idx, emb, momentum=0.5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(new), axis=1), 1.0, rtol=1e-6)
  untouched = np.setdiff1d(np.arange(10), idx)
  np.testing.assert_array_equal(np.asarray(new)[untouched], np.asarray(memory)[untouched])
  expected = _unit(0.5 * np.asarray(memory)[idx] + 0.5 * emb)
  np.testing.assert_allclose(np.asarray(new)[idx], expected, rtol=1e-6)
  assert new.dtype == memory.dtype


# ---------------------------------------------------------------------------------------------------------------
# Properties shared by all losses.
# ---------------------------------------------------------------------------------------------------------------

_LOGITS = _normal(6, 5, seed=41)
_LABELS = np.array([0, 1, 2, 3, 4, 0])
_MAPS = _normal(6, 4, 4, 3, seed=42)
_EMB = _normal(6, 8, seed=43)

# name -> (loss of the student input x, a teacher-side input to compare against).
_ZERO_WHEN_EQUAL = {
    'kd': (lambda x, t: losses.kd_divergence(x, t, temperature=4.0), _LOGITS),
    'dkd': (lambda x, t: losses.dkd(x, t, _LABELS), _LOGITS),
    'dist': (lambda x, t: losses.dist(x, t, temperature=4.0), _LOGITS),
    'lskd': (lambda x, t: losses.logit_standardized_kd(x, t), _LOGITS),
    'feature_mse': (losses.feature_mse, _MAPS),
    'sp': (losses.similarity_preserving, _MAPS),
    'at': (losses.attention_transfer, _MAPS),
    'rkd': (losses.relational_kd, _EMB),
    'pkt': (losses.pkt, _EMB),
}


@pytest.mark.parametrize('name', sorted(_ZERO_WHEN_EQUAL))
def test_zero_when_student_equals_teacher(name):
  fn, x = _ZERO_WHEN_EQUAL[name]
  np.testing.assert_allclose(jax.jit(fn)(x, x), 0.0, atol=1e-5)


def _grad_cases():
  other_logits, other_maps, other_emb = _normal(6, 5, seed=44), _normal(6, 4, 4, 7, seed=45), _normal(6, 3, seed=46)
  rows = _unit(_normal(6, 5, 8, seed=47))
  return {
      'ce': (lambda x: losses.cross_entropy(x, _LABELS, label_smoothing=0.1), _LOGITS),
      'kd': (lambda x: losses.kd_divergence(x, other_logits, temperature=4.0), _LOGITS),
      'hinton_kd': (lambda x: losses.hinton_kd(x, other_logits, _LABELS, alpha=0.5, temperature=4.0), _LOGITS),
      'dkd': (lambda x: losses.dkd(x, other_logits, _LABELS), _LOGITS),
      'dist': (lambda x: losses.dist(x, other_logits), _LOGITS),
      'lskd': (lambda x: losses.logit_standardized_kd(x, other_logits), _LOGITS),
      'feature_mse': (lambda x: losses.feature_mse(x, _MAPS[::-1]), _MAPS),
      'sp': (lambda x: losses.similarity_preserving(x, other_maps), _MAPS),
      'at': (lambda x: losses.attention_transfer(x, other_maps), _MAPS),
      'rkd': (lambda x: losses.relational_kd(x, other_emb), _EMB),
      'pkt': (lambda x: losses.pkt(x, other_emb), _EMB),
      'crd': (lambda x: losses.crd_nce(x, _unit(_EMB[::-1]), rows, rows), _unit(_EMB)),
  }


_GRAD_CASES = _grad_cases()


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('name', sorted(_GRAD_CASES))
def test_gradients_finite(name, dtype):
  fn, x = _GRAD_CASES[name]
  x = jnp.asarray(x, dtype)
  value, grad = jax.jit(jax.value_and_grad(fn))(x)
  assert value.dtype == jnp.float32 and value.shape == ()
  assert grad.dtype == dtype
  assert np.all(np.isfinite(np.asarray(grad, np.float32))), name
  assert np.any(np.asarray(grad, np.float32) != 0), name


def test_gradients_finite_at_degenerate_inputs():
  # Duplicate embeddings (zero distances, zero difference vectors), constant logit rows (zero std) and all-zero
  # feature maps are where naive sqrt / normalise implementations produce NaN gradients.
  emb = np.repeat(_EMB[:3], 2, axis=0)
  const = np.ones((4, 5), np.float32)
  zeros = np.zeros((2, 3, 3, 4), np.float32)
  checks = [
      jax.jit(jax.grad(lambda x: losses.relational_kd(x, _EMB)))(emb),
      jax.jit(jax.grad(lambda x: losses.pkt(x, _EMB)))(emb),
      jax.jit(jax.grad(lambda x: losses.logit_standardized_kd(x, _LOGITS[:4])))(const),
      jax.jit(jax.grad(lambda x: losses.attention_transfer(x, _MAPS[:2, :3, :3])))(zeros),
      jax.jit(jax.grad(lambda x: losses.similarity_preserving(x, _MAPS[:2])))(zeros),
  ]
  for g in checks:
    assert np.all(np.isfinite(np.asarray(g)))
