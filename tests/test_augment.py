"""Tests for kdjax.data.augment: shapes under jit, exact crop/flip semantics, determinism in the key."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.data import augment
from kdjax.errors import UserError


def _images(n=6, size=12, channels=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(1, 256, (n, size, size, channels), dtype=np.uint8))


@pytest.mark.parametrize('name', sorted(augment.AUGMENTATIONS))
@pytest.mark.parametrize('image_size', [12, 8])
def test_pipelines_under_jit(name, image_size):
  pipeline = jax.jit(functools.partial(augment.AUGMENTATIONS[name], image_size=image_size))
  out = pipeline(jax.random.key(0), _images())
  assert out.shape == (6, image_size, image_size, 3) and out.dtype == jnp.float32
  assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_unknown_augmentation_lists_names():
  with pytest.raises(UserError, match='crop_flip'):
    augment.get_augmentation('cutmix')
  assert augment.get_augmentation('flip') is augment.AUGMENTATIONS['flip']


def test_crop_of_constant_image_has_zeros_only_at_borders():
  images = jnp.full((16, 8, 8, 1), 7, jnp.uint8)
  out = np.asarray(jax.jit(augment.random_crop_with_padding)(jax.random.key(1), images))
  assert out.shape == images.shape and out.dtype == np.uint8
  for image in out[..., 0]:
    rows = np.flatnonzero(image.any(axis=1))
    cols = np.flatnonzero(image.any(axis=0))
    # The non-zero part is one 7-valued rectangle that touches the crop window's edge on each axis.
    assert np.all(image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] == 7)
    assert (rows[0] == 0 or rows[-1] == 7) and (cols[0] == 0 or cols[-1] == 7)
    assert len(rows) >= 4 and len(cols) >= 4  # Shifted by at most padding=4.
  assert len({out[i].tobytes() for i in range(16)}) > 1, 'offsets should differ per example'


def test_crop_equals_a_numpy_crop_at_one_offset():
  images = _images(n=3, size=10)
  crop = jax.jit(functools.partial(augment.random_crop_with_padding, padding=3))
  out = np.asarray(crop(jax.random.key(2), images))
  padded = np.pad(np.asarray(images), ((0, 0), (3, 3), (3, 3), (0, 0)))
  for k in range(3):
    matches = [(y, x) for y in range(7) for x in range(7) if np.array_equal(padded[k, y:y + 10, x:x + 10], out[k])]
    assert len(matches) == 1


def test_flip_is_mirror_or_identity_per_example():
  images = _images(n=32)
  out = np.asarray(jax.jit(augment.random_flip)(jax.random.key(3), images))
  mirrored = [np.array_equal(o, np.asarray(i)[:, ::-1]) for o, i in zip(out, images)]
  same = [np.array_equal(o, np.asarray(i)) for o, i in zip(out, images)]
  assert all(m or s for m, s in zip(mirrored, same))
  assert 0 < sum(mirrored) < 32


def test_random_resized_crop_shape_and_range():
  images = _images(n=8, size=20)
  crop = jax.jit(functools.partial(augment.random_resized_crop, size=7))
  out = crop(jax.random.key(4), images)
  assert out.shape == (8, 7, 7, 3) and out.dtype == jnp.float32
  assert float(out.min()) >= float(images.min()) / 255 - 1e-6
  assert float(out.max()) <= float(images.max()) / 255 + 1e-6


def test_random_resized_crop_of_whole_image_is_a_resize():
  # scale=(1, 1) and ratio=(1, 1) force the whole (square) image as the box.
  images = _images(n=2, size=16)
  crop = jax.jit(functools.partial(augment.random_resized_crop, size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0)))
  out = crop(jax.random.key(5), images)
  np.testing.assert_allclose(out, augment.resize(images, 8), atol=1e-5)


def test_random_resized_crop_falls_back_to_a_central_crop():
  # An impossible area (more than the image) leaves no valid try: the fallback is the full image (ratio 1 allowed).
  images = _images(n=2, size=16)
  crop = jax.jit(functools.partial(augment.random_resized_crop, size=16, scale=(2.0, 3.0), ratio=(0.5, 2.0)))
  out = crop(jax.random.key(6), images)
  np.testing.assert_allclose(out, np.asarray(images) / 255, atol=1e-5)


@pytest.mark.parametrize('fn', [
    augment.random_flip, augment.random_crop_with_padding,
    functools.partial(augment.random_resized_crop, size=8),
    functools.partial(augment.AUGMENTATIONS['crop_flip'], image_size=12),
])
def test_same_key_same_output_other_key_other_output(fn):
  images = _images(n=16)
  fn = jax.jit(fn)
  first = np.asarray(fn(jax.random.key(7), images))
  np.testing.assert_array_equal(first, np.asarray(fn(jax.random.key(7), images)))
  assert not np.array_equal(first, np.asarray(fn(jax.random.key(8), images)))


def test_eval_transform_and_resizes():
  images = _images(n=2, size=12)
  np.testing.assert_allclose(augment.eval_transform(images, image_size=12), np.asarray(images) / 255, rtol=1e-6)
  assert augment.eval_transform(images, image_size=6).shape == (2, 6, 6, 3)
  constant = jnp.full((1, 16, 12, 3), 51, jnp.uint8)
  out = jax.jit(functools.partial(augment.center_crop_resize, size=7))(constant)
  assert out.shape == (1, 7, 7, 3)
  np.testing.assert_allclose(out, 0.2, atol=1e-5)


def test_normalize_closed_form():
  images = jnp.asarray(np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3) * 10)
  mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
  expected = (np.asarray(images, np.float32) / 255 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(augment.normalize(images, mean, std), expected, rtol=1e-6, atol=1e-6)
  # Float input is taken as already in [0, 1] (the pipelines' output).
  np.testing.assert_allclose(augment.normalize(np.asarray(images) / 255.0, mean, std), expected, rtol=1e-6,
                             atol=1e-6)
