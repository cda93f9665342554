"""A run's datasets, loaded once from any source and placed on the devices, with what the models need to know."""
import dataclasses
import os

import numpy as np
from absl import logging

from kdjax.data import loader, sources
from kdjax.errors import UserError


@dataclasses.dataclass
class RunData:
  train: loader.ResidentDataset
  eval: loader.ResidentDataset
  heldout: loader.ResidentDataset | None
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]   # what the model sees: (H, W, C)
  mean: tuple[float, ...]             # per channel, of the training split in [0, 1]
  std: tuple[float, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std in [0, 1], from at most 10,000 images (enough for 3 digits; cheap on the host)."""
  sample = images[:: max(1, len(images) // 10_000)].astype(np.float64) / 255.0
  mean = sample.mean(axis=(0, 1, 2))
  std = np.maximum(sample.std(axis=(0, 1, 2)), 1e-3)
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def same_channels(*splits):
  """The splits (None ones passed through) with the channel count of the most colourful one.

  Each split decodes to C=1 when none of its files has colour, so a grayscale training split may meet an RGB test
  image or the other way round. A C=1 split among C=3 ones repeats its channel, as torchvision's
  `convert('RGB')` does, so one model input shape fits every split.
  """
  channels = max(s.images.shape[-1] for s in splits if s is not None)
  return tuple(with_channels(s, channels) for s in splits)


def with_channels(split, channels: int):
  """`split` with `channels` channels where it has one (its channel repeated); any other split as it is."""
  if split is None or split.images.shape[-1] != 1 or channels == 1:
    return split
  return dataclasses.replace(split, images=np.repeat(split.images, channels, axis=-1))


def load(data_cfg, mesh) -> RunData:
  kwargs = dict(image_size=data_cfg.image_size or None, cache_dir=data_cfg.cache_dir or None,
                data_dir=data_cfg.data_dir or None, on_corrupt=data_cfg.on_corrupt)
  dataset = os.path.expanduser(data_cfg.dataset)
  train = sources.load_split(dataset, data_cfg.train_split, **kwargs)
  evaluation = sources.load_split(dataset, data_cfg.eval_split, **kwargs)
  heldout = sources.load_split(dataset, data_cfg.heldout_split, **kwargs) if data_cfg.heldout_split else None
  train, evaluation, heldout = same_channels(train, evaluation, heldout)
  height, width = train.images.shape[1:3]
  if height != width:
    raise UserError(f'the images of {data_cfg.dataset} are {width}x{height}, not square; set data.image_size=N to '
                    'resize them to NxN')
  for name, split in (('eval', evaluation), ('held-out', heldout)):
    if split is not None and split.images.shape[1:3] != (height, width):
      logging.warning('the %s split of %s holds %dx%d images, the training split %dx%d: evaluation resizes them to'
                      ' the training size (set data.image_size to decode every split at one size)', name,
                      data_cfg.dataset, split.images.shape[2], split.images.shape[1], width, height)
  mean, std = channel_stats(train.images) if data_cfg.normalize else ((0.0,) * train.images.shape[-1],
                                                                      (1.0,) * train.images.shape[-1])
  place = lambda split: loader.ResidentDataset.from_arrays(split.images, split.labels, mesh)
  return RunData(train=place(train), eval=place(evaluation), heldout=place(heldout) if heldout else None,
                 class_names=tuple(train.class_names), image_shape=tuple(train.images.shape[1:]),
                 mean=mean, std=std)
