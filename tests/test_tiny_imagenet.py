"""Tiny-ImageNet's download layout (wnids.txt, train/<wnid>/images/, val/images/ + val_annotations.txt), faked small."""
import os
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from kdjax.data import cache
from kdjax.data import load_split
from kdjax.errors import UserError

WNIDS = ('n03444034', 'n01443537', 'n02124075')  # wnids.txt order, not sorted
SORTED = tuple(sorted(WNIDS))
PER_CLASS = 4
# val image i belongs to VAL_WNIDS[i]: another order than the classes', so labels cannot come from file order.
VAL_WNIDS = ('n02124075', 'n03444034', 'n01443537', 'n01443537', 'n03444034', 'n02124075', 'n02124075')


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
  monkeypatch.setattr(cache, 'DEFAULT_CACHE_DIR', str(tmp_path / 'default-cache'))


def _image(path, wnid):
  """A flat JPEG whose grey level encodes the class (JPEG keeps a flat colour to within a few levels)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((8, 8, 3), 40 + 80 * SORTED.index(wnid), np.uint8)).save(path, 'JPEG')


def _labels_from_pixels(split):
  return np.round((split.images.reshape(len(split), -1).mean(axis=1) - 40) / 80).astype(np.int32)


def _append(root, text):
  with open(os.path.join(root, 'val', 'val_annotations.txt'), 'a') as f:
    f.write(text)


def make_tiny_imagenet(parent):
  """parent/tiny-imagenet-200 in the original layout, boxes files and the unlabelled test split included."""
  root = os.path.join(parent, 'tiny-imagenet-200')
  os.makedirs(root)
  with open(os.path.join(root, 'wnids.txt'), 'w') as f:
    f.write(''.join(f'{wnid}\n' for wnid in WNIDS))
  for wnid in WNIDS:
    for i in range(PER_CLASS):
      _image(os.path.join(root, 'train', wnid, 'images', f'{wnid}_{i}.JPEG'), wnid)
    with open(os.path.join(root, 'train', wnid, f'{wnid}_boxes.txt'), 'w') as f:
      f.write(f'{wnid}_0.JPEG\t0\t0\t7\t7\n')
  for i, wnid in enumerate(VAL_WNIDS):
    _image(os.path.join(root, 'val', 'images', f'val_{i}.JPEG'), wnid)
  _append(root, ''.join(f'val_{i}.JPEG\t{wnid}\t0\t0\t7\t7\n' for i, wnid in enumerate(VAL_WNIDS)))
  _image(os.path.join(root, 'test', 'images', 'test_0.JPEG'), WNIDS[0])
  return root


@pytest.fixture
def root(tmp_path):
  return make_tiny_imagenet(tmp_path / 'data')


def test_train_and_val_get_the_right_labels(root, cache_dir):
  train = load_split(root, 'train', cache_dir=cache_dir)
  assert train.class_names == SORTED
  assert len(train) == len(WNIDS) * PER_CLASS and train.images.shape[1:] == (8, 8, 3)
  np.testing.assert_array_equal(train.labels, _labels_from_pixels(train))
  assert np.bincount(train.labels).tolist() == [PER_CLASS] * len(WNIDS)
  val = load_split(root, 'val', cache_dir=cache_dir)
  assert val.class_names == SORTED and len(val) == len(VAL_WNIDS)
  np.testing.assert_array_equal(val.labels, _labels_from_pixels(val))
  assert sorted(val.labels.tolist()) == sorted(SORTED.index(w) for w in VAL_WNIDS)


def test_parent_folder_and_archive_load_the_same(tmp_path, root, cache_dir):
  archive = str(tmp_path / 'tiny-imagenet-200.tar.gz')
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(root, arcname='tiny-imagenet-200')
  for split in ('train', 'val[:50%]'):
    direct = load_split(root, split, cache_dir=cache_dir)
    for other in (os.path.dirname(root), archive):  # the folder holding tiny-imagenet-200/, the .tar.gz of it
      loaded = load_split(other, split, cache_dir=cache_dir)
      np.testing.assert_array_equal(loaded.images, direct.images)
      np.testing.assert_array_equal(loaded.labels, direct.labels)
      assert loaded.class_names == SORTED


def test_edited_annotations_are_read_again(root, cache_dir):
  before = load_split(root, 'val', cache_dir=cache_dir)
  path = os.path.join(root, 'val', 'val_annotations.txt')
  with open(path) as f:
    lines = f.read().replace(VAL_WNIDS[0], 'SWAP').replace(VAL_WNIDS[1], VAL_WNIDS[0]).replace('SWAP', VAL_WNIDS[1])
  with open(path, 'w') as f:
    f.write(lines)
  after = load_split(root, 'val', cache_dir=cache_dir)  # same image files: the labels are part of the cache key
  assert not np.array_equal(after.labels, before.labels)


def test_missing_val_annotations_name_the_file(root, cache_dir):
  os.remove(os.path.join(root, 'val', 'val_annotations.txt'))
  assert len(load_split(root, 'train', cache_dir=cache_dir)) == len(WNIDS) * PER_CLASS  # wnids.txt still marks it
  with pytest.raises(UserError) as info:
    load_split(root, 'val', cache_dir=cache_dir)
  message = str(info.value)
  assert 'val labels' in message and 'val_annotations.txt are missing' in message and '\n' not in message


@pytest.mark.parametrize('edit, expected', [
    (lambda root: os.remove(os.path.join(root, 'wnids.txt')), 'wnids.txt'),  # val_annotations.txt still marks it
    (lambda root: os.remove(os.path.join(root, 'val', 'images', 'val_3.JPEG')), 'val_3.JPEG, which does not exist'),
    (lambda root: _append(root, 'val_9.JPEG\tn00000000\t0\t0\t7\t7\n'), 'line 8 .* not `<file> <wnid>`'),
])
def test_broken_trees_are_user_errors(root, cache_dir, edit, expected):
  edit(root)
  with pytest.raises(UserError, match=expected):
    load_split(root, 'val', cache_dir=cache_dir)


def test_unlabelled_test_split_and_tfds_names_say_what_to_do(root, cache_dir):
  with pytest.raises(UserError, match='labelled splits train, val'):
    load_split(root, 'test', cache_dir=cache_dir)
  with pytest.raises(UserError, match='tfds has no Tiny-ImageNet'):
    load_split('tiny_imagenet', 'train', cache_dir=cache_dir)


def test_plain_folders_next_to_it_are_unaffected(tmp_path, root, cache_dir):
  plain = tmp_path / 'plain'
  shutil.copytree(os.path.join(root, 'train'), plain / 'train')  # <split>/<class>/images/*: a plain tree
  split = load_split(str(plain), 'train', cache_dir=cache_dir)
  assert split.class_names == SORTED
  np.testing.assert_array_equal(split.labels, _labels_from_pixels(split))
