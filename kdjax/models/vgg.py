"""VGG with BatchNorm (torchvision configs D and E), in the CIFAR form.

Each of the five stages is a run of conv3x3 -> BN -> ReLU units ending in a 2x2 max-pool, and its feature is taken
*after* the pool (H/2, H/4, ..., H/32). The head is global-average-pool + Linear(512, num_classes), the usual VGG
for small (<= 64 px) inputs: torchvision's 4096-4096 classifier needs a 7x7 final map (224 px inputs) and holds
~90% of the parameters. The same head is used at any input size, so torchvision's classifier weights do not map;
its `features` weights do (`stages[i].layers[j].conv/bn`, conv with bias as in torchvision).
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.errors import UserError
from kdjax.models.layers import ClassifierHead, ConvBNReLU, max_pool, run_stages
from kdjax.models.registry import register_model

# Output channels of each conv, grouped by stage (a max-pool closes every group).
VGG_CONFIGS = {
  'D': ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
  'E': ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


class VGGStage(nnx.Module):
  """conv-BN-ReLU units followed by a 2x2/2 max-pool."""

  def __init__(self, in_ch: int, widths: Sequence[int], *, dtype: Any, rngs: nnx.Rngs):
    layers = []
    for width in widths:
      layers.append(ConvBNReLU(in_ch, width, use_bias=True, dtype=dtype, rngs=rngs))
      in_ch = width
    self.layers = nnx.List(layers)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for layer in self.layers:
      x = layer(x, train=train)
    return max_pool(x, 2, 2)


class VGG(nnx.Module):
  """VGG-BN; `config` is a key of `VGG_CONFIGS`. `dropout` (before the Linear) needs the 'dropout' stream if > 0."""

  def __init__(self, *, num_classes: int, image_shape: tuple[int, int, int], rngs: nnx.Rngs,
               dtype: Any = jnp.float32, config: str = 'D', dropout: float = 0.0):
    if config not in VGG_CONFIGS:
      raise UserError(f"unknown VGG config {config!r}; choose one of: {', '.join(VGG_CONFIGS)}")
    min_size = 2 ** len(VGG_CONFIGS[config])
    if min(image_shape[:2]) < min_size:
      raise UserError(f'VGG halves the image {len(VGG_CONFIGS[config])} times, so it needs images of at least '
                      f'{min_size}x{min_size} pixels; got image_shape {tuple(image_shape)}')
    stages = []
    in_ch = image_shape[2]
    for widths in VGG_CONFIGS[config]:
      stages.append(VGGStage(in_ch, widths, dtype=dtype, rngs=rngs))
      in_ch = widths[-1]
    self.stages = nnx.List(stages)
    self.head = ClassifierHead(in_ch, num_classes, pool='avg', dropout=dropout, dtype=dtype, rngs=rngs)
    self._stage_channels = tuple(widths[-1] for widths in VGG_CONFIGS[config])

  @property
  def stage_channels(self) -> tuple[int, ...]:
    return self._stage_channels

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    return run_stages(self.stages, self.head, x, train=train)


register_model('vgg16_bn', functools.partial(VGG, config='D'))
register_model('vgg19_bn', functools.partial(VGG, config='E'))
