"""Tests for kdjax.data sources: tiny image trees built in tmp_path, no network, no real datasets."""

import os
import tarfile
import time
import types

import numpy as np
from PIL import Image
import pytest

from kdjax import config as config_lib
from kdjax import mesh as mesh_lib
from kdjax import run_data
from kdjax.data import archive
from kdjax.data import cache
from kdjax.data import compact
from kdjax.data import images as images_lib
from kdjax.data import load_split
from kdjax.data import sources
from kdjax.data.splits import parse_split
from kdjax.errors import UserError

CLASSES = ('cat', 'dog', 'eel')
PER_CLASS = 7


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
  """Any load that forgets cache_dir still writes under tmp_path, never into ~/.cache."""
  monkeypatch.setattr(cache, 'DEFAULT_CACHE_DIR', str(tmp_path / 'default-cache'))


def _write(path, array, ext):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
  image.save(path, 'PNG' if ext.lower() == '.png' else 'JPEG')


def make_tree(root, *, splits=('train', 'test'), size=8, channels=3, seed=0):
  """root/<split>/<class>/<i>.<ext>, random pixels; extensions alternate .png / .JPG / .jpeg (case-insensitive)."""
  rng = np.random.default_rng(seed)
  for split in splits:
    for name in CLASSES:
      for i in range(PER_CLASS):
        ext = ('.png', '.JPG', '.jpeg')[i % 3]
        array = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
        _write(os.path.join(root, split, name, f'{i:02d}{ext}'), array, ext)
  return str(root)


def make_tar(tree_parent, out):
  """A .tar.gz with one top folder, as real archives have."""
  with tarfile.open(out, 'w:gz') as tar:
    for name in os.listdir(tree_parent):
      tar.add(os.path.join(tree_parent, name), arcname=name)
  return str(out)


@pytest.fixture
def tree(tmp_path):
  return make_tree(tmp_path / 'tree')


def test_folder_loads_sorted_classes(tree, cache_dir):
  split = load_split(tree, 'train', cache_dir=cache_dir)
  assert split.images.shape == (len(CLASSES) * PER_CLASS, 8, 8, 3)
  assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
  assert split.class_names == CLASSES
  assert np.bincount(split.labels).tolist() == [PER_CLASS] * len(CLASSES)
  assert split.skipped == 0
  # The PNG of class 'dog', image 00, is stored losslessly: find it by content and check its label.
  dog = np.asarray(Image.open(os.path.join(tree, 'train', 'dog', '00.png')))
  index = [i for i, image in enumerate(split.images) if np.array_equal(image, dog)]
  assert len(index) == 1 and split.labels[index[0]] == CLASSES.index('dog')


def test_archive_matches_folder(tmp_path, cache_dir):
  make_tree(tmp_path / 'src' / 'mydata')
  tar = make_tar(tmp_path / 'src', tmp_path / 'mydata.tar.gz')
  for split_name in ('train', 'test'):
    from_folder = load_split(str(tmp_path / 'src'), split_name, cache_dir=cache_dir)  # Single child holds splits.
    from_tar = load_split(tar, split_name, cache_dir=cache_dir)
    np.testing.assert_array_equal(from_tar.images, from_folder.images)
    np.testing.assert_array_equal(from_tar.labels, from_folder.labels)
    assert from_tar.class_names == from_folder.class_names == CLASSES


def test_archive_is_extracted_once(tmp_path, cache_dir, monkeypatch):
  make_tree(tmp_path / 'src' / 'mydata')
  tar = make_tar(tmp_path / 'src', tmp_path / 'mydata.tgz')
  calls = []
  real_extract = archive._extract
  monkeypatch.setattr(archive, '_extract', lambda *args: calls.append(args) or real_extract(*args))
  load_split(tar, 'train', cache_dir=cache_dir)
  load_split(tar, 'test', cache_dir=cache_dir)  # Not decoded yet: reads the existing extraction.
  load_split(tar, 'train', image_size=4, cache_dir=cache_dir)
  assert len(calls) == 1
  extracted = os.listdir(os.path.join(cache_dir, 'extracted'))
  assert len(extracted) == 1 and not extracted[0].startswith('.tmp')


