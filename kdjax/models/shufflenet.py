"""ShuffleNet V2 (Ma, Zhang, Zheng, Sun; "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design",
ECCV 2018), with a CIFAR stem by default.

Why this shape: the paper's guidelines (equal in/out channels, few groups, little fragmentation, few element-wise
ops) give two units. The basic unit splits the channels in half, leaves one half untouched and sends the other
through 1x1 conv-BN-ReLU -> depthwise 3x3 conv-BN -> 1x1 conv-BN-ReLU, then concatenates and shuffles the channels
(so the untouched half is mixed into the next unit). The downsampling unit has no split: both branches see the whole
input, one as depthwise 3x3/2-BN -> 1x1-BN-ReLU and one as the basic branch with a stride-2 depthwise conv, which
doubles the channels while halving the resolution.

Table 5 of the paper: stem 3x3 conv (24 channels), three stages of 4/8/4 units (the first of each downsamples) with
116/232/464 output channels at 1.0x, a final 1x1 conv to 1024, global pool, Linear. `width` picks the paper's other
multipliers (0.5x: 48/96/192/1024, 1.5x: 176/352/704/1024, 2.0x: 244/488/976/2048). With `stem='imagenet'` the stem
conv has stride 2 and is followed by a 3x3/2 max-pool, as in the paper and torchvision (whose `shufflenet_v2_x1_0`
has the same 2,278,604 parameters for 1000 classes). The default `stem='cifar'` (stride 1, no pool) keeps 32x32
inputs at full resolution, as the CIFAR-100 distillation benchmarks (CRD/RepDistiller, Tian et al. ICLR 2020) do;
RepDistiller's stem conv is 1x1 rather than 3x3, 576 fewer parameters, which we do not copy.

Features, `stages[i]` -> `features[i]` (CIFAR stem, 32x32 input, 1.0x):

* 0: stem conv-BN-ReLU, 32x32x24;
* 1, 2, 3: outputs of the three unit stages (after the last channel shuffle), 16x16x116, 8x8x232, 4x4x464; these are
  RepDistiller's `f1..f3`;
* 4: the final 1x1 conv-BN-ReLU ("conv5"), 4x4x1024; this feeds the head.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.errors import UserError
from kdjax.models.layers import ClassifierHead, batch_norm, conv, max_pool, StagedClassifier
from kdjax.models.registry import register_model

# width multiplier -> output channels of stages 1-3 and of the final 1x1 conv (the paper's Table 5)
WIDTHS = {
  0.5: (48, 96, 192, 1024),
  1.0: (116, 232, 464, 1024),
  1.5: (176, 352, 704, 1024),
  2.0: (244, 488, 976, 2048),
}
REPEATS = (4, 8, 4)  # units per stage, the first one downsampling
STEM_WIDTH = 24

# stem conv stride, whether a 3x3/2 max-pool follows
STEMS = {
  'cifar': dict(stride=1, pool=False),
  'imagenet': dict(stride=2, pool=True),
}


class ConvBN(nnx.Module):
  """conv (no bias) -> BN [-> ReLU]; `depthwise` makes the conv one group per channel."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, depthwise: bool = False,
               relu: bool = True, dtype: Any, rngs: nnx.Rngs):
    self.conv = conv(in_ch, out_ch, kernel, stride=stride, groups=in_ch if depthwise else 1, dtype=dtype, rngs=rngs)
    self.bn = batch_norm(out_ch, dtype=dtype, rngs=rngs)
    self.relu = relu

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = self.bn(self.conv(x), use_running_average=not train)
    return nnx.relu(x) if self.relu else x


def _sequential(layers: nnx.List, x: jax.Array, train: bool) -> jax.Array:
  for layer in layers:
    x = layer(x, train=train)
  return x


