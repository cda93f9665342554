"""scikit-learn's bundled 8x8 digits (1,797 images): a dataset that needs no download, for smoke tests and CI.

The images' 0..16 intensities are rescaled to uint8 0..255 and shaped (N, 8, 8, 1); class names are '0'..'9'.
sklearn ships no split, so kdjax fixes one: within each digit, the examples are shuffled with a fixed seed and the
first round(80%) go to `train`, the rest to `test` (1,438 / 359 images). Each split is then shuffled once with the
same seed, like folder sources, before any `[a:b]` slicing.

The 1,797 rows are read straight from the CSV file that scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`,
found without importing sklearn): `from sklearn import datasets` takes about 2 s, four times the rest of a tiny run's
data loading, and every test that starts `main.py` on the digits paid it. Where that file is not found (a future
sklearn that moves it), `sklearn.datasets.load_digits()` reads the same rows.
"""
import importlib.util
import os

import numpy as np
from PIL import Image

from kdjax.data.images import to_array
from kdjax.data.splits import ArraySplit, ORDER_SEED, fixed_order
from kdjax.errors import UserError

NAME = 'digits'
TRAIN_FRACTION = 0.8


def _split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(ORDER_SEED)
  train, test = [], []
  for digit in range(10):
    members = rng.permutation(np.flatnonzero(labels == digit))
    cut = int(round(TRAIN_FRACTION * len(members)))
    train.append(members[:cut])
    test.append(members[cut:])
  return {'train': np.sort(np.concatenate(train)), 'test': np.sort(np.concatenate(test))}


def _images_and_labels() -> tuple[np.ndarray, np.ndarray]:
  """(images (1797, 8, 8) float 0..16, labels (1797,) int), as `sklearn.datasets.load_digits()` gives them."""
  spec = importlib.util.find_spec('sklearn')
  if spec is None:
    raise UserError('the digits dataset comes with scikit-learn, which is not installed: pip install scikit-learn')
  csv = os.path.join(spec.submodule_search_locations[0], 'datasets', 'data', 'digits.csv.gz')
  if os.path.isfile(csv):
    rows = np.loadtxt(csv, delimiter=',')  # 64 pixels, then the label
    return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(np.int64)
  from sklearn import datasets
  bunch = datasets.load_digits()
  return bunch.images, bunch.target


def load_digits(source: str, split: str, *, image_size, on_corrupt, **_) -> ArraySplit:
  """Loads the `train` or `test` split of the sklearn digits, resized if `image_size` is set."""
  del source, on_corrupt  # Nothing to locate, nothing unreadable.
  all_images, labels = _images_and_labels()
  indices = _split_indices(labels)
  if split not in indices:
    raise UserError(f'the digits dataset has no split {split!r}; use train or test (optionally sliced: train[:50%])')
  chosen = indices[split][fixed_order(len(indices[split]))]
  images = np.round(all_images[chosen] * (255.0 / 16.0)).astype(np.uint8)[..., None]
  if image_size is not None and image_size != 8:  # Same Pillow filter as every other source.
    images = np.stack([to_array(Image.fromarray(image[..., 0]), image_size) for image in images])
  return ArraySplit(images, labels[chosen].astype(np.int32), tuple(str(d) for d in range(10)))