def test_interrupted_extraction_is_not_reused(tmp_path, cache_dir, monkeypatch):
  make_tree(tmp_path / 'src' / 'mydata')
  tar = make_tar(tmp_path / 'src', tmp_path / 'mydata.tar.gz')
  real_extract = archive._extract

  def killed(path, dest):
    real_extract(path, dest)
    os.remove(next(os.path.join(r, f) for r, _, files in os.walk(dest) for f in files))  # Half done...
    raise KeyboardInterrupt  # ...then killed.

  monkeypatch.setattr(archive, '_extract', killed)
  with pytest.raises(KeyboardInterrupt):
    load_split(tar, 'train', cache_dir=cache_dir)
  monkeypatch.setattr(archive, '_extract', real_extract)
  assert len(load_split(tar, 'train', cache_dir=cache_dir)) == len(CLASSES) * PER_CLASS


def test_complementary_slices_are_disjoint_and_cover(tree, cache_dir):
  whole = load_split(tree, 'train', cache_dir=cache_dir)
  head = load_split(tree, 'train[:25%]', cache_dir=cache_dir)
  tail = load_split(tree, 'train[25%:]', cache_dir=cache_dir)
  assert len(head) == round(0.25 * len(whole)) and len(head) + len(tail) == len(whole)
  np.testing.assert_array_equal(np.concatenate([head.images, tail.images]), whole.images)
  middle = load_split(tree, 'train[2:5]', cache_dir=cache_dir)
  assert len(middle) == 3
  np.testing.assert_array_equal(middle.images, whole.images[2:5])
  np.testing.assert_array_equal(load_split(tree, 'test[-4:]', cache_dir=cache_dir).labels,
                                load_split(tree, 'test', cache_dir=cache_dir).labels[-4:])
  assert head.class_names == CLASSES  # A slice keeps the whole class list.


def test_fixed_order_is_shuffled_and_deterministic(tree, tmp_path):
  first = load_split(tree, 'train', cache_dir=str(tmp_path / 'a'))
  second = load_split(tree, 'train', cache_dir=str(tmp_path / 'b'))
  np.testing.assert_array_equal(first.images, second.images)
  assert np.any(np.diff(first.labels) < 0), 'examples should not come sorted by class'


@pytest.mark.parametrize('num_examples', [1, 3, 7, 10, 21, 33, 101, 999, 50_000])
@pytest.mark.parametrize('spec', ['train', 'train[:25%]', 'train[25%:]', 'train[33%:67%]', 'train[-5%:]',
                                  'train[:-5%]', 'train[1.5%:]', 'train[:50%]', 'train[2:3]', 'train[-1:]'])
def test_slice_bounds_match_tfds(spec, num_examples):
  tfds = pytest.importorskip('tensorflow_datasets')
  info = {'train': types.SimpleNamespace(num_examples=num_examples)}
  try:
    (instruction,) = tfds.core.ReadInstruction.from_spec(spec).to_absolute(info)
    expected = range(num_examples)[instruction.from_:instruction.to]
  except ValueError:
    expected = range(0)
  if not expected:
    with pytest.raises(UserError):
      parse_split(spec).to_slice(num_examples, spec)
  else:
    assert range(num_examples)[parse_split(spec).to_slice(num_examples, spec)] == expected


@pytest.mark.parametrize('spec', ['train[', 'train[a:b]', 'train[:200%]', 'train[5]', 'train[1:2%]', '', 'train[:]',
                                  'train[1.5:]', 'tr ain[]x'])
def test_malformed_split_is_user_error(tree, cache_dir, spec):
  with pytest.raises(UserError, match='split'):
    load_split(tree, spec, cache_dir=cache_dir)


def test_slice_past_the_end_is_user_error(tree, cache_dir):
  with pytest.raises(UserError, match='21 examples'):
    load_split(tree, 'train[:100]', cache_dir=cache_dir)


def test_image_size_resizes(tree, cache_dir):
  split = load_split(tree, 'train', image_size=5, cache_dir=cache_dir)
  assert split.images.shape == (len(CLASSES) * PER_CLASS, 5, 5, 3)


