"""A run's datasets, loaded once from any source and placed on the devices, with what the models need to know."""
import dataclasses
import hashlib
import os

import jax
import numpy as np
from absl import logging

from kdjax import mesh as mesh_lib
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


def _check_same_everywhere(dataset: str, splits, mean, std) -> None:
  """Every process loads the splits itself (from its own copy of the files); copies that differ (a partial copy, a
  file one host could not decode under `on_corrupt='skip'`) would pair different examples across the processes
  silently, or hang them on different step counts. A hash of what each loaded is compared once, in multi-process
  runs only."""
  if jax.process_count() == 1:
    return
  digest = hashlib.blake2b(digest_size=16)
  for split in splits:
    if split is not None:
      for part in (np.ascontiguousarray(split.images), np.ascontiguousarray(split.labels)):
        digest.update(f'{part.shape}{part.dtype}'.encode())
        digest.update(memoryview(part).cast('B'))
      digest.update(repr(tuple(split.class_names)).encode())
  digest.update(repr((mean, std)).encode())
  if not mesh_lib.same_everywhere(digest.digest()):
    raise UserError(f'the processes of this run loaded different data from {dataset}: each process reads its own '
                    'copy of the files, so make the copies identical on every host (or put them on a shared '
                    'filesystem); with data.on_corrupt=skip a file one host cannot decode also differs')


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
  _check_same_everywhere(data_cfg.dataset, (train, evaluation, heldout), mean, std)
  place = lambda split: loader.ResidentDataset.from_arrays(split.images, split.labels, mesh)
  return RunData(train=place(train), eval=place(evaluation), heldout=place(heldout) if heldout else None,
                 class_names=tuple(train.class_names), image_shape=tuple(train.images.shape[1:]),
                 mean=mean, std=std)