def channel_shuffle(x: jax.Array, groups: int = 2) -> jax.Array:
  """Interleaves `groups` equal channel groups of an NHWC tensor (group-major -> channel-major, as in the paper)."""
  *lead, channels = x.shape
  x = x.reshape(*lead, groups, channels // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, channels)


def _branch(in_ch: int, mid: int, stride: int, dtype: Any, rngs: nnx.Rngs) -> nnx.List:
  """1x1 conv-BN-ReLU -> depthwise 3x3 (stride) conv-BN -> 1x1 conv-BN-ReLU: the main branch of both units."""
  return nnx.List([
    ConvBN(in_ch, mid, 1, dtype=dtype, rngs=rngs),
    ConvBN(mid, mid, 3, stride=stride, depthwise=True, relu=False, dtype=dtype, rngs=rngs),
    ConvBN(mid, mid, 1, dtype=dtype, rngs=rngs),
  ])


class ShuffleUnit(nnx.Module):
  """The basic unit: split channels in half, transform one half, concatenate, shuffle. Keeps shape."""

  def __init__(self, channels: int, *, dtype: Any, rngs: nnx.Rngs):
    if channels % 2:
      raise UserError(f'a ShuffleNet V2 unit needs an even number of channels, got {channels}')
    self.branch = _branch(channels // 2, channels // 2, 1, dtype, rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    kept, transformed = jnp.split(x, 2, axis=-1)
    return channel_shuffle(jnp.concatenate([kept, _sequential(self.branch, transformed, train)], axis=-1))


class ShuffleDownUnit(nnx.Module):
  """The stride-2 unit: two branches over the whole input, each giving `out_ch / 2` channels, concatenated, shuffled."""

  def __init__(self, in_ch: int, out_ch: int, *, dtype: Any, rngs: nnx.Rngs):
    mid = out_ch // 2
    self.shortcut_branch = nnx.List([
      ConvBN(in_ch, in_ch, 3, stride=2, depthwise=True, relu=False, dtype=dtype, rngs=rngs),
      ConvBN(in_ch, mid, 1, dtype=dtype, rngs=rngs),
    ])
    self.branch = _branch(in_ch, mid, 2, dtype, rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    left = _sequential(self.shortcut_branch, x, train)
    return channel_shuffle(jnp.concatenate([left, _sequential(self.branch, x, train)], axis=-1))


class ShuffleStage(nnx.Module):
  """One downsampling unit followed by `repeats - 1` basic units."""

  def __init__(self, in_ch: int, out_ch: int, repeats: int, *, dtype: Any, rngs: nnx.Rngs):
    units = [ShuffleDownUnit(in_ch, out_ch, dtype=dtype, rngs=rngs)]
    units += [ShuffleUnit(out_ch, dtype=dtype, rngs=rngs) for _ in range(repeats - 1)]
    self.units = nnx.List(units)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return _sequential(self.units, x, train)


class ShuffleStem(nnx.Module):
  """3x3 conv-BN-ReLU [-> 3x3/2 max-pool]."""

  def __init__(self, in_ch: int, out_ch: int, *, kind: str, dtype: Any, rngs: nnx.Rngs):
    spec = STEMS[kind]
    self.conv = ConvBN(in_ch, out_ch, 3, stride=spec['stride'], dtype=dtype, rngs=rngs)
    self.pool = spec['pool']

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = self.conv(x, train=train)
    return max_pool(x, 3, 2, pad=1) if self.pool else x


class ShuffleNetV2(StagedClassifier):
  """ShuffleNet V2: stem, three unit stages, final 1x1 conv, avg-pool head (see the module docstring).

  Args:
    num_classes, image_shape, rngs, dtype: the model contract (see `kdjax.models`).
    width: channel multiplier, one of `WIDTHS` (0.5, 1.0, 1.5, 2.0).
    stem: 'cifar' (3x3/1 conv) or 'imagenet' (3x3/2 conv + 3x3/2 max-pool).
    dropout: dropout before the final Linear (needs the 'dropout' rng stream when > 0).
  """

  def __init__(self, *, num_classes: int, image_shape: tuple[int, int, int], rngs: nnx.Rngs,
               dtype: Any = jnp.float32, width: float = 1.0, stem: str = 'cifar', dropout: float = 0.0):
    if width not in WIDTHS:
      raise UserError(f"unknown ShuffleNet V2 width {width!r}; choose one of: {', '.join(map(str, WIDTHS))}")
    if stem not in STEMS:
      raise UserError(f"unknown ShuffleNet V2 stem {stem!r}; choose one of: {', '.join(STEMS)}")
    *stage_widths, last = WIDTHS[width]
    stages = [ShuffleStem(image_shape[2], STEM_WIDTH, kind=stem, dtype=dtype, rngs=rngs)]
    in_ch = STEM_WIDTH
    for out_ch, repeats in zip(stage_widths, REPEATS):
      stages.append(ShuffleStage(in_ch, out_ch, repeats, dtype=dtype, rngs=rngs))
      in_ch = out_ch
    stages.append(ConvBN(in_ch, last, 1, dtype=dtype, rngs=rngs))
    self.stages = nnx.List(stages)
    self.head = ClassifierHead(last, num_classes, pool='avg', dropout=dropout, dtype=dtype, rngs=rngs)
    self._stage_channels = (STEM_WIDTH, *stage_widths, last)



register_model('shufflenet_v2', functools.partial(ShuffleNetV2, width=1.0))