def test_mixed_sizes_need_image_size(tree, cache_dir):
  _write(os.path.join(tree, 'train', 'cat', 'big.png'), np.zeros((10, 12, 3), np.uint8), '.png')
  with pytest.raises(UserError, match='image_size'):
    load_split(tree, 'train', cache_dir=cache_dir)
  assert load_split(tree, 'train', image_size=8, cache_dir=cache_dir).images.shape[1:] == (8, 8, 3)


def test_grayscale_gives_one_channel_and_mixed_trees_give_rgb(tmp_path, cache_dir):
  gray = make_tree(tmp_path / 'gray', channels=1)
  assert load_split(gray, 'train', cache_dir=cache_dir).images.shape[-1] == 1
  _write(os.path.join(gray, 'train', 'cat', 'color.png'), np.full((8, 8, 3), (10, 20, 30), np.uint8), '.png')
  mixed = load_split(gray, 'train', cache_dir=cache_dir)
  assert mixed.images.shape[-1] == 3
  is_color = np.all(mixed.images == np.array([10, 20, 30], np.uint8), axis=(1, 2, 3))
  assert is_color.sum() == 1
  grays = mixed.images[~is_color]
  np.testing.assert_array_equal(grays[..., 0], grays[..., 1])


def test_16_bit_images_are_scaled_and_float_images_refused(tmp_path, cache_dir):
  """16-bit PNGs keep their contrast (x / 257, where Pillow's convert('L') clips everything above 255 to white);
  float images, which have no fixed range, are unreadable with the usual on_corrupt choice."""
  root = make_tree(tmp_path / 'deep', channels=1)
  deep = os.path.join(root, 'train', 'cat', 'deep.png')
  Image.fromarray(np.tile(np.array([0, 257, 32768, 65535], np.uint16), (8, 2))).save(deep)
  assert Image.open(deep).mode.startswith('I')
  np.testing.assert_array_equal(images_lib.decode_file(deep, None)[0, :4, 0], [0, 1, 128, 255])
  assert load_split(root, 'train', cache_dir=cache_dir).images.shape[1:] == (8, 8, 1)
  Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(os.path.join(root, 'train', 'dog', 'float.tif'))
  with pytest.raises(UserError, match='float.tif .*float image.*on_corrupt=skip'):
    load_split(root, 'train', cache_dir=cache_dir)


def test_splits_of_different_channel_counts_share_the_model_input(tmp_path, cache_dir):
  """A grayscale training split with one RGB test image: every split gets 3 channels (gray repeated), so the model
  built from the training split's shape also fits the test split."""
  root = make_tree(tmp_path / 'gray', channels=1)
  _write(os.path.join(root, 'test', 'cat', 'color.png'), np.full((8, 8, 3), (10, 20, 30), np.uint8), '.png')
  cfg = config_lib.base_config().data
  cfg.dataset, cfg.cache_dir, cfg.eval_split = root, cache_dir, 'test'
  data = run_data.load(cfg, mesh_lib.make_data_mesh())
  assert data.image_shape == (8, 8, 3)
  assert data.train.images.shape[-1] == data.eval.images.shape[-1] == 3
  train = np.asarray(data.train.images)
  np.testing.assert_array_equal(train[..., 0], train[..., 2])
  assert len(data.mean) == 3


def test_non_square_images_need_image_size(tmp_path, cache_dir):
  root = str(tmp_path / 'wide')
  for split in ('train', 'test'):
    for name in CLASSES:
      _write(os.path.join(root, split, name, '0.png'), np.zeros((8, 12, 3), np.uint8), '.png')
  cfg = config_lib.base_config().data
  cfg.dataset, cfg.cache_dir, cfg.eval_split = root, cache_dir, 'test'
  with pytest.raises(UserError, match='12x8, not square; set data.image_size'):
    run_data.load(cfg, mesh_lib.make_data_mesh())
  cfg.image_size = 8
  assert run_data.load(cfg, mesh_lib.make_data_mesh()).image_shape == (8, 8, 3)


def test_missing_paths_are_user_errors(tmp_path, cache_dir):
  with pytest.raises(UserError, match='dataset folder .*nope not found'):
    load_split(str(tmp_path / 'nope'), 'train', cache_dir=cache_dir)
  with pytest.raises(UserError, match='archive .*nope.tar.gz not found'):
    load_split(str(tmp_path / 'nope.tar.gz'), 'train', cache_dir=cache_dir)


