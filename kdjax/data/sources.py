"""`load_split`: one entry point from a dataset string to a decoded, sliced `ArraySplit`.

How the `source` string is read; the first rule that matches wins:
  1. `digits`: scikit-learn's bundled 8x8 digits (see `digits.py`).
  2. a name ending in `.tar.gz` or `.tgz`: an archive of an image-folder tree, extracted once into the cache.
  3. an existing folder, or a string starting with `/`, `.` or `~`: an image-folder tree `ROOT/<split>/<class>/...`
     (a path-like string that does not exist is an error, not a tfds name).
  4. anything else: a tfds catalogue name such as `cifar10` or `imagenette/320px-v2`, read only if already
     prepared.
Folders and archives in a dataset's own download layout are recognised by `folder.LAYOUTS` (Tiny-ImageNet's
`tiny-imagenet-200/`, which has no tfds builder: see `tiny_imagenet.py`).
Each source returns the whole split in a fixed order, decoded through the cache; the `[a:b]` slice of the split
spec is applied last (see `splits.py`), so every slice of a split shares one decoded cache entry.
"""

import numbers
import os
from typing import Callable

from kdjax.data import digits
from kdjax.data import folder
from kdjax.data import images
from kdjax.data import tfds_source
from kdjax.data.archive import is_archive
from kdjax.data.splits import ArraySplit, parse_split
from kdjax.errors import UserError


def _is_path(source: str) -> bool:
  return source.startswith(('/', '.', '~')) or os.path.isdir(source)


# (kind, predicate, loader); a loader returns a whole split: loader(source, split, *, image_size, cache_dir,
# data_dir, on_corrupt).
SOURCE_KINDS: tuple[tuple[str, Callable[[str], bool], Callable[..., ArraySplit]], ...] = (
    ('digits', lambda source: source == digits.NAME, digits.load_digits),
    ('archive', is_archive, folder.load_archive),
    ('folder', _is_path, folder.load_folder),
    ('tfds', lambda source: True, tfds_source.load_tfds),
)


def _match(source: str) -> tuple[str, Callable[[str], bool], Callable[..., ArraySplit]]:
  return next(entry for entry in SOURCE_KINDS if entry[1](source))


def source_kind(source: str) -> str:
  """The kind of source a dataset string names, by the rules in the module docstring."""
  return _match(source)[0]


def load_split(source: str, split: str, *, image_size: int | None = None, cache_dir: str | None = None,
               data_dir: str | None = None, on_corrupt: str = 'error') -> ArraySplit:
  """Loads one split of a dataset as uint8 arrays.

  Args:
    source: `digits`, an image folder, a `.tar.gz` of one, or a prepared tfds name (see the module docstring).
    split: a split name with an optional tfds-style slice: `train`, `train[:25%]`, `train[10:200]`, `test[-100:]`.
    image_size: resize every image to image_size x image_size (Pillow BICUBIC); if None, all images of the split
      must already have one size.
    cache_dir: where archives are extracted and decoded arrays are stored (default ~/.cache/kdjax).
    data_dir: the tfds data folder (tfds sources only; default: tfds' own default).
    on_corrupt: 'error' (an unreadable image is a UserError) or 'skip' (it is left out and counted in `skipped`).

  Returns:
    An ArraySplit with images (N, H, W, C) uint8, C=1 for grayscale data and 3 for RGB, and int32 labels.
  """
  images.check_on_corrupt(on_corrupt)
  if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral)
                               or image_size < 1):
    raise UserError(f'data.image_size is {image_size!r}; set it to a positive integer number of pixels, or to 0 (unset)'
                    ' to keep the stored size')
  source = str(source)
  spec = parse_split(split)
  _, _, loader = _match(source)
  image_size = None if image_size is None else int(image_size)
  whole = loader(source, spec.name, image_size=image_size, cache_dir=cache_dir, data_dir=data_dir,
                 on_corrupt=on_corrupt)
  return whole if spec.is_whole else whole.select(spec.to_slice(len(whole), split))
