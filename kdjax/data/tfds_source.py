"""tfds catalogue datasets (`cifar10`, `mnist`, `imagenette/320px-v2`, ...) read without TensorFlow.

kdjax reads a dataset that is already prepared in `array_record` format through tfds' random-access data source,
which decodes images with Pillow/NumPy; TensorFlow is never imported. It never downloads or prepares: the machines
it trains on usually have no internet, and a silent multi-GB download would be worse than a clear error. A dataset
that is not prepared in `data_dir` is a UserError naming the command that prepares it.

Slicing is left to `splits` on the whole split in tfds' stored order, which tfds shuffled when preparing, so
`train[:10%]` selects the same examples as tfds' own `split='train[:10%]'`.
"""

import os
import re

import numpy as np
from PIL import Image

from kdjax.data import cache
from kdjax.data import images
from kdjax.data.splits import ArraySplit
from kdjax.errors import UserError


def _prepare_hint(name: str) -> str:
  return (f'prepare it with `tfds build {name} --file_format=array_record` on a machine with internet (then copy its'
          ' data_dir here and set data.data_dir), or point data.dataset at an image folder or .tar.gz')


# Datasets sought in the tfds catalogue that it does not have, by their name squashed to letters: where they come from.
NOT_IN_CATALOGUE = {
    'tinyimagenet': 'tfds has no Tiny-ImageNet builder; unzip tiny-imagenet-200.zip and set '
                    'data.dataset=/path/tiny-imagenet-200 (the folder, or a .tar.gz of it)',
}


def _builder(name: str, data_dir: str | None):
  squashed = re.sub('[^a-z]', '', name.lower())
  missing = next((hint for key, hint in NOT_IN_CATALOGUE.items() if squashed.startswith(key)), None)
  if missing:
    raise UserError(f'dataset {name!r} is not an existing folder or archive, and {missing}')
  _, sep, rest = name.partition(':')
  if sep and not rest[:1].isdigit():  # `name:1.0.0` is a version; `huggingface:name` would query the network.
    raise UserError(f'tfds community dataset {name!r} is not supported (it needs the network); use a catalogue name'
                    ' such as cifar10, or point data.dataset at an image folder or .tar.gz')
  import tensorflow_datasets as tfds  # Imported here: slow to import, and only tfds sources need it.
  try:
    return tfds.builder(name, data_dir=data_dir)
  except (tfds.core.DatasetNotFoundError, ValueError) as error:
    raise UserError(
        f'dataset {name!r} is not an existing folder, a .tar.gz archive, digits, or a tfds catalogue name; check the'
        f' path or the tfds name (e.g. cifar10, mnist, imagenette/320px-v2)') from error


def _record_to_array(array: np.ndarray, image_size: int | None) -> np.ndarray:
  """Brings a decoded tfds image to (H, W, C) uint8 with C in {1, 3}, resized if asked, like folder images."""
  array = np.asarray(array)
  if array.ndim == 2:
    array = array[..., None]
  resize = image_size is not None and array.shape[:2] != (image_size, image_size)
  if array.dtype == np.uint8 and array.shape[-1] in (1, 3) and not resize:
    return array
  pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
  return images.to_array(pil, image_size)


def _keys(builder) -> tuple[str, str]:
  keys = builder.info.supervised_keys
  if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
    return keys
  return 'image', 'label'


def _decode(builder, name: str, split: str, *, image_size, on_corrupt) -> tuple[ArraySplit, list[str]]:
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError as error:  # Prepared, but as TFRecord, which has no random access.
    raise UserError(f'tfds dataset {name!r} in {builder.data_dir} is stored as TFRecord, which kdjax cannot read'
                    f' without TensorFlow; {_prepare_hint(name)}') from error
  image_key, label_key = _keys(builder)
  label_feature = builder.info.features[label_key]
  if not hasattr(label_feature, 'names'):
    raise UserError(f'tfds dataset {name!r} has no class-label feature {label_key!r}; use an image-classification'
                    ' dataset')
  labels = np.zeros(len(source), np.int32)

  def load(index, size):
    example = source[index]
    labels[index] = example[label_key]
    return _record_to_array(example[image_key], size)

  array, kept, skipped = images.decode_all(
      [(f'{name}:{split} record {i}', i) for i in range(len(source))], load,
      image_size=image_size, on_corrupt=on_corrupt, where=f'tfds {name}:{split}')
  return ArraySplit(array, labels[kept], tuple(label_feature.names), len(skipped)), skipped


def load_tfds(name: str, split: str, *, image_size, cache_dir, data_dir, on_corrupt) -> ArraySplit:
  """Loads a whole split of a prepared tfds dataset, through the decoded cache."""
  builder = _builder(name, data_dir and os.path.expanduser(data_dir))
  if not builder.is_prepared():
    raise UserError(f'tfds dataset {name!r} is not prepared (nothing in {builder.data_dir}) and kdjax never'
                    f' downloads; {_prepare_hint(name)}')
  if split not in builder.info.splits:
    raise UserError(f'tfds dataset {name!r} has no split {split!r}; use one of {", ".join(builder.info.splits)}')
  entry = cache.decoded_dir(cache_dir, 'tfds', builder.data_dir, split, image_size)
  return cache.load_or_decode(
      entry, lambda: _decode(builder, name, split, image_size=image_size, on_corrupt=on_corrupt),
      on_corrupt=on_corrupt, description=f'tfds {builder.data_dir}:{split} image_size={image_size}')