def test_missing_split_lists_the_splits_there(tree, cache_dir):
  with pytest.raises(UserError, match=r"'val' not found .*test, train"):
    load_split(tree, 'val', cache_dir=cache_dir)


def test_empty_split_folders_are_user_errors(tmp_path, cache_dir):
  os.makedirs(tmp_path / 'empty' / 'train')
  with pytest.raises(UserError, match='no class folders'):
    load_split(str(tmp_path / 'empty'), 'train', cache_dir=cache_dir)
  os.makedirs(tmp_path / 'empty' / 'train' / 'cat')
  (tmp_path / 'empty' / 'train' / 'cat' / 'notes.txt').write_text('not an image')
  with pytest.raises(UserError, match='no image files'):
    load_split(str(tmp_path / 'empty'), 'train', cache_dir=cache_dir)


def test_class_list_is_the_union_over_splits(tree, cache_dir):
  _write(os.path.join(tree, 'test', 'ant', '00.png'), np.zeros((8, 8, 3), np.uint8), '.png')
  train = load_split(tree, 'train', cache_dir=cache_dir)
  test = load_split(tree, 'test', cache_dir=cache_dir)
  assert train.class_names == test.class_names == ('ant',) + CLASSES
  assert set(train.labels.tolist()) == {1, 2, 3}  # 'ant' keeps index 0 though train has none.


def test_class_names_differing_only_in_case_are_refused(tree, cache_dir):
  os.rename(os.path.join(tree, 'test', 'cat'), os.path.join(tree, 'test', 'Cat'))
  with pytest.raises(UserError, match='differ only in case \\(Cat / cat\\)'):
    load_split(tree, 'train', cache_dir=cache_dir)


def test_macos_resource_folders_are_no_split_or_class(tree, cache_dir, caplog):
  for junk in ('__MACOSX/train/cat/._00.png', 'train/__MACOSX/._cat', 'train/cat/__MACOSX/._00.png'):
    path = os.path.join(tree, junk)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(b'\x00\x05\x16\x07 AppleDouble')  # not an image: on_corrupt='error' would stop on it
  split = load_split(tree, 'train', cache_dir=cache_dir)
  assert split.class_names == CLASSES and len(split) == len(CLASSES) * PER_CLASS and split.skipped == 0
  assert 'has no class folder' not in caplog.text


def test_a_class_folder_missing_from_a_split_is_logged(tree, cache_dir, caplog):
  """Kaggle's unlabelled `test/images` would be a class: the log names it, and where it is missing."""
  _write(os.path.join(tree, 'test', 'images', '00.png'), np.zeros((8, 8, 3), np.uint8), '.png')
  with caplog.at_level('WARNING'):
    load_split(tree, 'train', cache_dir=cache_dir)
  assert f'{os.path.join(tree, "train")} has no class folder for images' in caplog.text


def test_archive_key_changes_with_content_under_a_restored_modification_time(tmp_path):
  """`cp -p` / `rsync -a` of a rebuilt archive of the same size keep size and mtime; the change time still moves."""
  path = tmp_path / 'data.tar.gz'
  path.write_bytes(b'a' * 64)
  before = archive.archive_key(str(path))
  stat = os.stat(path)
  time.sleep(0.05)  # file times tick with the kernel's coarse clock (a few ms)
  path.write_bytes(b'b' * 64)
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert os.stat(path).st_mtime_ns == stat.st_mtime_ns and archive.archive_key(str(path)) != before


def test_corrupt_file(tree, cache_dir):
  bad = os.path.join(tree, 'train', 'dog', 'bad.jpg')
  with open(bad, 'wb') as f:
    f.write(b'not a jpeg at all')
  with pytest.raises(UserError, match='bad.jpg.*on_corrupt=skip'):
    load_split(tree, 'train', cache_dir=cache_dir)
  split = load_split(tree, 'train', cache_dir=cache_dir, on_corrupt='skip')
  assert split.skipped == 1 and len(split) == len(CLASSES) * PER_CLASS
  with pytest.raises(UserError, match='bad.jpg'):  # The cached entry remembers what it skipped.
    load_split(tree, 'train', cache_dir=cache_dir)


