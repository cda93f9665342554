"""Pre-activation CIFAR ResNets: Wide ResNets (WRN-d-k) and the bottleneck ResNet-164.

Both follow "Identity Mappings in Deep Residual Networks" (He, Zhang, Ren, Sun; ECCV 2016): each residual unit is
BN -> ReLU -> conv (-> BN -> ReLU -> conv ...), added to an untouched shortcut, so that the signal can travel from
any unit to any later one through identities only. Three details of that paper are followed here:

* the network starts with a stand-alone 3x3 conv of 16 channels (no BN/ReLU of its own); the first unit's
  pre-activation plays that role;
* when a unit changes the resolution or width, its 1x1 projection shortcut reads the *pre-activated* input (BN-ReLU
  before the split), as in their Appendix and in the WRN code; otherwise the shortcut is the raw input;
* the last unit is followed by an extra BN -> ReLU before global average pooling.

Wide ResNets ("Wide Residual Networks", Zagoruyko & Komodakis, BMVC 2016) use basic units (two 3x3 convs) with
widths 16k/32k/64k and n = (depth - 4) / 6 units per stage; `wrn_40_2` (a teacher), `wrn_16_2` and `wrn_40_1`
(students) are those of the CRD/RepDistiller CIFAR-100 tables (Tian et al., ICLR 2020). The paper's in-block
dropout is not implemented (those benchmarks train without it). ResNet-164 uses bottleneck units (1x1 reduce, 3x3 with
the stride, 1x1 expand x4) with base widths 16/32/64, i.e. outputs 64/128/256, and 18 units per stage
(depth = 9n + 2).

Features (32x32 input), `stages[i]` -> `features[i]`:

* 0: the stem conv output (no BN/ReLU), 32x32x16;
* 1, 2: outputs of stages 1 and 2 *before* activation (the residual sums; the next unit normalises them), at 32x32
  and 16x16; these are RepDistiller's `f1`, `f2` for WRNs;
* 3: stage 3 followed by the final BN -> ReLU, 8x8 (RepDistiller's `f3` passed through `bn1`/ReLU); this feeds the
  head. The raw stage-3 sum is not exposed, because every parameter (the final BN included) must sit in a stage.

Published sizes (10 classes): WRN-40-1 0.6M, WRN-40-2 2.2M, WRN-28-10 36.5M (Zagoruyko & Komodakis, Table 4);
pre-act ResNet-164 1.7M (He et al. 2016b, Table 3).
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.errors import UserError
from kdjax.models.layers import ClassifierHead, batch_norm, conv, StagedClassifier
from kdjax.models.registry import register_model


class PreActBasicBlock(nnx.Module):
  """BN-ReLU-conv3x3 (stride) -> BN-ReLU-conv3x3, plus the shortcut. Outputs `width` channels."""

  expansion = 1

  def __init__(self, in_ch: int, width: int, *, stride: int, dtype: Any, rngs: nnx.Rngs):
    self.bn1 = batch_norm(in_ch, dtype=dtype, rngs=rngs)
    self.conv1 = conv(in_ch, width, 3, stride=stride, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(width, dtype=dtype, rngs=rngs)
    self.conv2 = conv(width, width, 3, dtype=dtype, rngs=rngs)
    self.shortcut_conv = _projection(in_ch, width, stride, dtype, rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    act = nnx.relu(self.bn1(x, use_running_average=not train))
    out = self.conv1(act)
    out = self.conv2(nnx.relu(self.bn2(out, use_running_average=not train)))
    return out + _shortcut(self.shortcut_conv, x, act)


class PreActBottleneck(nnx.Module):
  """BN-ReLU-conv1x1 -> BN-ReLU-conv3x3 (stride) -> BN-ReLU-conv1x1, plus the shortcut. Outputs `width * 4`."""

  expansion = 4

  def __init__(self, in_ch: int, width: int, *, stride: int, dtype: Any, rngs: nnx.Rngs):
    out_ch = width * self.expansion
    self.bn1 = batch_norm(in_ch, dtype=dtype, rngs=rngs)
    self.conv1 = conv(in_ch, width, 1, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(width, dtype=dtype, rngs=rngs)
    self.conv2 = conv(width, width, 3, stride=stride, dtype=dtype, rngs=rngs)
    self.bn3 = batch_norm(width, dtype=dtype, rngs=rngs)
    self.conv3 = conv(width, out_ch, 1, dtype=dtype, rngs=rngs)
    self.shortcut_conv = _projection(in_ch, out_ch, stride, dtype, rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    act = nnx.relu(self.bn1(x, use_running_average=not train))
    out = self.conv1(act)
    out = self.conv2(nnx.relu(self.bn2(out, use_running_average=not train)))
    out = self.conv3(nnx.relu(self.bn3(out, use_running_average=not train)))
    return out + _shortcut(self.shortcut_conv, x, act)


def _projection(in_ch: int, out_ch: int, stride: int, dtype: Any, rngs: nnx.Rngs) -> nnx.Conv | None:
  """A 1x1 conv (no BN: the sum is normalised by the next unit) where the unit changes shape, else None."""
  if stride == 1 and in_ch == out_ch:
    return None
  return conv(in_ch, out_ch, 1, stride=stride, dtype=dtype, rngs=rngs)


def _shortcut(projection: nnx.Conv | None, x: jax.Array, act: jax.Array) -> jax.Array:
  return x if projection is None else projection(act)


BLOCKS = {'basic': PreActBasicBlock, 'bottleneck': PreActBottleneck}


class StemConv(nnx.Module):
  """The stand-alone first 3x3 conv; its BN-ReLU is the first unit's pre-activation."""

  def __init__(self, in_ch: int, out_ch: int, *, dtype: Any, rngs: nnx.Rngs):
    self.conv = conv(in_ch, out_ch, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    del train  # no train-dependent layer; the argument keeps every stage callable the same way
    return self.conv(x)


class PreActStage(nnx.Module):
  """A run of pre-activation units (only the first may change stride/width), optionally closed by BN -> ReLU."""

  def __init__(self, block_cls: type, in_ch: int, width: int, count: int, *, stride: int, final_activation: bool,
               dtype: Any, rngs: nnx.Rngs):
    blocks = []
    for i in range(count):
      blocks.append(block_cls(in_ch, width, stride=stride if i == 0 else 1, dtype=dtype, rngs=rngs))
      in_ch = width * block_cls.expansion
    self.blocks = nnx.List(blocks)
    self.final_bn = batch_norm(in_ch, dtype=dtype, rngs=rngs) if final_activation else None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for block in self.blocks:
      x = block(x, train=train)
    if self.final_bn is not None:
      x = nnx.relu(self.final_bn(x, use_running_average=not train))
    return x


class PreActResNet(StagedClassifier):
  """Stem conv + pre-activation stages (the first keeps the resolution, each later one halves it) + avg-pool head.

  Args:
    num_classes, image_shape, rngs, dtype: the model contract (see `kdjax.models`).
    block: 'basic' (WRN) or 'bottleneck' (ResNet-164).
    block_counts: units per stage.
    widths: base width per stage; a stage outputs `width * expansion` channels.
    stem_width: channels of the first conv (16 in both papers).
    dropout: dropout before the final Linear (needs the 'dropout' rng stream when > 0).
  """

  def __init__(
    self,
    *,
    num_classes: int,
    image_shape: tuple[int, int, int],
    rngs: nnx.Rngs,
    dtype: Any = jnp.float32,
    block: str = 'basic',
    block_counts: Sequence[int] = (6, 6, 6),
    widths: Sequence[int] = (32, 64, 128),
    stem_width: int = 16,
    dropout: float = 0.0,
  ):
    if block not in BLOCKS:
      raise UserError(f"unknown pre-activation block {block!r}; choose one of: {', '.join(BLOCKS)}")
    if len(block_counts) != len(widths) or not widths:
      raise UserError(f'block_counts {tuple(block_counts)} and widths {tuple(widths)} must be non-empty and have the '
                      'same length')
    block_cls = BLOCKS[block]
    stages = [StemConv(image_shape[2], stem_width, dtype=dtype, rngs=rngs)]
    channels = [stem_width]
    for i, (count, width) in enumerate(zip(block_counts, widths)):
      stages.append(PreActStage(block_cls, channels[-1], width, count, stride=1 if i == 0 else 2,
                                final_activation=i == len(widths) - 1, dtype=dtype, rngs=rngs))
      channels.append(width * block_cls.expansion)
    self.stages = nnx.List(stages)
    self.head = ClassifierHead(channels[-1], num_classes, pool='avg', dropout=dropout, dtype=dtype, rngs=rngs)
    self._stage_channels = tuple(channels)



def _wide_resnet(depth: int, widen_factor: int):
  """WRN-depth-k with n = (depth - 4) / 6 basic units per stage, the depth convention of the WRN paper and code."""
  if (depth - 4) % 6:
    raise ValueError(f'a Wide ResNet has depth 6n + 4, got {depth}')
  n = (depth - 4) // 6
  return functools.partial(PreActResNet, block='basic', block_counts=(n, n, n),
                           widths=(16 * widen_factor, 32 * widen_factor, 64 * widen_factor), stem_width=16)


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
  register_model(f'wrn_{_depth}_{_k}', _wide_resnet(_depth, _k))

# ResNet-164: depth = 9n + 2 with 3 convs per bottleneck unit, n = 18.
register_model('resnet164', functools.partial(PreActResNet, block='bottleneck', block_counts=(18, 18, 18),
                                              widths=(16, 32, 64), stem_width=16))
