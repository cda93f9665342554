"""Image-folder sources: a tree `ROOT/<split>/<class>/<images>`, given as a folder or as a `.tar.gz` of one.

Rules, chosen to match torchvision's ImageFolder where it has one:
* `ROOT` may also be a folder whose only subfolder holds the split folders, as archives usually have a top folder.
* The class list is the sorted union of the class-folder names over all split folders of the tree, so train and
  test of one tree always agree on label indices, and a class missing from one split keeps its index there.
* Images are the files with an image extension (case-insensitive) anywhere under a class folder; hidden files and
  folders, and macOS archivers' `__MACOSX` folders, are ignored.
* Class names that differ only in case (`cat` in train, `Cat` in test) are refused: they would be two classes, and
  every test image of one of them would be scored against a class it was never trained on. A class folder missing
  from some split is logged, as a stray folder (Kaggle's unlabelled `test/images`) becomes a class that way.
* Examples are sorted by (class, path) and then shuffled once with a fixed seed (`splits.fixed_order`); decoded
  arrays are stored, and sliced, in that order.
A dataset with its own download layout is listed by its module instead (`LAYOUTS`: Tiny-ImageNet's
`train/<wnid>/images/` and labelled `val/images/`, see `tiny_imagenet.py`), then decoded and cached the same way.
"""

import os

import numpy as np
from absl import logging

from kdjax.data import archive
from kdjax.data import cache
from kdjax.data import images
from kdjax.data import tiny_imagenet
from kdjax.data.splits import ArraySplit, fixed_order
from kdjax.errors import UserError


def _subfolders(path: str) -> list[str]:
  with os.scandir(path) as entries:
    return sorted(e.name for e in entries if e.is_dir() and not images.is_ignored(e.name))


def find_tree(root: str, split: str) -> str:
  """Returns the folder that holds the split folders: `root` itself or its single subfolder."""
  if not os.path.isdir(root):
    raise UserError(f'dataset folder {root} not found; check data.dataset (a folder ROOT/<split>/<class>/*.jpg, a'
                    ' .tar.gz of one, digits, or a tfds name)')
  children = _subfolders(root)
  if split in children:
    return root
  if len(children) == 1 and os.path.isdir(os.path.join(root, children[0], split)):
    return os.path.join(root, children[0])
  found = _subfolders(os.path.join(root, children[0])) if len(children) == 1 else children
  raise UserError(f'split folder {split!r} not found in {root} (split folders there: {", ".join(found) or "none"});'
                  ' pick one of those splits or lay the data out as ROOT/<split>/<class>/<images>')


def class_names(tree: str) -> tuple[str, ...]:
  """The sorted union of class-folder names over every split folder of `tree` (see the module's rules)."""
  by_split = {split: set(_subfolders(os.path.join(tree, split))) for split in _subfolders(tree)}
  names = set().union(*by_split.values())
  by_case = {}
  for name in sorted(names):
    by_case.setdefault(name.lower(), []).append(name)
  clashes = [' / '.join(group) for group in by_case.values() if len(group) > 1]
  if clashes:
    raise UserError(f'class folders in {tree} differ only in case ({"; ".join(clashes)}), so they would be separate'
                    ' classes; rename them to one spelling in every split')
  for split, present in by_split.items():
    if present and names - present:
      logging.warning('split folder %s has no class folder for %s; if a folder of another split is not a class,'
                      ' move it out of %s', os.path.join(tree, split), ', '.join(sorted(names - present)), tree)
  return tuple(sorted(names))