@pytest.mark.parametrize('kwargs', [{'on_corrupt': 'ignore'}, {'image_size': 0}, {'image_size': 3.5}])
def test_bad_options_are_user_errors(tree, cache_dir, kwargs):
  with pytest.raises(UserError, match='data\\.'):
    load_split(tree, 'train', cache_dir=cache_dir, **kwargs)


def test_decoded_cache_is_reused(tree, cache_dir, monkeypatch):
  first = load_split(tree, 'train', cache_dir=cache_dir)

  def no_decoding(*args, **kwargs):
    raise AssertionError('decoded again instead of reading the cache')

  monkeypatch.setattr(Image, 'open', no_decoding)
  second = load_split(tree, 'train[:50%]', cache_dir=cache_dir)
  np.testing.assert_array_equal(second.images, first.images[:len(second)])
  assert second.class_names == CLASSES


def test_changed_folder_is_decoded_again(tree, cache_dir):
  assert len(load_split(tree, 'train', cache_dir=cache_dir)) == 21
  _write(os.path.join(tree, 'train', 'cat', 'new.png'), np.zeros((8, 8, 3), np.uint8), '.png')
  assert len(load_split(tree, 'train', cache_dir=cache_dir)) == 22


def test_digits():
  train = load_split('digits', 'train')
  test = load_split('digits', 'test')
  assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
  assert len(train) + len(test) == 1797 and len(test) == 359
  assert train.class_names == tuple(str(d) for d in range(10))
  assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(10))
  assert train.images.max() == 255 and train.images.min() == 0
  np.testing.assert_array_equal(load_split('digits', 'train[:10]').images, train.images[:10])
  assert load_split('digits', 'test', image_size=16).images.shape == (359, 16, 16, 1)
  with pytest.raises(UserError, match='train or test'):
    load_split('digits', 'validation')


def test_digits_read_from_sklearns_file_are_sklearns_digits(tmp_path, monkeypatch):
  """The CSV read without importing sklearn gives what `load_digits()` gives; so does the fallback, which serves
  where that file is not found."""
  from sklearn import datasets
  from kdjax.data import digits
  expected = datasets.load_digits()
  for where in ('sklearn file', 'fallback'):
    images, labels = digits._images_and_labels()
    np.testing.assert_array_equal(images, expected.images, err_msg=where)
    np.testing.assert_array_equal(labels, expected.target, err_msg=where)
    monkeypatch.setattr(digits.importlib.util, 'find_spec', lambda name: types.SimpleNamespace(
        submodule_search_locations=[str(tmp_path)]))  # a sklearn without the file
  monkeypatch.setattr(digits.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(UserError, match='pip install scikit-learn'):
    digits._images_and_labels()


def test_source_kinds(tree):
  assert sources.source_kind('digits') == 'digits'
  assert sources.source_kind('/data/x.TAR.GZ') == 'archive'
  assert sources.source_kind('./missing') == 'folder'
  assert sources.source_kind(tree) == 'folder'
  assert sources.source_kind('imagenette/320px-v2') == 'tfds'


def test_unprepared_tfds_dataset_names_the_fix(tmp_path, cache_dir):
  with pytest.raises(UserError, match='tfds build mnist'):
    load_split('mnist', 'train', data_dir=str(tmp_path / 'tfds'), cache_dir=cache_dir)
  with pytest.raises(UserError, match='not an existing folder'):
    load_split('no_such_dataset_kdjax', 'train', data_dir=str(tmp_path / 'tfds'), cache_dir=cache_dir)
  with pytest.raises(UserError, match='community'):  # Would reach for the network.
    load_split('huggingface:mnist', 'train', data_dir=str(tmp_path / 'tfds'), cache_dir=cache_dir)


def test_prepared_tfds_dataset_without_tensorflow(tmp_path, cache_dir):
  tfds = pytest.importorskip('tensorflow_datasets')

  # A Tensor feature (not Image) because encoding images while preparing would need TensorFlow; reading does not.
  class KdjaxTestTiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      features = tfds.features.FeaturesDict({
          'image': tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
          'label': tfds.features.ClassLabel(names=list(CLASSES))})
      return tfds.core.DatasetInfo(builder=self, features=features, supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(12), 'test': self._generate_examples(4)}

    def _generate_examples(self, count):
      rng = np.random.default_rng(count)
      for i in range(count):
        yield i, {'image': rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), 'label': i % 3}

  data_dir = str(tmp_path / 'tfds')
  KdjaxTestTiny(data_dir=data_dir, file_format='array_record').download_and_prepare()
  split = load_split('kdjax_test_tiny', 'train[:50%]', data_dir=data_dir, cache_dir=cache_dir)
  expected = tfds.data_source('kdjax_test_tiny', split='train[:50%]', data_dir=data_dir, download=False)
  np.testing.assert_array_equal(split.images, np.stack([example['image'] for example in expected]))
  np.testing.assert_array_equal(split.labels, [example['label'] for example in expected])
  assert split.class_names == CLASSES
  assert load_split('kdjax_test_tiny', 'test', image_size=4, data_dir=data_dir,
                    cache_dir=cache_dir).images.shape == (4, 4, 4, 3)
  with pytest.raises(UserError, match='no split'):
    load_split('kdjax_test_tiny', 'validation', data_dir=data_dir, cache_dir=cache_dir)


