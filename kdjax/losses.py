"""Distillation losses as pure functions of JAX arrays.

Every function here takes arrays and keyword-only hyper-parameters and returns a float32 scalar. There are no
modules and no state, so a trainer can combine, `jit` and differentiate them freely. A config names them through
the loss terms of `kdjax.objective.TERMS`, which say which model outputs feed each. The one piece of state a method
needs (the memory bank of CRD) is threaded through the pure `update_memory`, which the trainer keeps in its own
state.

Conventions shared by all losses:

* Inputs may arrive in bfloat16 (mixed-precision forward passes); they are cast to float32 first because
  softmaxes at high temperature, Gram matrices and pairwise distances lose most of their signal in 8 bits of
  mantissa. For the same reason their matrix products run at full float32 precision (`_matmul`, `_einsum`): on
  GPUs JAX's default for float32 products is TF32, whose 10-bit mantissa would undo the cast.
* The result is a mean over the batch. Relational losses (SP, RKD, PKT, DIST) are defined on the batch as a whole,
  so their "mean" is the normalisation their paper uses; each docstring says which.
* Gradients are not stopped on the teacher side. The trainer computes teacher outputs outside the differentiated
  function, and some methods (CRD's teacher projection head) do train through the teacher branch.
* Logits are (N, K), labels are integer class indices of shape (N,), feature maps are NHWC (N, H, W, C) or (N, D).
"""

import jax
import jax.numpy as jnp

__all__ = [
    'ShapeError',
    'attention_transfer',
    'crd_nce',
    'cross_entropy',
    'dist',
    'dkd',
    'feature_mse',
    'hinton_kd',
    'kd_divergence',
    'linear_warmup',
    'logit_standardized_kd',
    'pkt',
    'relational_kd',
    'rkd_angle',
    'rkd_distance',
    'similarity_preserving',
    'update_memory',
]

# Stands in for -inf when a logit has to be removed from a softmax: a finite value keeps `0 * log 0` terms and
# their gradients at 0 instead of NaN.
_MASK_VALUE = -1e9


# ---------------------------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------------------------


class ShapeError(ValueError):
  """The inputs' shapes do not fit the loss (e.g. feature maps of different spatial sizes)."""


def _f32(x) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _einsum(spec: str, *operands: jax.Array) -> jax.Array:
  return jnp.einsum(spec, *operands, precision=jax.lax.Precision.HIGHEST)


def _check_same_shape(what: str, student: jax.Array, teacher: jax.Array) -> None:
  if student.shape != teacher.shape:
    raise ShapeError(
        f'{what}: student shape {tuple(student.shape)} does not match teacher shape {tuple(teacher.shape)}; '
        'project one side (e.g. with a learned regressor) so the shapes agree.')


def _check_logits(what: str, student: jax.Array, teacher: jax.Array) -> None:
  if student.ndim != 2:
    raise ShapeError(f'{what}: logits must have shape (N, K), got student shape {tuple(student.shape)}.')
  _check_same_shape(what, student, teacher)


def _check_labels(what: str, logits: jax.Array, labels: jax.Array) -> None:
  if labels.shape != logits.shape[:1]:
    raise ShapeError(
        f'{what}: labels must be class indices of shape ({logits.shape[0]},) to match logits shape '
        f'{tuple(logits.shape)}, got labels shape {tuple(labels.shape)}.')


