"""Decoding image files into one uint8 array with Pillow, in parallel threads.

Pillow releases the GIL while it decodes and resizes, so threads (one per core, a chunk of images per task) share the
work without the start-up and pickling costs of processes; this pays off for large images, while 32x32 ones are
bound by Pillow's Python-level header parsing. Decoding happens once per split anyway (see `cache.py`).

Resizing uses Pillow's BICUBIC filter, which widens its support when downscaling (area-aware antialiasing), so a
224 -> 128 resize does not alias; the same filter serves the rare upscale.
"""

import concurrent.futures
import os

import numpy as np
from PIL import Image

from kdjax.errors import UserError

IMAGE_EXTENSIONS = frozenset({'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm'})
ON_CORRUPT_CHOICES = ('error', 'skip')

# Pillow modes that hold one channel of intensity; they decode to C=1, every other mode to RGB.
GRAY_MODES = frozenset({'1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16B', 'I;16L', 'F'})
# 16-bit intensity (Pillow opens 16-bit PNG/TIFF as one of these): scaled to 8 bits, where convert('L') would clip
# everything above 255 to white.
_16_BIT_MODES = frozenset({'I', 'I;16', 'I;16B', 'I;16L'})
_CHUNK = 64  # Images decoded per thread-pool task.
# What Pillow raises for a truncated, unknown or hostile file.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def is_image_file(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


IGNORED_FOLDERS = ('__MACOSX',)  # resource forks that macOS's zip and Finder add beside every folder


def is_ignored(name: str) -> bool:
  """Whether a file or folder name is none of the data's: hidden, or one of `IGNORED_FOLDERS`."""
  return name.startswith('.') or name in IGNORED_FOLDERS


def image_files(folder: str) -> list[str]:
  """The image files anywhere under `folder` (`is_ignored` files and folders skipped), sorted by path relative to
  it."""
  found = []
  for parent, dirs, filenames in os.walk(folder):
    dirs[:] = [d for d in dirs if not is_ignored(d)]
    found += [os.path.join(parent, f) for f in filenames if is_image_file(f) and not is_ignored(f)]
  return sorted(found, key=lambda path: os.path.relpath(path, folder))


def check_on_corrupt(on_corrupt: str) -> None:
  if on_corrupt not in ON_CORRUPT_CHOICES:
    raise UserError(f'data.on_corrupt is {on_corrupt!r}; set it to one of {", ".join(ON_CORRUPT_CHOICES)}')


def corrupt_error(what: str, reason: object) -> UserError:
  return UserError(
      f'cannot read image {what} ({reason}); fix or delete it, or set on_corrupt=skip (config key data.on_corrupt)'
      ' to skip unreadable images')


def to_array(image: Image.Image, image_size: int | None) -> np.ndarray:
  """Converts a Pillow image to (H, W, C) uint8, C=1 for grayscale modes and 3 otherwise, resized if asked."""
  if image.mode == 'F':  # no fixed range to map to 8 bits: [0, 1]? [0, 255]? raw sensor values?
    raise ValueError('32-bit float image; convert it to 8- or 16-bit integers')
  if image.mode in _16_BIT_MODES:
    wide = np.asarray(image).astype(np.int64)
    image = Image.fromarray(((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8))  # 2-D uint8: mode L
  mode = 'L' if image.mode in GRAY_MODES else 'RGB'
  if image.mode != mode:
    image = image.convert(mode)
  if image_size is not None and image.size != (image_size, image_size):
    image = image.resize((image_size, image_size), Image.BICUBIC)
  array = np.asarray(image, dtype=np.uint8)
  return array[..., None] if array.ndim == 2 else array


def decode_file(path: str, image_size: int | None) -> np.ndarray:
  """Reads one image file; raises one of `DECODE_ERRORS` when it is unreadable."""
  with Image.open(path) as image:
    image.load()
    return to_array(image, image_size)


class _Stacker:
  """Collects decoded images in order into one preallocated array.

  The array is allocated from the first image's size with 3 channels; grayscale images are broadcast into it and,
  if no image had colour, the result keeps only channel 0. A tree that mixes grayscale and RGB files therefore comes
  out RGB, with grayscale images repeated over the three channels.
  """

  def __init__(self, count: int, where: str):
    self._count, self._where = count, where
    self._out = None
    self._first = None
    self._color = False
    self.kept = np.zeros(count, bool)

  def put(self, index: int, array: np.ndarray, name: str) -> None:
    if self._out is None:
      self._out = np.zeros((self._count, *array.shape[:2], 3), np.uint8)
      self._first = (name, array.shape[:2])
    elif array.shape[:2] != self._out.shape[1:3]:
      first_name, first_shape = self._first
      raise UserError(
          f'images in {self._where} have different sizes ({_hw(first_shape)} in {first_name}, {_hw(array.shape)} in'
          f' {name}); set image_size (config key data.image_size) to resize them all to one size')
    self._out[index] = array
    self._color |= array.shape[2] == 3
    self.kept[index] = True

  def result(self) -> np.ndarray:
    if self._out is None:
      raise UserError(f'no readable image in {self._where}; check the files or point data.dataset elsewhere')
    out = self._out if self._color else self._out[..., :1]
    return np.ascontiguousarray(out[self.kept]) if not self.kept.all() else np.ascontiguousarray(out)


def _hw(shape) -> str:
  return f'{shape[1]}x{shape[0]}'


def decode_all(items, load, *, image_size, on_corrupt, where) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Decodes `items` in parallel threads, in order.

  Args:
    items: sequence of (name, payload); `load(payload, image_size)` returns an (H, W, C) uint8 array.
    load: the decoding function (a file reader, or a tfds record reader).
    image_size: resize target, or None to require equal sizes.
    on_corrupt: 'error' raises a UserError naming the first unreadable item; 'skip' drops it.
    where: what the items are, for messages.

  Returns:
    (images, kept mask over items, names of skipped items).
  """
  stacker = _Stacker(len(items), where)
  skipped = []

  def attempt_chunk(start):
    # Chunks, not single images, per task: for small images the per-task overhead would exceed the decoding.
    results = []
    for _, payload in items[start:start + _CHUNK]:
      try:
        results.append((load(payload, image_size), None))
      except DECODE_ERRORS as error:
        results.append((None, error))
    return results

  # One thread per core: small images are mostly Python work under the GIL, where extra threads only contend.
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
  try:
    for start, results in zip(range(0, len(items), _CHUNK), pool.map(attempt_chunk, range(0, len(items), _CHUNK))):
      for index, (array, error) in enumerate(results, start):
        name = items[index][0]
        if error is None:
          stacker.put(index, array, name)
        elif on_corrupt == 'skip':
          skipped.append(name)
        else:
          raise corrupt_error(name, error)
  finally:
    # On an error, drop the queued work instead of decoding the rest of the split first.
    pool.shutdown(cancel_futures=True)
  return stacker.result(), stacker.kept, skipped
