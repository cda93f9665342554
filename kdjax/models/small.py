"""Small students: plain CNNs and an MLP, as used in the classic KD experiments on MNIST/CIFAR.

They have no BatchNorm, so `train` only switches the head's dropout. Their heads use dropout by default (CNNs) and
therefore keep RNG state drawn from the 'dropout' stream of the `rngs` they are built with (falling back to
'default'); that state lives in the module and must be carried through `nnx.split`/`nnx.merge` like BatchNorm stats.
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models.layers import ClassifierHead, conv, linear, max_pool, StagedClassifier
from kdjax.models.registry import register_model


class ConvReLUPool(nnx.Module):
  """conv3x3 (with bias, 'same' size) -> ReLU -> max-pool 2x2/2: one CNN stage."""

  def __init__(self, in_ch: int, out_ch: int, *, dtype: Any, rngs: nnx.Rngs):
    self.conv = conv(in_ch, out_ch, 3, use_bias=True, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    del train  # no train-dependent layers; the argument keeps every stage callable the same way
    return max_pool(nnx.relu(self.conv(x)), 2, 2)


class CNN(StagedClassifier):
  """Conv stages (one per entry of `channels`) + flatten -> Linear(hidden) -> ReLU -> Dropout -> Linear head.

  Each stage halves H and W (floor), so the head's input size depends on `image_shape`; features are NHWC stage
  outputs. `dropout > 0` needs the 'dropout' rng stream (or 'default').
  """

  def __init__(self, *, num_classes: int, image_shape: tuple[int, int, int], rngs: nnx.Rngs,
               dtype: Any = jnp.float32, channels: Sequence[int] = (32, 64), hidden: int = 128, dropout: float = 0.5):
    height, width, in_ch = image_shape
    stages = []
    for out_ch in channels:
      stages.append(ConvReLUPool(in_ch, out_ch, dtype=dtype, rngs=rngs))
      in_ch, height, width = out_ch, height // 2, width // 2
    self.stages = nnx.List(stages)
    self.head = ClassifierHead(height * width * in_ch, num_classes, pool='flatten', hidden=hidden, dropout=dropout,
                               dtype=dtype, rngs=rngs)
    self._stage_channels = tuple(channels)



class DenseReLU(nnx.Module):
  """[flatten ->] Linear -> ReLU: one MLP stage. The first stage flattens the NHWC image."""

  def __init__(self, in_features: int, out_features: int, *, flatten: bool, dtype: Any, rngs: nnx.Rngs):
    self.linear = linear(in_features, out_features, dtype=dtype, rngs=rngs)
    self.flatten = flatten

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    del train
    if self.flatten:
      x = x.reshape(x.shape[0], -1)
    return nnx.relu(self.linear(x))


class MLP(StagedClassifier):
  """`depth` hidden Linear+ReLU stages of width `hidden`, then a Linear head. Features are (N, hidden) vectors."""

  def __init__(self, *, num_classes: int, image_shape: tuple[int, int, int], rngs: nnx.Rngs,
               dtype: Any = jnp.float32, hidden: int = 512, depth: int = 2, dropout: float = 0.0):
    in_features = image_shape[0] * image_shape[1] * image_shape[2]
    stages = []
    for i in range(depth):
      stages.append(DenseReLU(in_features, hidden, flatten=i == 0, dtype=dtype, rngs=rngs))
      in_features = hidden
    self.stages = nnx.List(stages)
    self.head = ClassifierHead(hidden, num_classes, pool='none', dropout=dropout, dtype=dtype, rngs=rngs)
    self._stage_channels = (hidden,) * depth



register_model('cnn2', functools.partial(CNN, channels=(32, 64)))
register_model('cnn3', functools.partial(CNN, channels=(32, 64, 128)))
register_model('mlp2', functools.partial(MLP, depth=2))