def test_compact_copy_loads_with_the_same_layout(tmp_path, cache_dir):
  make_tree(tmp_path / 'src' / 'mydata', size=12)
  tar = make_tar(tmp_path / 'src', tmp_path / 'mydata.tar.gz')
  out = str(tmp_path / 'small-6.tar.gz')
  assert compact.main([tar, out, '--size', '6']) == 0
  small = load_split(out, 'train', cache_dir=cache_dir)
  original = load_split(tar, 'train', cache_dir=cache_dir)
  assert small.images.shape == (len(CLASSES) * PER_CLASS, 6, 6, 3)
  np.testing.assert_array_equal(small.labels, original.labels)  # Same names, so the same fixed order.
  assert compact.main([str(tmp_path / 'src'), str(tmp_path / 'from-folder.tgz'), '--size', '6']) == 0
  np.testing.assert_array_equal(load_split(str(tmp_path / 'from-folder.tgz'), 'test', cache_dir=cache_dir).labels,
                                load_split(out, 'test', cache_dir=cache_dir).labels)
  same_stem = os.path.join(tmp_path, 'src', 'mydata', 'train', CLASSES[0], '00.jpg')  # next to 00.png
  _write(same_stem, np.zeros((12, 12, 3), np.uint8), '.jpg')
  assert compact.main([str(tmp_path / 'src'), str(tmp_path / 'same-stem.tgz'), '--size', '6']) == 0
  assert len(load_split(str(tmp_path / 'same-stem.tgz'), 'train', cache_dir=cache_dir)) == len(CLASSES) * PER_CLASS + 1


def test_compact_copy_keeps_every_class_index(tmp_path, cache_dir):
  """A class folder whose images are all unreadable, or which is empty, keeps its place in the class list: labels
  of the copy are those of the source."""
  source = make_tree(tmp_path / 'src' / 'mydata', size=12)
  for split in ('train', 'test'):
    os.makedirs(os.path.join(source, split, 'aardvark'))  # empty: sorts first, so every label would shift
    os.makedirs(os.path.join(source, split, 'zebra'))
    with open(os.path.join(source, split, 'zebra', 'broken.jpg'), 'wb') as f:
      f.write(b'not a jpeg')
  tar = make_tar(tmp_path / 'src', tmp_path / 'mydata.tar.gz')
  for src, out in ((source, 'from-folder.tgz'), (tar, 'from-archive.tgz')):
    out = str(tmp_path / out)
    assert compact.compact(src, out, size=6) == (2 * len(CLASSES) * PER_CLASS, 2)
    copy = load_split(out, 'test', cache_dir=cache_dir)
    assert copy.class_names == ('aardvark',) + CLASSES + ('zebra',)
    assert sorted(copy.labels.tolist()) == sorted(np.repeat([1, 2, 3], PER_CLASS).tolist())