def list_files(tree: str, split: str, names: tuple[str, ...]) -> list[tuple[str, int]]:
  """(path, label) for every image of a split, sorted by (class, path relative to the class folder)."""
  split_dir = os.path.join(tree, split)
  present = _subfolders(split_dir)
  if not present:
    raise UserError(f'split folder {split_dir} has no class folders; lay the data out as {split_dir}/<class>/<images>')
  files = []
  for name in present:
    files += [(path, names.index(name)) for path in images.image_files(os.path.join(split_dir, name))]
  if not files:
    raise UserError(f'no image files ({", ".join(sorted(images.IMAGE_EXTENSIONS))}) in the class folders of'
                    f' {split_dir}; add images or point data.dataset at another folder')
  return files


def _list_image_folder(root: str, split: str) -> tuple[str, tuple[str, ...], list[tuple[str, int]]]:
  tree = find_tree(root, split)
  names = class_names(tree)
  return tree, names, list_files(tree, split, names)


# Folder layouts, tried in order on a dataset folder or an extracted archive: (name, is_layout(root),
# list_split(root, split) -> (tree, class names, (path, label) pairs)). The plain tree is last and takes the rest.
LAYOUTS = (
    ('tiny_imagenet', tiny_imagenet.is_tree, tiny_imagenet.list_split),
    ('image_folder', lambda root: True, _list_image_folder),
)


def list_split(root: str, split: str) -> tuple[str, tuple[str, ...], list[tuple[str, int]]]:
  """(folder holding the split, class names, (path, label) pairs) by the first of `LAYOUTS` that `root` has."""
  _, _, lister = next(layout for layout in LAYOUTS if layout[1](root))
  return lister(root, split)


def _fingerprint(files: list[tuple[str, int]]) -> str:
  """Names, labels, sizes and modification times of the files: edits to the folder (or to a label file such as
  Tiny-ImageNet's val_annotations.txt) give a new decoded-cache entry."""
  stats = []
  for path, label in files:
    stat = os.stat(path)
    stats.append((path, label, stat.st_size, stat.st_mtime_ns))
  return cache.digest(stats)


def decode_files(files: list[tuple[str, int]], names: tuple[str, ...], *, image_size, on_corrupt,
                 where: str) -> tuple[ArraySplit, list[str]]:
  """Decodes the files in the fixed shuffled order; returns the split and the skipped file names."""
  ordered = [files[i] for i in fixed_order(len(files))]
  array, kept, skipped = images.decode_all(
      [(path, path) for path, _ in ordered], images.decode_file,
      image_size=image_size, on_corrupt=on_corrupt, where=where)
  labels = np.array([label for _, label in ordered], np.int32)[kept]
  return ArraySplit(array, labels, names, len(skipped)), skipped


def load_folder(root: str, split: str, *, image_size, cache_dir, on_corrupt, **_) -> ArraySplit:
  """Loads a whole split of an image folder, through the decoded cache (keyed by a listing of the files)."""
  tree, names, files = list_split(os.path.abspath(os.path.expanduser(root)), split)
  entry = cache.decoded_dir(cache_dir, 'folder', tree, split, names, image_size, _fingerprint(files))
  return cache.load_or_decode(
      entry, lambda: decode_files(files, names, image_size=image_size, on_corrupt=on_corrupt,
                                  where=os.path.join(tree, split)),
      on_corrupt=on_corrupt, description=f'{tree}/{split} image_size={image_size}')


def load_archive(path: str, split: str, *, image_size, cache_dir, on_corrupt, **_) -> ArraySplit:
  """Loads a whole split of a `.tar.gz` image tree; a decoded-cache hit needs neither extraction nor a listing."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise UserError(f'dataset archive {path} not found; check the path (data.dataset) or point it at an image folder')
  entry = cache.decoded_dir(cache_dir, 'archive', archive.archive_key(path), split, image_size)

  def decode():
    tree, names, files = list_split(archive.extract_once(path, cache_dir), split)
    return decode_files(files, names, image_size=image_size, on_corrupt=on_corrupt, where=os.path.join(tree, split))

  return cache.load_or_decode(entry, decode, on_corrupt=on_corrupt,
                              description=f'{os.path.abspath(path)}:{split} image_size={image_size}')
