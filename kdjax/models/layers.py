"""Building blocks shared by the architectures.

The helpers fix the conventions every model must follow (float32 parameters, compute in `dtype`, PyTorch-compatible
BatchNorm momentum and padding) in one place, so the architecture files cannot drift apart on them.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.errors import UserError

PARAM_DTYPE = jnp.float32

# He init scaled by fan-out, as torchvision initialises its conv nets; keeps ReLU-stack activations at unit scale.
CONV_INIT = jax.nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(
  in_ch: int,
  out_ch: int,
  kernel: int,
  *,
  stride: int = 1,
  use_bias: bool = False,
  groups: int = 1,
  dtype: Any,
  rngs: nnx.Rngs,
) -> nnx.Conv:
  """A square conv with PyTorch's symmetric `kernel // 2` padding.

  Explicit padding instead of 'SAME' matters for strided convs: 'SAME' pads (0, 1) on even inputs where PyTorch pads
  (1, 1), which would shift every feature map of a model loaded from torchvision weights. `groups` splits the channels
  like PyTorch's `groups` (`groups == in_ch == out_ch` is a depthwise conv, as in ShuffleNet/MobileNet).
  """
  pad = kernel // 2
  return nnx.Conv(
    in_ch,
    out_ch,
    kernel_size=(kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=use_bias,
    feature_group_count=groups,
    kernel_init=CONV_INIT,
    dtype=dtype,
    param_dtype=PARAM_DTYPE,
    rngs=rngs,
  )


def batch_norm(num_features: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm matching PyTorch's defaults (its momentum 0.1 is Flax's 0.9, eps 1e-5), so converted statistics behave
  alike. One difference stays: the running variance is updated with the batch's biased variance, PyTorch's with the
  unbiased one, a factor n/(n-1) for n = batch x height x width values per channel (0.9995 at batch 64 on 4x4 maps)."""
  return nnx.BatchNorm(
    num_features, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=PARAM_DTYPE, rngs=rngs
  )


def linear(in_features: int, out_features: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=PARAM_DTYPE, rngs=rngs)


def max_pool(x: jax.Array, window: int, stride: int, pad: int = 0) -> jax.Array:
  """Max pooling over H, W of an NHWC batch (padding counts as -inf, like PyTorch)."""
  return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class ConvBNReLU(nnx.Module):
  """conv -> BatchNorm -> ReLU; the unit of the VGG and plain stages."""

  def __init__(self, in_ch: int, out_ch: int, *, kernel: int = 3, stride: int = 1, use_bias: bool = False,
               dtype: Any, rngs: nnx.Rngs):
    self.conv = conv(in_ch, out_ch, kernel, stride=stride, use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.bn = batch_norm(out_ch, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return nnx.relu(self.bn(self.conv(x), use_running_average=not train))


def _global_avg_pool(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=(1, 2))  # jnp.mean accumulates bf16 in float32, so no precision loss here


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


# How the head turns the last feature into a vector; 'none' is for models whose features already are vectors (MLPs).
POOLS: dict[str, Callable[[jax.Array], jax.Array]] = {
  'avg': _global_avg_pool,
  'flatten': _flatten,
  'none': lambda x: x,
}


class ClassifierHead(nnx.Module):
  """pool -> [Linear(hidden) -> ReLU] -> [Dropout] -> Linear(num_classes), with float32 logits.

  The last Linear computes in float32 whatever the run's dtype: logits rounded to bfloat16 (8 bits of mantissa)
  tie in top-1/top-5 and blur the small logit differences distillation losses compare; the layer costs little.

  All models share this class so the trainer can treat `model.head` uniformly (freeze it, swap it for a new number
  of classes). `in_features` is the vector size after pooling (for 'flatten', H * W * C of the last feature).
  Dropout, when `dropout > 0`, draws from the 'dropout' stream of `rngs` (or 'default' when there is none) and keeps
  that RNG state in the module; it is only active when called with `train=True`.
  """

  def __init__(self, in_features: int, num_classes: int, *, pool: str = 'avg', hidden: int | None = None,
               dropout: float = 0.0, dtype: Any, rngs: nnx.Rngs):
    if pool not in POOLS:
      raise UserError(f"unknown head pooling {pool!r}; choose one of: {', '.join(POOLS)}")
    if in_features < 1:
      raise UserError('the input image is too small for this model: its last feature map is empty; use a larger '
                      'image_shape or a model with fewer downsampling stages')
    if not 0.0 <= dropout < 1.0:
      raise UserError(f'dropout must be in [0, 1), got {dropout!r}')
    self.pool = pool
    self.hidden = linear(in_features, hidden, dtype=dtype, rngs=rngs) if hidden else None
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    self.fc = linear(hidden or in_features, num_classes, dtype=jnp.float32, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = POOLS[self.pool](x)
    if self.hidden is not None:
      x = nnx.relu(self.hidden(x))
    if self.dropout is not None:
      x = self.dropout(x, deterministic=not train)
    return self.fc(x.astype(jnp.float32))


def run_stages(stages: nnx.List, head: nnx.Module, x: jax.Array, *, train
               ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """The shared forward pass of every model: each stage's output is a feature, the last one feeds the head.

  `train` is one bool, or one per stage and then the head's: a phase that freezes part of the model can run that
  part in inference mode (running BatchNorm statistics, no dropout) while the rest trains.
  """
  modes = (train,) * (len(stages) + 1) if isinstance(train, bool) else tuple(train)
  if len(modes) != len(stages) + 1:
    raise ValueError(f'train has {len(modes)} modes for {len(stages)} stages and a head')
  features = []
  for stage, mode in zip(stages, modes):
    x = stage(x, train=mode)
    features.append(x)
  return head(x, train=modes[-1]), tuple(features)


class StagedClassifier(nnx.Module):
  """The base of every model: `self.stages` (stage i outputs feature i), then `self.head` on the last feature.

  Subclasses build `stages`, `head` and `_stage_channels` (the channel count of each feature) in `__init__`; the
  forward pass and the `(logits, features)` contract live here once.
  """

  @property
  def stage_channels(self) -> tuple[int, ...]:
    return self._stage_channels

  def __call__(self, x: jax.Array, *, train) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """`train`: a bool, or one per stage and then the head's (see `run_stages`)."""
    return run_stages(self.stages, self.head, x, train=train)
