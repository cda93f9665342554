"""ResNets in the torchvision layout, plus thinner/plain students shaped like ResNet-34.

One `ResNet` class covers every variant (block type, depth, width, stem, with or without skips), so a new variant is
one `register_model` line. Stages: `stages[0]` is the stem and `stages[1..4]` are torchvision's `layer1..layer4`, so
a model has five features. Parameter names follow torchvision where it has them (`conv1`, `bn1`, ...,
`downsample_conv`, `downsample_bn`, stem `conv`/`bn`, head `fc`) to keep a state_dict converter a rename table.

Feature sizes for an H x W input (ImageNet stem): stem H/2, layer1 H/4, layer2 H/8, layer3 H/16, layer4 H/32.
The stem's feature is its ReLU output, before torchvision's 3x3/2 max-pool, which opens layer1 here: so the five
features have distinct shapes, and the stem's is the map that stage-wise distillation's reference code hooks
(the post-pool map would repeat layer1's shape). With the CIFAR stem (no pool): H, H, H/2, H/4, H/8.
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.errors import UserError
from kdjax.models.layers import ClassifierHead, batch_norm, conv, max_pool, StagedClassifier
from kdjax.models.registry import register_model


class _Shortcut(nnx.Module):
  """Mixin: the identity/projection path of a residual block.

  The projection (1x1 conv + BN) exists only where the block changes resolution or width, as in torchvision; with
  `skip=False` the block is plain (no shortcut at all), which is what the `plain*` students use.
  """

  def _init_shortcut(self, in_ch: int, out_ch: int, stride: int, skip: bool, dtype: Any, rngs: nnx.Rngs):
    self.skip = skip
    project = skip and (stride != 1 or in_ch != out_ch)
    self.downsample_conv = conv(in_ch, out_ch, 1, stride=stride, dtype=dtype, rngs=rngs) if project else None
    self.downsample_bn = batch_norm(out_ch, dtype=dtype, rngs=rngs) if project else None

  def _add_shortcut(self, x: jax.Array, out: jax.Array, train: bool) -> jax.Array:
    if not self.skip:
      return out
    if self.downsample_conv is not None:
      x = self.downsample_bn(self.downsample_conv(x), use_running_average=not train)
    return out + x


class BasicBlock(_Shortcut):
  """Two 3x3 convs (ResNet-18/34). Output has `width` channels."""

  expansion = 1

  def __init__(self, in_ch: int, width: int, *, stride: int, skip: bool, dtype: Any, rngs: nnx.Rngs):
    self.conv1 = conv(in_ch, width, 3, stride=stride, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(width, dtype=dtype, rngs=rngs)
    self.conv2 = conv(width, width, 3, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(width, dtype=dtype, rngs=rngs)
    self._init_shortcut(in_ch, width, stride, skip, dtype, rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    out = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
    out = self.bn2(self.conv2(out), use_running_average=not train)
    return nnx.relu(self._add_shortcut(x, out, train))


class Bottleneck(_Shortcut):
  """1x1 reduce -> 3x3 -> 1x1 expand (ResNet-50+). Stride sits on the 3x3 conv (torchvision's "v1.5").

  Output has `width * 4` channels.
  """

  expansion = 4

  def __init__(self, in_ch: int, width: int, *, stride: int, skip: bool, dtype: Any, rngs: nnx.Rngs):
    out_ch = width * self.expansion
    self.conv1 = conv(in_ch, width, 1, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(width, dtype=dtype, rngs=rngs)
    self.conv2 = conv(width, width, 3, stride=stride, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(width, dtype=dtype, rngs=rngs)
    self.conv3 = conv(width, out_ch, 1, dtype=dtype, rngs=rngs)
    self.bn3 = batch_norm(out_ch, dtype=dtype, rngs=rngs)
    self._init_shortcut(in_ch, out_ch, stride, skip, dtype, rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    out = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
    out = nnx.relu(self.bn2(self.conv2(out), use_running_average=not train))
    out = self.bn3(self.conv3(out), use_running_average=not train)
    return nnx.relu(self._add_shortcut(x, out, train))


BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}

# kernel, stride, whether a 3x3/2 max-pool follows (applied at the start of layer1). 'cifar' keeps full resolution
# for 32x32 inputs.
STEMS = {
  'imagenet': dict(kernel=7, stride=2, pool=True),
  'cifar': dict(kernel=3, stride=1, pool=False),
}


class Stem(nnx.Module):
  """conv -> BN -> ReLU; stage 0 of a ResNet (the ImageNet stem's max-pool opens layer1, see the module doc)."""

  def __init__(self, in_ch: int, out_ch: int, *, kind: str, dtype: Any, rngs: nnx.Rngs):
    spec = STEMS[kind]
    self.conv = conv(in_ch, out_ch, spec['kernel'], stride=spec['stride'], dtype=dtype, rngs=rngs)
    self.bn = batch_norm(out_ch, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return nnx.relu(self.bn(self.conv(x), use_running_average=not train))


class ResNetStage(nnx.Module):
  """A run of blocks; only the first one may change stride/width (torchvision's `layerN`). `pool_input`: the
  ImageNet stem's 3x3/2 max-pool, applied first (layer1 only)."""

  def __init__(self, block_cls: type, in_ch: int, width: int, count: int, *, stride: int, skip: bool, dtype: Any,
               rngs: nnx.Rngs, pool_input: bool = False):
    blocks = []
    for i in range(count):
      blocks.append(block_cls(in_ch, width, stride=stride if i == 0 else 1, skip=skip, dtype=dtype, rngs=rngs))
      in_ch = width * block_cls.expansion
    self.blocks = nnx.List(blocks)
    self.pool_input = pool_input

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.pool_input:
      x = max_pool(x, 3, 2, pad=1)
    for block in self.blocks:
      x = block(x, train=train)
    return x


class ResNet(StagedClassifier):
  """Generic ResNet: stem + one stage per entry of `block_counts` + global-average-pool head.

  Args:
    num_classes, image_shape, rngs, dtype: the model contract (see `kdjax.models`).
    block: 'basic' or 'bottleneck'.
    block_counts: blocks per stage (torchvision has 4 stages, the CIFAR ResNets in `resnet_cifar` 3); the first
      stage keeps the resolution, every later one halves it.
    widths: base width per stage; a stage outputs `width * expansion` channels.
    stem: 'imagenet' (7x7/2 conv + max-pool) or 'cifar' (3x3/1 conv, no pool).
    stem_width: stem channels; defaults to 64 like torchvision.
    skip: False removes every shortcut (a "plain" net, for the plain students).
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
    block_counts: Sequence[int] = (2, 2, 2, 2),
    widths: Sequence[int] = (64, 128, 256, 512),
    stem: str = 'imagenet',
    stem_width: int = 64,
    skip: bool = True,
    dropout: float = 0.0,
  ):
    if block not in BLOCKS:
      raise UserError(f"unknown ResNet block {block!r}; choose one of: {', '.join(BLOCKS)}")
    if stem not in STEMS:
      raise UserError(f"unknown ResNet stem {stem!r}; choose one of: {', '.join(STEMS)}")
    if len(block_counts) != len(widths):
      raise UserError(f'block_counts {tuple(block_counts)} and widths {tuple(widths)} must have the same length')
    block_cls = BLOCKS[block]
    stages = [Stem(image_shape[2], stem_width, kind=stem, dtype=dtype, rngs=rngs)]
    channels = [stem_width]
    for i, (count, width) in enumerate(zip(block_counts, widths)):
      stages.append(ResNetStage(block_cls, channels[-1], width, count, stride=1 if i == 0 else 2, skip=skip,
                                dtype=dtype, rngs=rngs, pool_input=i == 0 and STEMS[stem]['pool']))
      channels.append(width * block_cls.expansion)
    self.stages = nnx.List(stages)
    self.head = ClassifierHead(channels[-1], num_classes, pool='avg', dropout=dropout, dtype=dtype, rngs=rngs)
    self._stage_channels = tuple(channels)



_R18 = dict(block_counts=(2, 2, 2, 2))
_R34 = dict(block_counts=(3, 4, 6, 3))

register_model('resnet18', functools.partial(ResNet, **_R18))
register_model('resnet34', functools.partial(ResNet, **_R34))
register_model('resnet18_cifar', functools.partial(ResNet, **_R18, stem='cifar'))
register_model('resnet34_cifar', functools.partial(ResNet, **_R34, stem='cifar'))
register_model('resnet50', functools.partial(ResNet, block='bottleneck', block_counts=(3, 4, 6, 3)))

# Students for stage-wise distillation from resnet34: same five stage boundaries and spatial sizes (H/2, H/4, H/8,
# H/16, H/32 with the ImageNet stem), so each student feature lines up with a teacher feature through a 1x1 adapter.
#   resnet34_medium: 3/4 width, blocks [2,2,3,2], 64-channel stem like the teacher (stem feature needs no adapter);
#     about 1/3 of resnet34's parameters.
register_model('resnet34_medium', functools.partial(ResNet, block_counts=(2, 2, 3, 2), widths=(48, 96, 192, 384)))
#   resnet34_small: half width everywhere (stem included), one block per stage; about 6% of the parameters.
register_model('resnet34_small', functools.partial(ResNet, block_counts=(1, 1, 1, 1), widths=(32, 64, 128, 256),
                                                   stem_width=32))
#   plain34_smallest: resnet34's exact feature shapes (channels 64/64/128/256/512 too, so features can be compared
#     without adapters) but one plain block per stage and no shortcuts at all.
register_model('plain34_smallest', functools.partial(ResNet, block_counts=(1, 1, 1, 1), skip=False))