def test_compact_copy_refuses_datasets_labelled_by_files(tmp_path):
  root = tmp_path / 'tiny-imagenet-200'
  _write(str(root / 'train' / 'n01' / 'images' / 'n01_0.JPEG'), np.zeros((8, 8, 3), np.uint8), '.jpg')
  (root / 'wnids.txt').write_text('n01\n')
  out = str(tmp_path / 'tiny.tgz')
  with pytest.raises(UserError, match="wnids.txt.*Tiny-ImageNet's layout"):
    compact.compact(str(root), out, size=4)
  assert not os.path.exists(out) and not os.path.exists(out + '.partial')


def test_each_epoch_visits_every_example_once_in_its_own_order():
  from kdjax.data import loader
  orders = {(seed, epoch): loader.epoch_permutation(seed, epoch, 50) for seed in (0, 1) for epoch in (0, 1, 2)}
  for order in orders.values():
    assert sorted(order.tolist()) == list(range(50))
  assert len({tuple(order) for order in orders.values()}) == len(orders)  # per epoch and per seed
  np.testing.assert_array_equal(loader.epoch_permutation(1, 2, 50), orders[1, 2])  # and reproducible


def test_an_eval_split_of_another_image_size_is_logged(tmp_path, cache_dir, caplog):
  root = tmp_path / 'tree'
  make_tree(root, splits=('train',), size=8)
  make_tree(root, splits=('test',), size=12)
  cfg = config_lib.base_config().data
  cfg.dataset, cfg.cache_dir = str(root), cache_dir
  with caplog.at_level('WARNING'):
    data = run_data.load(cfg, mesh_lib.make_data_mesh())
  assert data.image_shape == (8, 8, 3)
  assert 'the eval split of' in caplog.text and 'holds 12x12 images, the training split 8x8' in caplog.text


def test_compact_copy_of_one_split_with_nested_class_folders(tmp_path, cache_dir):
  """`train/<class>/images/x.png`, the only split: `train` is kept as the split, not dropped as a top folder."""
  root = tmp_path / 'src' / 'mydata'
  for name in ('cat', 'dog'):
    _write(str(root / 'train' / name / 'images' / '0.png'), np.zeros((8, 8, 3), np.uint8), '.png')
  out = str(tmp_path / 'copy.tgz')
  assert compact.compact(str(tmp_path / 'src'), out, size=4) == (2, 0)
  copy = load_split(out, 'train', cache_dir=cache_dir)
  assert copy.class_names == ('cat', 'dog') and sorted(copy.labels.tolist()) == [0, 1]


@pytest.mark.parametrize('other_differs', [False, True])
def test_processes_that_loaded_different_data_stop_together(tmp_path, cache_dir, monkeypatch, other_differs):
  """Each process of a multi-process run loads its own copy of the files; copies that differ are one UserError
  (on every process: the hashes are gathered, so each sees the mismatch). The second process is simulated."""
  import jax
  from jax.experimental import multihost_utils
  root = make_tree(tmp_path / 'tree')
  cfg = config_lib.base_config().data
  cfg.dataset, cfg.cache_dir, cfg.eval_split = root, cache_dir, 'test'
  gathered = []

  def allgather(mine):
    other = mine.copy()
    other[0] ^= other_differs
    gathered.append(mine)
    return np.stack([mine, other])
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'process_allgather', allgather)
  if other_differs:
    with pytest.raises(UserError, match='loaded different data.*make the copies identical'):
      run_data.load(cfg, mesh_lib.make_data_mesh())
    return
  assert run_data.load(cfg, mesh_lib.make_data_mesh()).num_classes == len(CLASSES)
  assert len(gathered) == 1 and gathered[0].shape == (16,)
  # The hash covers the pixels: one changed pixel in one image changes what this process contributes.
  path = next(os.path.join(d, f) for d, _, files in sorted(os.walk(os.path.join(root, 'test'))) for f in sorted(files))
  image = np.asarray(Image.open(path)).copy()
  image[0, 0] = 255 - image[0, 0]
  Image.fromarray(image).save(path)
  run_data.load(cfg, mesh_lib.make_data_mesh())
  assert len(gathered) == 2 and not np.array_equal(gathered[0], gathered[1])