def _check_same_batch(what: str, student: jax.Array, teacher: jax.Array) -> None:
  if student.ndim < 2 or teacher.ndim < 2 or student.shape[0] != teacher.shape[0]:
    raise ShapeError(
        f'{what}: student shape {tuple(student.shape)} and teacher shape {tuple(teacher.shape)} must both be '
        '(N, ...) with the same batch size N.')


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps), written so that the gradient at x = 0 is 0 rather than NaN.

  Clamping the squared norm (instead of adding eps to the norm) keeps sqrt away from 0, where its derivative is
  infinite; RKD's angle potential relies on this because its difference vectors x_i - x_i are exactly zero.
  """
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _kl_terms(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """Elementwise terms whose sum over the class axis is KL(p || q), given log-probabilities.

  Each term is p (r + expm1(-r)) with r = log p - log q; the terms sum to sum_k p_k r_k because
  sum_k p_k exp(-r_k) = sum_k q_k = 1. Why not the textbook form: at Hinton's high temperatures p and q differ by
  O(1/T), the KL is O(1/T^2), and in float32 the textbook sum is dominated by the rounding error of the two
  log-normalisers (about 1e-7, a common offset added to every r_k). Here each term is p r^2 / 2 + O(r^3), so that
  offset only enters multiplied by r and the T^2-scaled loss stays accurate at T = 1000. Every term is also
  non-negative, so the loss is too.

  Where -r is large, expm1 would overflow; those terms use the algebraically equal p r + q - p instead.
  """
  r = log_p - log_q
  p = jnp.exp(log_p)
  accurate_region = r > -30.0
  r_safe = jnp.where(accurate_region, r, 0.0)
  accurate = p * (r_safe + jnp.expm1(-r_safe))
  fallback = p * r + jnp.exp(log_q) - p
  return jnp.where(accurate_region, accurate, fallback)


def _kl_from_log_probs(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """Per-row KL(p || q) over the last axis; see `_kl_terms` for the float32-accurate form."""
  return jnp.sum(_kl_terms(log_p, log_q), axis=-1)


def _smooth_l1(x: jax.Array) -> jax.Array:
  """Huber loss with delta 1 (the "smooth L1" of RKD): quadratic near 0, linear beyond |x| = 1."""
  ax = jnp.abs(x)
  return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Logit losses.
# ---------------------------------------------------------------------------------------------------------------


def cross_entropy(logits, labels, *, label_smoothing: float = 0.0) -> jax.Array:
  """Softmax cross-entropy with integer labels, optionally label-smoothed.

  The smoothed target is (1 - eps) * onehot + eps / K (Szegedy et al. 2016, "Rethinking the Inception
  Architecture"), i.e. eps of the mass is spread uniformly over all K classes including the true one. Labels
  outside [0, K) are not checked (they may be traced) and give an all-zero one-hot.

  Returns:
    The batch mean, float32 scalar.
  """
  logits = _f32(logits)
  labels = jnp.asarray(labels)
  if logits.ndim != 2:
    raise ShapeError(f'cross_entropy: logits must have shape (N, K), got {tuple(logits.shape)}.')
  _check_labels('cross_entropy', logits, labels)
  num_classes = logits.shape[-1]
  log_p = jax.nn.log_softmax(logits, axis=-1)
  target = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  target = (1.0 - label_smoothing) * target + label_smoothing / num_classes
  return jnp.mean(-jnp.sum(target * log_p, axis=-1))


def kd_divergence(student_logits, teacher_logits, *, temperature: float) -> jax.Array:
  """T^2 * KL(softmax(t / T) || softmax(s / T)), the soft-target term of Hinton et al. 2015.

  "Distilling the Knowledge in a Neural Network": softening both distributions with T exposes the teacher's
  "dark knowledge" about the relative probabilities of wrong classes. The T^2 factor keeps the gradient
  magnitude of this term roughly independent of T (the gradient of the softened KL scales as 1/T^2), so its weight
  against the hard-label loss does not have to be retuned when T changes. For large T the loss tends to
  (1 / 2K) * sum_k (z_s,k - z_t,k)^2 with zero-mean logits z, the logit-matching limit from the paper; the KL is
  evaluated in a form that stays accurate in float32 in that regime (see `_kl_terms`).

  Returns:
    The batch mean, float32 scalar.
  """
  s = _f32(student_logits)
  t = _f32(teacher_logits)
  _check_logits('kd_divergence', s, t)
  log_p_t = jax.nn.log_softmax(t / temperature, axis=-1)
  log_p_s = jax.nn.log_softmax(s / temperature, axis=-1)
  return temperature**2 * jnp.mean(_kl_from_log_probs(log_p_t, log_p_s))


def hinton_kd(
    student_logits,
    teacher_logits,
    labels,
    *,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> jax.Array:
  """(1 - alpha) * CE(labels, student) + alpha * kd_divergence (Hinton et al. 2015).

  The hard-label term anchors the student to the ground truth where the teacher is wrong; alpha trades it against
  the soft targets. Label smoothing applies to the hard-label term only.
  """
  ce = cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
  kd = kd_divergence(student_logits, teacher_logits, temperature=temperature)
  return (1.0 - alpha) * ce + alpha * kd


def dkd(
    student_logits,
    teacher_logits,
    labels,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> jax.Array:
  """Decoupled Knowledge Distillation, alpha * TCKD + beta * NCKD (Zhao et al. 2022).

  "Decoupled Knowledge Distillation" (CVPR 2022) shows that the classical KD loss equals
  TCKD + (1 - p_t^target) * NCKD, so the informative non-target term is suppressed exactly when the teacher is
  confident. Weighting the two parts independently removes that coupling:

  * TCKD: KL between the binary distributions (p_target, 1 - p_target) of teacher and student.
  * NCKD: KL between the distributions over the non-target classes only, obtained by masking the target logit
    with a large negative value before the softmax (so the non-target probabilities are renormalised).

  Both are multiplied by T^2, as in Hinton KD. The paper ramps the whole loss in over the first epochs; that is
  `linear_warmup`, applied by the caller.

  Returns:
    The batch mean, float32 scalar.
  """
  s = _f32(student_logits) / temperature
  t = _f32(teacher_logits) / temperature
  _check_logits('dkd', s, t)
  labels = jnp.asarray(labels)
  _check_labels('dkd', s, labels)
  is_target = jax.nn.one_hot(labels, s.shape[-1], dtype=jnp.bool_)

  def binary_log_probs(z):
    # log p_target and log(1 - p_target), both from log-sum-exps so neither side underflows.
    lse_all = jax.nn.logsumexp(z, axis=-1)
    log_target = jnp.sum(jnp.where(is_target, z, 0.0), axis=-1) - lse_all
    log_rest = jax.nn.logsumexp(jnp.where(is_target, _MASK_VALUE, z), axis=-1) - lse_all
    return jnp.stack([log_target, log_rest], axis=-1)

  tckd = _kl_from_log_probs(binary_log_probs(t), binary_log_probs(s))

  log_p_t_rest = jax.nn.log_softmax(jnp.where(is_target, _MASK_VALUE, t), axis=-1)
  log_p_s_rest = jax.nn.log_softmax(jnp.where(is_target, _MASK_VALUE, s), axis=-1)
  # The masked entry has probability 0 on both sides; drop its term so the big constant cannot leak in.
  nckd = jnp.sum(jnp.where(is_target, 0.0, _kl_terms(log_p_t_rest, log_p_s_rest)), axis=-1)

  return temperature**2 * jnp.mean(alpha * tckd + beta * nckd)


def linear_warmup(progress, duration) -> jax.Array:
  """Loss-weight factor min(progress / duration, 1), in [0, 1].

  DKD (Zhao et al. 2022) ramps its loss in linearly over the first epochs (20 on CIFAR-100): with beta = 8 the
  distillation term is large while the student is still random, and the ramp keeps it from dominating the first
  updates. Both arguments may be traced arrays in one unit of the caller's choosing (kdjax's objective passes
  epochs); `duration <= 0` means no warm-up.
  """
  progress = _f32(progress)
  warmup = _f32(duration)
  factor = jnp.clip(progress / jnp.maximum(warmup, 1e-12), 0.0, 1.0)
  return jnp.where(warmup > 0, factor, 1.0)


def _pearson_rows(a: jax.Array, b: jax.Array) -> jax.Array:
  """Pearson correlation between matching rows of a and b (centre each row, then cosine)."""
  a = l2_normalize(a - jnp.mean(a, axis=-1, keepdims=True))
  b = l2_normalize(b - jnp.mean(b, axis=-1, keepdims=True))
  return jnp.sum(a * b, axis=-1)


def dist(
    student_logits,
    teacher_logits,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> jax.Array:
  """DIST: relation-preserving distillation with Pearson correlation (Huang et al. 2022).

  "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022) argues that exact KL matching is too strict when
  the teacher is much stronger; matching only the *relations* between predictions is enough and easier. With
  probabilities P = softmax(logits / T):

  * inter-class: 1 - mean over examples of the Pearson correlation between the student and teacher rows (each
    example's ranking of the classes),
  * intra-class: 1 - mean over classes of the Pearson correlation between the columns (each class's ranking of
    the examples in the batch),

  loss = T^2 * (beta * inter + gamma * intra). Pearson correlation is invariant to shifting and scaling, which is
  what makes the match "relational". The intra-class term needs N > 1.

  Returns:
    Float32 scalar (already a batch mean by construction).
  """
  s = _f32(student_logits)
  t = _f32(teacher_logits)
  _check_logits('dist', s, t)
  p_s = jax.nn.softmax(s / temperature, axis=-1)
  p_t = jax.nn.softmax(t / temperature, axis=-1)
  inter = 1.0 - jnp.mean(_pearson_rows(p_s, p_t))
  intra = 1.0 - jnp.mean(_pearson_rows(p_s.T, p_t.T))
  return temperature**2 * (beta * inter + gamma * intra)


def logit_standardized_kd(
    student_logits,
    teacher_logits,
    *,
    temperature: float = 2.0,
    eps: float = 1e-7,
) -> jax.Array:
  """KD on z-scored logits (Sun et al. 2024, "Logit Standardization in Knowledge Distillation", CVPR 2024).

  Plain KD with a shared temperature implicitly asks the student to match the teacher's logit *range*, which a
  smaller network may not be able to (or need to) reproduce. Standardising each row, (z - mean(z)) / (std(z) +
  eps), before the temperature softmax makes the loss depend only on the relative ordering and spacing of the
  logits, so it is invariant to shifting and positive scaling of either side. Then T^2 * KL as in Hinton KD.

  The std is the population std (divide by K), as in the paper's formula; the authors' code uses the unbiased one,
  which only rescales z by sqrt(K / (K - 1)) and so is equivalent to a slightly different temperature.

  Returns:
    The batch mean, float32 scalar.
  """
  s = _f32(student_logits)
  t = _f32(teacher_logits)
  _check_logits('logit_standardized_kd', s, t)

  def standardize(z):
    centred = z - jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    # The clamp keeps sqrt'(0) finite for a constant row; it is far below eps so it does not change the value.
    std = jnp.sqrt(jnp.maximum(var, 1e-30))
    return centred / (std + eps)

  log_p_t = jax.nn.log_softmax(standardize(t) / temperature, axis=-1)
  log_p_s = jax.nn.log_softmax(standardize(s) / temperature, axis=-1)
  return temperature**2 * jnp.mean(_kl_from_log_probs(log_p_t, log_p_s))


# ---------------------------------------------------------------------------------------------------------------
# Feature losses.
# ---------------------------------------------------------------------------------------------------------------


def feature_mse(student_features, teacher_features) -> jax.Array:
  """Mean squared error over all elements.

  The hint loss of FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets") and of stage-wise feature
  matching. FitNets maps the student's guided layer through a learned regressor to the teacher's hint shape; that
  regressor is a model component elsewhere, this function is only the loss, so the shapes must already agree.

  Raises:
    ValueError: if the shapes differ (the message names both).
  """
  s = _f32(student_features)
  t = _f32(teacher_features)
  _check_same_shape('feature_mse', s, t)
  return jnp.mean((s - t) ** 2)


def _normalized_gram(features: jax.Array) -> jax.Array:
  f = _flatten(features)
  return l2_normalize(_matmul(f, f.T), axis=-1)


def similarity_preserving(student_features, teacher_features) -> jax.Array:
  """Similarity-preserving KD (Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation", ICCV).

  Inputs that produce similar activations in the teacher should produce similar activations in the student. With
  F flattened to (N, -1), G = F F^T is the batch's activation-similarity matrix; each row is L2-normalised so the
  loss compares patterns of similarity rather than magnitudes (hence positive rescaling of either side does not
  change it). Loss = ||G_s - G_t||_F^2 / N^2. Student and teacher may have different feature sizes; only N must
  match.

  Returns:
    Float32 scalar.
  """
  s = _f32(student_features)
  t = _f32(teacher_features)
  _check_same_batch('similarity_preserving', s, t)
  n = s.shape[0]
  diff = _normalized_gram(s) - _normalized_gram(t)
  return jnp.sum(diff * diff) / (n * n)


def _attention_map(features: jax.Array, p: float) -> jax.Array:
  a = jnp.mean(jnp.abs(features) ** p, axis=-1)  # Collapse channels (NHWC: the last axis).
  return l2_normalize(_flatten(a), axis=-1)


def attention_transfer(student_features, teacher_features, *, p: float = 2) -> jax.Array:
  """Activation-based attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention").

  The spatial attention map of a layer is the channel mean of |F|^p (p = 2 in the paper's experiments); it says
  *where* the network looks and is independent of the number and order of channels, so student and teacher need
  only agree on the spatial size. Each flattened map is L2-normalised per example, which is what makes the
  transfer work across architectures with different activation scales.

  The paper writes the loss as the (unsquared) p-norm of the difference of normalised maps. This uses the form of
  the authors' released code instead: the mean of (a_s - a_t)^2 over batch and positions. The weight to give it is
  the reference code's 1000 per layer (RepDistiller, mdistiller), not the paper's beta/2 = 500.

  Raises:
    ValueError: if the inputs are not (N, ..., C) maps with matching batch and spatial sizes.
  """
  s = _f32(student_features)
  t = _f32(teacher_features)
  if s.ndim < 3 or s.shape[:-1] != t.shape[:-1]:
    raise ShapeError(
        f'attention_transfer: student shape {tuple(s.shape)} and teacher shape {tuple(t.shape)} must be '
        'feature maps (N, H, W, C) with the same N, H and W (channels may differ); resize one side first.')
  diff = _attention_map(s, p) - _attention_map(t, p)
  return jnp.mean(diff * diff)


# ---------------------------------------------------------------------------------------------------------------
# Relational losses on embeddings.
# ---------------------------------------------------------------------------------------------------------------


def _pairwise_distances(x: jax.Array) -> jax.Array:
  """Euclidean distance matrix of the rows of x, with an exact zero diagonal and finite gradients.

  The rows are centred first (distances do not change): |a|^2 + |b|^2 - 2 a.b cancels less when the norms are
  small next to the distances."""
  x = x - jnp.mean(x, axis=0, keepdims=True)
  sq = jnp.sum(x * x, axis=-1)
  d2 = sq[:, None] + sq[None, :] - 2.0 * _matmul(x, x.T)
  d = jnp.sqrt(jnp.maximum(d2, 1e-12))
  return jnp.where(jnp.eye(x.shape[0], dtype=jnp.bool_), 0.0, d)


def _normalized_distances(x: jax.Array) -> jax.Array:
  n = x.shape[0]
  d = _pairwise_distances(x)
  mean_distance = jnp.sum(d) / max(n * (n - 1), 1)
  return d / jnp.maximum(mean_distance, 1e-12)


def rkd_distance(student_emb, teacher_emb) -> jax.Array:
  """Distance-wise RKD (Park et al. 2019, "Relational Knowledge Distillation", CVPR).

  Instead of matching individual outputs, RKD transfers the *structure* of the embedding: the pairwise distances
  within the batch. Each side's distances are divided by that side's mean distance over the N(N - 1) distinct
  pairs, so the student may live at a different scale than the teacher. The mismatch is penalised with the Huber
  (smooth L1, delta 1) loss, which is robust to the occasional badly-placed pair.

  The paper sums over pairs; this takes the mean over all N^2 entries of the distance matrix (the diagonal
  contributes 0), the elementwise mean of the authors' code, so that the paper's weights (25 for distance, 50 for
  angle) keep their meaning and do not have to change with the batch size. Inputs (N, ...) are flattened to
  (N, D).

  Returns:
    Float32 scalar.
  """
  s = _flatten(_f32(student_emb))
  t = _flatten(_f32(teacher_emb))
  _check_same_batch('rkd_distance', s, t)
  return jnp.mean(_smooth_l1(_normalized_distances(s) - _normalized_distances(t)))


def _angle_potential(x: jax.Array) -> jax.Array:
  # e[j, i] = unit vector from x_j to x_i; cos of the angle at vertex x_j between x_i and x_k is <e[j,i], e[j,k]>.
  e = l2_normalize(x[None, :, :] - x[:, None, :], axis=-1)
  return _einsum('jid,jkd->jik', e, e)


def rkd_angle(student_emb, teacher_emb) -> jax.Array:
  """Angle-wise RKD (Park et al. 2019): match cos of the angle formed by every triplet of embeddings.

  Angles are a higher-order relation than distances and are scale-free by nature. For the vertex x_j the cosines
  are the Gram matrix of the normalised difference vectors (x_i - x_j) / ||x_i - x_j||; degenerate triplets
  (i = j or k = j) give a zero vector and a cosine of 0 on both sides. Smooth L1 (delta 1), mean over all N^3
  triplets. Memory is O(N^2 D + N^3), fine for the usual batch sizes of a few hundred.

  Returns:
    Float32 scalar.
  """
  s = _flatten(_f32(student_emb))
  t = _flatten(_f32(teacher_emb))
  _check_same_batch('rkd_angle', s, t)
  return jnp.mean(_smooth_l1(_angle_potential(s) - _angle_potential(t)))


def relational_kd(
    student_emb,
    teacher_emb,
    *,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> jax.Array:
  """distance_weight * rkd_distance + angle_weight * rkd_angle, with the weights of Park et al. 2019."""
  return (distance_weight * rkd_distance(student_emb, teacher_emb) +
          angle_weight * rkd_angle(student_emb, teacher_emb))


def pkt(student_emb, teacher_emb, *, eps: float = 1e-7) -> jax.Array:
  """Probabilistic Knowledge Transfer (Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic
  Knowledge Transfer", ECCV).

  PKT matches the *distribution* of the data in feature space rather than the features themselves, so the two
  spaces may have different dimensions. The kernel is the cosine similarity mapped to [0, 1] by (cos + 1) / 2,
  which, unlike a Gaussian kernel, has no bandwidth to tune. Each row j of the kernel matrix is normalised into
  probabilities p(i | j), and the loss is p log((p + eps) / (q + eps)) (teacher p, student q) averaged over all
  N x N entries.

  This is the authors' code (passalis/probabilistic_kt, also RepDistiller's PKT), not the paper's formula: the
  code keeps the self-similarity on the diagonal and takes the elementwise mean, which is about N times smaller
  than the paper's per-row KL. Following the code keeps published weights meaningful (RepDistiller's beta = 3e4,
  at batch 64); like theirs, the loss's scale goes as 1/N, so a weight tuned at one batch size needs scaling at
  another.

  Invariant to positive rescaling of either embedding (cosines are).

  Returns:
    Float32 scalar.
  """
  s = _flatten(_f32(student_emb))
  t = _flatten(_f32(teacher_emb))
  _check_same_batch('pkt', s, t)

  def conditional_probabilities(x):
    x = l2_normalize(x, axis=-1)
    kernel = (_matmul(x, x.T) + 1.0) / 2.0
    return kernel / jnp.maximum(jnp.sum(kernel, axis=-1, keepdims=True), 1e-12)

  p_t = conditional_probabilities(t)
  p_s = conditional_probabilities(s)
  return jnp.mean(p_t * jnp.log((p_t + eps) / (p_s + eps)))


# ---------------------------------------------------------------------------------------------------------------
# Contrastive representation distillation.
# ---------------------------------------------------------------------------------------------------------------


def _info_nce(anchor: jax.Array, positive: jax.Array, negatives: jax.Array, temperature: float,
              valid: jax.Array | None = None) -> jax.Array:
  """Mean over the batch of -log softmax([a.p, a.n_1, ..., a.n_K] / temperature)[0], counting only the negatives
  where `valid` (N, K) is True (all when None).

  Written as softplus(logsumexp((a.n_k - a.p) / temperature)), which is the same quantity but keeps its relative
  precision when the positive dominates and the loss is tiny (the log-softmax form rounds it to a multiple of 1e-7).
  A row with no valid negative contributes 0.
  """
  pos = jnp.sum(anchor * positive, axis=-1, keepdims=True)  # (N, 1)
  neg = _einsum('nd,nkd->nk', anchor, negatives)  # (N, K)
  return jnp.mean(jax.nn.softplus(jax.nn.logsumexp((neg - pos) / temperature, axis=-1, where=valid)))


def crd_nce(
    student_emb,
    teacher_emb,
    student_rows,
    teacher_rows,
    *,
    valid=None,
    nce_t: float = 0.07,
) -> jax.Array:
  """Contrastive Representation Distillation (Tian et al. 2020, "Contrastive Representation Distillation", ICLR).

  CRD maximises a lower bound on the mutual information between teacher and student representations: the
  student's embedding of an image must pick out the teacher's embedding of the *same* image among the teacher's
  embeddings of K other images, and symmetrically. As in the paper's reference code, both the positive and the
  negatives of an anchor come from the other side's memory bank (momentum-averaged embeddings of past epochs,
  one row per training example): the anchor is the current embedding, its positive the bank's row of the same
  example, its negatives the rows of K other examples. Taking the positive from the bank too matters: with a fresh
  positive and stale negatives, both heads can lower the loss by drifting away from the bank (telling "now" from
  "then" instead of "this image" from "that one"); the loss then climbs back as soon as the learning rate drops.
  The paper estimates the contrast with NCE; this uses its softmax (InfoNCE, van den Oord et al. 2018) form, which
  needs no noise-distribution constant (the NCE one depends on the dataset size):

    L = InfoNCE(student anchor, teacher rows) + InfoNCE(teacher anchor, student rows),

  each averaged over the batch with logits = cosine / nce_t. The two directions are summed (not averaged), so each
  side is contrasted against the other's memory bank with full weight.

  Pure function: the caller gathers the rows from the memory banks (see `update_memory`) and passes them in.

  Args:
    student_emb: (N, D) projected student embeddings of the batch (the anchors contrasted with `teacher_rows`).
    teacher_emb: (N, D) projected teacher embeddings of the batch (the anchors contrasted with `student_rows`).
    student_rows: (N, 1 + K, D) student-bank rows per example: column 0 the example's own row (the teacher
      anchor's positive), columns 1..K rows of K other examples (its negatives).
    teacher_rows: (N, 1 + K, D) the same from the teacher bank, for the student anchors.
    valid: optional (N, K) bool: which negatives count. The caller drops the example's own row and rows of its
      class, as the reference implementation draws negatives from the other classes only.
    nce_t: softmax temperature.

  All inputs are expected to be L2-normalised already; they are normalised again here (a no-op for unit rows) so
  the logits are always cosines divided by nce_t.

  Returns:
    Float32 scalar.
  """
  s = l2_normalize(_f32(student_emb))
  t = l2_normalize(_f32(teacher_emb))
  rows_s = l2_normalize(_f32(student_rows))
  rows_t = l2_normalize(_f32(teacher_rows))
  if s.ndim != 2 or s.shape != t.shape:
    raise ShapeError(
        f'crd_nce: student_emb shape {tuple(s.shape)} and teacher_emb shape {tuple(t.shape)} must both be '
        '(N, D); project both into the same embedding size first.')
  n, d = s.shape
  for name, rows in (('student_rows', rows_s), ('teacher_rows', rows_t)):
    if rows.ndim != 3 or rows.shape[0] != n or rows.shape[1] < 2 or rows.shape[2] != d:
      raise ShapeError(f'crd_nce: {name} must have shape ({n}, 1 + K, {d}) with K >= 1, got {tuple(rows.shape)}.')
  if valid is not None and tuple(valid.shape) != (n, rows_s.shape[1] - 1):
    raise ShapeError(f'crd_nce: valid must have shape ({n}, {rows_s.shape[1] - 1}), got {tuple(valid.shape)}.')
  return (_info_nce(s, rows_t[:, 0], rows_t[:, 1:], nce_t, valid)
          + _info_nce(t, rows_s[:, 0], rows_s[:, 1:], nce_t, valid))


def update_memory(memory, indices, embeddings, *, momentum: float = 0.5) -> jax.Array:
  """Momentum update of a CRD memory bank; returns the new bank (the input is not modified).

  Rows `indices` become normalize(momentum * memory[indices] + (1 - momentum) * embeddings) (Tian et al. 2020,
  following the memory bank of Wu et al. 2018). Renormalising keeps every row on the unit sphere, so bank entries
  stay comparable to fresh embeddings as cosines. All other rows are unchanged. The update is not differentiated
  (the bank is state, not a parameter). With duplicate indices, one of the updates wins (which one is unspecified).

  Args:
    memory: (M, D) bank, one row per training example.
    indices: (N,) integer row indices (dataset indices of the batch).
    embeddings: (N, D) new embeddings for those rows.
    momentum: weight of the old row.

  Returns:
    The updated (M, D) bank, in the dtype of `memory`.
  """
  memory = jnp.asarray(memory)
  new_rows = jax.lax.stop_gradient(_f32(embeddings))
  if new_rows.ndim != 2 or new_rows.shape[1:] != memory.shape[1:]:
    raise ShapeError(
        f'update_memory: embeddings shape {tuple(new_rows.shape)} does not fit memory shape {tuple(memory.shape)}.')
  old_rows = memory[indices].astype(jnp.float32)
  rows = l2_normalize(momentum * old_rows + (1.0 - momentum) * new_rows, axis=-1)
  return memory.at[indices].set(rows.astype(memory.dtype))
