"""Batch augmentation in pure `jax.random`, meant to run inside the jitted train step on the accelerator.

Datasets are held as uint8 arrays; augmenting on device avoids a CPU input pipeline entirely (the host only gathers
uint8 batches). Every function takes a batch (N, H, W, C), samples per-example parameters from one key and keeps
static shapes, so it jits and vmaps. Functions that resample (resize, crops with a resize) turn uint8 input into
float32 in [0, 1]; float input keeps its scale. Crops and flips keep the dtype.

Train-time pipelines live in the `AUGMENTATIONS` registry, all with the signature
`pipeline(rng, images_uint8, *, image_size) -> float32 images in [0, 1]`; the caller normalises afterwards.
"""

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from kdjax.errors import UserError


def _as_float(images: jax.Array) -> jax.Array:
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def random_crop_with_padding(rng: jax.Array, images: jax.Array, *, padding: int = 4) -> jax.Array:
  """Zero-pads each side by `padding` and crops back to H x W at a random per-example offset (the CIFAR crop)."""
  n, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(rng, (n, 2), 0, 2 * padding + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def random_flip(rng: jax.Array, images: jax.Array) -> jax.Array:
  """Mirrors each image left-right with probability 1/2."""
  flip = jax.random.bernoulli(rng, 0.5, (images.shape[0],))
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def _crop_box(rng: jax.Array, height: int, width: int, scale, ratio, tries: int) -> jax.Array:
  """One (top, left, box_height, box_width) sampled like torchvision's RandomResizedCrop.get_params.

  torchvision retries up to 10 times in a loop; here all tries are sampled at once and the first valid one is
  taken, falling back, like torchvision, to the largest central crop whose aspect ratio lies within `ratio`.
  """
  area_key, ratio_key, top_key, left_key = jax.random.split(rng, 4)
  area = height * width * jax.random.uniform(area_key, (tries,), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(ratio_key, (tries,), minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
  box_w = jnp.round(jnp.sqrt(area * aspect))
  box_h = jnp.round(jnp.sqrt(area / aspect))
  valid = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
  top = jnp.floor(jax.random.uniform(top_key, (tries,)) * (height - box_h + 1))
  left = jnp.floor(jax.random.uniform(left_key, (tries,)) * (width - box_w + 1))
  first = jnp.argmax(valid)

  in_ratio = width / height
  if in_ratio < min(ratio):
    fallback_w, fallback_h = width, round(width / min(ratio))
  elif in_ratio > max(ratio):
    fallback_w, fallback_h = round(height * max(ratio)), height
  else:
    fallback_w, fallback_h = width, height
  fallback = jnp.array([(height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w], jnp.float32)
  sampled = jnp.stack([top[first], left[first], box_h[first], box_w[first]])
  return jnp.where(valid[first], sampled, fallback)


def _resize_box(image: jax.Array, box: jax.Array, size: int) -> jax.Array:
  """Bilinear (antialiased when shrinking) resize of the box (top, left, h, w) of one image to size x size."""
  top, left, box_h, box_w = box[0], box[1], box[2], box[3]
  scale = jnp.stack([size / box_h, size / box_w])
  translation = -jnp.stack([top, left]) * scale
  return jax.image.scale_and_translate(image, (size, size, image.shape[-1]), (0, 1), scale, translation, 'linear')


def random_resized_crop(rng: jax.Array, images: jax.Array, *, size: int, scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3), tries: int = 10) -> jax.Array:
  """Crops a random box per example (area fraction in `scale`, aspect in `ratio`) and resizes it to size x size."""
  n, height, width, _ = images.shape
  boxes = jax.vmap(lambda key: _crop_box(key, height, width, scale, ratio, tries))(jax.random.split(rng, n))
  return jax.vmap(lambda image, box: _resize_box(image, box, size))(_as_float(images), boxes)


def resize(images: jax.Array, size: int) -> jax.Array:
  """Bilinear resize (antialiased when shrinking) of the whole image to size x size, ignoring aspect ratio."""
  n, _, _, c = images.shape
  return jax.image.resize(_as_float(images), (n, size, size, c), 'linear')


def center_crop_resize(images: jax.Array, size: int, *, crop_fraction: float = 0.875) -> jax.Array:
  """ImageNet-style evaluation view: scale the short side to size / crop_fraction, then take the central size x size.

  Done as one `scale_and_translate`, so no intermediate image is materialised.
  """
  n, height, width, c = images.shape
  factor = size / crop_fraction / min(height, width)
  scale = jnp.array([factor, factor])
  translation = jnp.array([size / 2 - factor * height / 2, size / 2 - factor * width / 2])
  return jax.image.scale_and_translate(_as_float(images), (n, size, size, c), (1, 2), scale, translation, 'linear')


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """(x - mean) / std per channel, with x = images / 255 for uint8 input and x = images for float input in [0, 1]."""
  return (_as_float(images) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def eval_transform(images: jax.Array, *, image_size: int) -> jax.Array:
  """The evaluation view: float32 in [0, 1], plainly resized to image_size if stored at another size.

  A plain resize rather than `center_crop_resize`, because kdjax stores datasets as square images at (or near) the
  training size (CIFAR 32, Imagenette 224 or 128), where an extra centre crop would only discard border content that
  the model saw during training.
  """
  if images.shape[1:3] == (image_size, image_size):
    return _as_float(images)
  return resize(images, image_size)


def _none(rng, images, *, image_size):
  del rng
  return eval_transform(images, image_size=image_size)


def _flip(rng, images, *, image_size):
  return random_flip(rng, eval_transform(images, image_size=image_size))


def _crop_flip(rng, images, *, image_size):
  crop_key, flip_key = jax.random.split(rng)
  return random_flip(flip_key, random_crop_with_padding(crop_key, eval_transform(images, image_size=image_size)))


def _random_resized_crop(rng, images, *, image_size):
  crop_key, flip_key = jax.random.split(rng)
  return random_flip(flip_key, random_resized_crop(crop_key, images, size=image_size))


# Train-time pipelines by config name (data.augment): pipeline(rng, images_uint8, *, image_size) -> [0, 1] float32.
AUGMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    'none': _none,
    'flip': _flip,
    'crop_flip': _crop_flip,  # CIFAR recipe: pad 4, random 32x32 crop, flip.
    'random_resized_crop': _random_resized_crop,  # ImageNet recipe: RandomResizedCrop to image_size, flip.
}


def get_augmentation(name: str) -> Callable[..., jax.Array]:
  """The named train-time pipeline; an unknown name is a UserError listing the known ones."""
  if name not in AUGMENTATIONS:
    raise UserError(f'unknown augmentation {name!r} (config key data.augment); use one of {", ".join(AUGMENTATIONS)}')
  return AUGMENTATIONS[name]
