"""The CIFAR ResNets of He et al. 2016, in the form used by the CIFAR-100 distillation benchmarks.

"Deep Residual Learning for Image Recognition" (He, Zhang, Ren, Sun; CVPR 2016, Sec. 4.2) defines a family for 32x32
inputs: a 3x3 conv with 16 channels, then three stages of n BasicBlocks with 16, 32 and 64 channels (the last two
halve the resolution), global average pooling and one Linear layer; depth = 6n + 2. The distillation benchmarks of
CRD (Tian et al., ICLR 2020, "Contrastive Representation Distillation", code "RepDistiller") and of DKD/mdistiller
(Zhao et al., CVPR 2022) use this family as teachers and students, with two changes that we follow so that their
published tables are the reference:

* shortcuts that change shape are 1x1 conv + BN projections ("option B"), not the zero-padded identity ("option A")
  of the paper; this adds ~0.01M parameters;
* the "x4" variants (`resnet8x4`, `resnet32x4`) have a 32-channel stem and stages of 64/128/256 channels.

They are the generic `ResNet` of `kdjax.models.resnet` with the 'cifar' stem (3x3/1 conv, no max-pool) and three
stages, so they share its parameter names and blocks. Features (32x32 input), `stages[i]` -> `features[i]`:

* 0: stem conv-BN-ReLU, 32x32 x stem width;
* 1: stage 1 (after the final ReLU of its last block, like RepDistiller's non-preact `f1`), 32x32;
* 2: stage 2, 16x16;
* 3: stage 3, 8x8; this feeds the head (global average pool + Linear).

Published sizes for 10 classes with option A (He et al., Table 6): resnet20 0.27M, resnet32 0.46M, resnet44 0.66M,
resnet56 0.85M, resnet110 1.7M; with option B and 100 classes they are ~0.01M larger (resnet56 0.86M).
"""

import functools

from kdjax.models.registry import register_model
from kdjax.models.resnet import ResNet

_BASE_WIDTHS = dict(stem_width=16, widths=(16, 32, 64))
_X4_WIDTHS = dict(stem_width=32, widths=(64, 128, 256))


def _blocks_per_stage(depth: int) -> int:
  """n for a depth 6n + 2 BasicBlock ResNet (two convs per block, plus the stem conv and the classifier)."""
  if (depth - 2) % 6:
    raise ValueError(f'a CIFAR BasicBlock ResNet has depth 6n + 2, got {depth}')
  return (depth - 2) // 6


def _register(name: str, depth: int, widths: dict) -> None:
  n = _blocks_per_stage(depth)
  register_model(name, functools.partial(ResNet, block='basic', block_counts=(n, n, n), stem='cifar', **widths))


for _depth in (8, 14, 20, 32, 44, 56, 110):
  _register(f'resnet{_depth}', _depth, _BASE_WIDTHS)
_register('resnet8x4', 8, _X4_WIDTHS)
_register('resnet32x4', 32, _X4_WIDTHS)
