"""VGG with BatchNorm in two layouts: torchvision's stage boundaries, and the CIFAR VGGs of the distillation benchmarks.

VGG ("Very Deep Convolutional Networks for Large-Scale Image Recognition", Simonyan & Zisserman, ICLR 2015) is five
stages of conv3x3 -> BN -> ReLU units separated by 2x2 max-pools; `VGG_CONFIGS` holds the widths per stage (A = VGG-11,
B = VGG-13, D = VGG-16, E = VGG-19, plus S = the 8-layer VGG, one conv per stage, that CRD/RepDistiller (Tian et al.,
ICLR 2020) introduced as a CIFAR-100 student). Every variant uses the small-input head: global-average-pool +
Linear(512, num_classes); torchvision's 4096-4096 classifier needs a 7x7 final map (224 px inputs) and holds ~90% of
the parameters, so its classifier weights do not map, but its `features` weights do (`stages[i].layers[j].conv/bn`,
conv with bias as in torchvision). The layouts differ only in where the max-pools sit, i.e. which maps are features:

* 'torchvision' (`vgg16_bn`, `vgg19_bn`): each stage ends with its max-pool and its feature is taken *after* the pool;
  32x32 input -> features at 16, 8, 4, 2, 1.
* 'repdistiller' (`vgg8`, `vgg11`, `vgg13`, the CIFAR-100 KD teachers/students): a stage's feature is its last ReLU
  output *before* pooling, and the pool opens the next stage; the pool before the last stage is skipped when the map
  would fall below 4x4 (RepDistiller applies it only to 64 px inputs), so 32x32 input -> features at 32, 16, 8, 4, 4
  and 64x64 -> 64, 32, 16, 8, 4. This matches RepDistiller's `f0..f4`.
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.errors import UserError
from kdjax.models.layers import ClassifierHead, ConvBNReLU, max_pool, StagedClassifier
from kdjax.models.registry import register_model

# Output channels of each conv, grouped by stage (the layout decides where the max-pools go).
VGG_CONFIGS = {
  'S': ((64,), (128,), (256,), (512,), (512,)),
  'A': ((64,), (128,), (256, 256), (512, 512), (512, 512)),
  'B': ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
  'D': ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
  'E': ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


class VGGStage(nnx.Module):
  """[2x2/2 max-pool ->] conv-BN-ReLU units [-> 2x2/2 max-pool]; the layout decides which pools a stage has."""

  def __init__(self, in_ch: int, widths: Sequence[int], *, pool_before: bool, pool_after: bool, dtype: Any,
               rngs: nnx.Rngs):
    layers = []
    for width in widths:
      layers.append(ConvBNReLU(in_ch, width, use_bias=True, dtype=dtype, rngs=rngs))
      in_ch = width
    self.layers = nnx.List(layers)
    self.pool_before = pool_before
    self.pool_after = pool_after

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.pool_before:
      x = max_pool(x, 2, 2)
    for layer in self.layers:
      x = layer(x, train=train)
    return max_pool(x, 2, 2) if self.pool_after else x


def _torchvision_pools(num_stages: int, size: int) -> list[tuple[bool, bool]]:
  del size
  return [(False, True)] * num_stages


def _repdistiller_pools(num_stages: int, size: int) -> list[tuple[bool, bool]]:
  plan = [(i > 0, False) for i in range(num_stages)]
  if size // 2 ** (num_stages - 2) < 8:  # the map entering the last stage would drop below 4x4: keep it
    plan[-1] = (False, False)
  return plan


# layout name -> (number of stages, smaller input side) -> (pool_before, pool_after) per stage
LAYOUTS = {'torchvision': _torchvision_pools, 'repdistiller': _repdistiller_pools}


class VGG(StagedClassifier):
  """VGG-BN; `config` is a key of `VGG_CONFIGS`, `layout` one of `LAYOUTS` (see the module docstring).

  `dropout` (before the Linear) needs the 'dropout' stream if > 0.
  """

  def __init__(self, *, num_classes: int, image_shape: tuple[int, int, int], rngs: nnx.Rngs,
               dtype: Any = jnp.float32, config: str = 'D', layout: str = 'torchvision', dropout: float = 0.0):
    if config not in VGG_CONFIGS:
      raise UserError(f"unknown VGG config {config!r}; choose one of: {', '.join(VGG_CONFIGS)}")
    if layout not in LAYOUTS:
      raise UserError(f"unknown VGG layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    groups = VGG_CONFIGS[config]
    plan = LAYOUTS[layout](len(groups), min(image_shape[:2]))
    num_pools = sum(before + after for before, after in plan)
    if min(image_shape[:2]) < 2 ** num_pools:
      raise UserError(f'this VGG halves the image {num_pools} times, so it needs images of at least '
                      f'{2 ** num_pools}x{2 ** num_pools} pixels; got image_shape {tuple(image_shape)}')
    stages = []
    in_ch = image_shape[2]
    for widths, (pool_before, pool_after) in zip(groups, plan):
      stages.append(VGGStage(in_ch, widths, pool_before=pool_before, pool_after=pool_after, dtype=dtype, rngs=rngs))
      in_ch = widths[-1]
    self.stages = nnx.List(stages)
    self.head = ClassifierHead(in_ch, num_classes, pool='avg', dropout=dropout, dtype=dtype, rngs=rngs)
    self._stage_channels = tuple(widths[-1] for widths in groups)



register_model('vgg16_bn', functools.partial(VGG, config='D'))
register_model('vgg19_bn', functools.partial(VGG, config='E'))
register_model('vgg8', functools.partial(VGG, config='S', layout='repdistiller'))
register_model('vgg11', functools.partial(VGG, config='A', layout='repdistiller'))
register_model('vgg13', functools.partial(VGG, config='B', layout='repdistiller'))
