"""Tiny-ImageNet in its own download layout, read as a folder or a `.tar.gz` of one.

tfds has no Tiny-ImageNet builder, so the data comes from `tiny-imagenet-200.zip` (unzip it; `tar czf` the folder for
an archive), whose layout is not `ROOT/<split>/<class>/`:

  tiny-imagenet-200/wnids.txt                   the 200 class ids (WordNet ids), one per line
  tiny-imagenet-200/train/<wnid>/images/*.JPEG  500 images per class (plus <wnid>_boxes.txt, ignored)
  tiny-imagenet-200/val/images/*.JPEG           10,000 images, labelled only by
  tiny-imagenet-200/val/val_annotations.txt     `<file> <wnid> <x0> <y0> <x1> <y1>` per line, tab-separated
  tiny-imagenet-200/test/images/*.JPEG          unlabelled

Read as a plain image folder, `val/images` would be one class called "images". So `folder.py` asks `is_tree` first
(a `wnids.txt` or `val/val_annotations.txt` in the folder or in its single subfolder, as archives have one) and then
lists the split here. Splits: `train` and `val` (test has no labels). Class names are the sorted wnids, so label i is
the i-th wnid in sorted order, the order torchvision's ImageFolder gives the train folders.
"""

import os

from kdjax.data import images
from kdjax.errors import UserError

WNIDS = 'wnids.txt'
ANNOTATIONS = os.path.join('val', 'val_annotations.txt')
_MARKERS = (WNIDS, ANNOTATIONS)


def find_tree(root: str) -> str | None:
  """The folder that holds the layout: `root` or its single subfolder; None when neither has a marker file."""
  if not os.path.isdir(root):
    return None
  with os.scandir(root) as entries:
    children = [e.path for e in entries if e.is_dir() and not e.name.startswith('.')]
  candidates = [root] + (children if len(children) == 1 else [])
  return next((c for c in candidates if any(os.path.isfile(os.path.join(c, m)) for m in _MARKERS)), None)


def is_tree(root: str) -> bool:
  return find_tree(root) is not None


def class_names(tree: str) -> tuple[str, ...]:
  path = os.path.join(tree, WNIDS)
  if not os.path.isfile(path):
    raise UserError(f'Tiny-ImageNet class list {path} is missing; restore wnids.txt (one wnid per line) from '
                    'tiny-imagenet-200.zip')
  with open(path) as f:
    return tuple(sorted({line.strip() for line in f if line.strip()}))


def _train_files(tree: str, names: tuple[str, ...]) -> list[tuple[str, int]]:
  """train/<wnid>/images/*: every image under a wnid's folder, labelled by that wnid."""
  train = os.path.join(tree, 'train')
  if not os.path.isdir(train):
    raise UserError(f'Tiny-ImageNet train folder {train} is missing; restore it from tiny-imagenet-200.zip')
  with os.scandir(train) as entries:
    folders = {e.name for e in entries if e.is_dir() and not e.name.startswith('.')}
  unknown = sorted(folders - set(names))
  if unknown:
    raise UserError(f'class folders {", ".join(unknown[:3])} in {train} are not listed in {os.path.join(tree, WNIDS)}'
                    '; add their wnids there or remove the folders')
  return [(path, label) for label, wnid in enumerate(names) for path in images.image_files(os.path.join(train, wnid))]


def _val_files(tree: str, names: tuple[str, ...]) -> list[tuple[str, int]]:
  """val/images/<file>, labelled by the wnid that val/val_annotations.txt gives it."""
  path = os.path.join(tree, ANNOTATIONS)
  if not os.path.isfile(path):
    raise UserError(f'Tiny-ImageNet val labels {path} are missing (one line per image: file<TAB>wnid<TAB>box); '
                    'restore val_annotations.txt from tiny-imagenet-200.zip, or evaluate on a slice of train '
                    '(data.eval_split=train[90%:] with data.train_split=train[:90%])')
  label_of = {wnid: label for label, wnid in enumerate(names)}
  files = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) < 2 or fields[1] not in label_of:
        raise UserError(f'{path} line {number} is {line.strip()!r}, not `<file> <wnid>` with a wnid of '
                        f'{WNIDS}; fix the line or restore the file from tiny-imagenet-200.zip')
      image = os.path.join(tree, 'val', 'images', fields[0])
      if not os.path.isfile(image):
        raise UserError(f'{path} line {number} names {image}, which does not exist; restore val/images from '
                        'tiny-imagenet-200.zip')
      files.append((image, label_of[fields[1]]))
  return sorted(files)


# The labelled splits and how each is listed.
SPLITS = {'train': _train_files, 'val': _val_files}


def list_split(root: str, split: str) -> tuple[str, tuple[str, ...], list[tuple[str, int]]]:
  """(tree, class names, (path, label) pairs sorted by path) of one split, for `folder.py` to decode."""
  tree = find_tree(root)
  if split not in SPLITS:
    raise UserError(f'Tiny-ImageNet ({tree}) has the labelled splits {", ".join(SPLITS)}, not {split!r} (test is '
                    'unlabelled); use those, sliced for a held-out part (e.g. train[90%:])')
  names = class_names(tree)
  files = SPLITS[split](tree, names)
  if not files:
    raise UserError(f'no image files in the {split} split of {tree}; restore it from tiny-imagenet-200.zip')
  return tree, names, files
