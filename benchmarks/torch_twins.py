"""PyTorch twins of kdjax's torchvision-layout ResNets, for the peer side of a benchmark whose model the peer lacks.

Why: the PyTorch peer (`torch_kd_peer.py`) knows torchvision's resnet18/34 but not kdjax's students, while issue 5
asks for the largest batch of ResNet-34 -> *medium* student on both sides. A twin is built from the keyword
arguments kdjax's model registry holds for the name (`functools.partial(ResNet, block_counts=..., widths=...)`), so
the two cannot drift apart; `tests/test_benchmarks.py` checks that their parameter counts are equal. Only the
basic-block, ImageNet-stem family is covered (resnet18/34, resnet34_medium/small, plain34_smallest): that is what
the 224 px comparisons use. torch is imported here and nowhere in `kdjax/`.
"""
import functools

import torch
from torch import nn

from kdjax.models import MODELS
from kdjax.models.resnet import ResNet

_RESNET_DEFAULTS = dict(block='basic', block_counts=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem='imagenet',
                        stem_width=64, skip=True, dropout=0.0)


class _BasicBlock(nn.Module):
  """torchvision's BasicBlock, with kdjax's `skip=False` (no shortcut) for the plain students."""

  def __init__(self, in_ch: int, width: int, stride: int, skip: bool):
    super().__init__()
    self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.skip = skip
    project = skip and (stride != 1 or in_ch != width)
    self.downsample = (nn.Sequential(nn.Conv2d(in_ch, width, 1, stride, bias=False), nn.BatchNorm2d(width))
                       if project else None)

  def forward(self, x):
    out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
    if self.skip:
      out = out + (x if self.downsample is None else self.downsample(x))
    return torch.relu(out)


def resnet_arch(name: str) -> dict:
  """The architecture keywords kdjax's registry gives `name`, with ResNet's defaults filled in."""
  constructor = MODELS.get(name)
  if not (isinstance(constructor, functools.partial) and constructor.func is ResNet):
    raise ValueError(f'{name!r} is not a registered kdjax ResNet variant')
  arch = {**_RESNET_DEFAULTS, **constructor.keywords}
  if arch['block'] != 'basic' or arch['stem'] != 'imagenet':
    raise ValueError(f'{name!r}: only basic-block ResNets with the ImageNet stem have a torch twin')
  return arch


def resnet_twin(name: str, num_classes: int) -> nn.Module:
  """A torch `nn.Module` with the same layers and parameter count as kdjax's `create_model(name, ...)`."""
  arch = resnet_arch(name)
  layers = [nn.Conv2d(3, arch['stem_width'], 7, 2, 3, bias=False), nn.BatchNorm2d(arch['stem_width']), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1)]
  channels = arch['stem_width']
  for stage, (count, width) in enumerate(zip(arch['block_counts'], arch['widths'])):
    for i in range(count):
      layers.append(_BasicBlock(channels, width, 2 if stage > 0 and i == 0 else 1, arch['skip']))
      channels = width
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
  return nn.Sequential(*layers)
