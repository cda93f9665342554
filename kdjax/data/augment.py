"""Batch augmentation in pure `jax.random`, meant to run inside the jitted train step on the accelerator.

Datasets are held as uint8 arrays; augmenting on device avoids a CPU input pipeline entirely (the host only gathers
uint8 batches). Every function takes a batch (N, H, W, C), samples per-example parameters from one key and keeps
static shapes, so it jits and vmaps. Functions that resample (resize, crops with a resize) turn uint8 input into
float32 in [0, 1]; float input keeps its scale. Crops and flips keep the dtype.

Train-time pipelines live in the `AUGMENTATIONS` registry, all with the signature
`pipeline(rng, images_uint8, *, image_size) -> float32 images in [0, 1]`; the caller normalises afterwards.
Pipelines whose random choice per example is one of finitely many views (flips, integer translations) are
`DiscreteAugmentation`s: they first sample a view id per example, then apply it. That split is what lets the
teacher's outputs be computed once per (example, view) and looked up (`kdjax.teacher_cache`), and it makes the
lookup exact by construction: the step and the cache apply views with the same function.
"""

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from kdjax.errors import UserError


def _as_float(images: jax.Array) -> jax.Array:
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def crop_with_padding(images: jax.Array, offsets: jax.Array, *, padding: int = 4) -> jax.Array:
  """Zero-pads each side by `padding` and crops back to H x W at the given per-example (row, column) offsets."""
  n, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def flip_where(images: jax.Array, flip: jax.Array) -> jax.Array:
  """Mirrors left-right the examples where `flip` (a boolean per example) is true."""
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def _crop_offsets(rng: jax.Array, n: int, padding: int) -> jax.Array:
  return jax.random.randint(rng, (n, 2), 0, 2 * padding + 1)


def _flip_draws(rng: jax.Array, n: int) -> jax.Array:
  return jax.random.bernoulli(rng, 0.5, (n,))


def random_crop_with_padding(rng: jax.Array, images: jax.Array, *, padding: int = 4) -> jax.Array:
  """Zero-pads each side by `padding` and crops back to H x W at a random per-example offset (the CIFAR crop)."""
  return crop_with_padding(images, _crop_offsets(rng, images.shape[0], padding), padding=padding)


def random_flip(rng: jax.Array, images: jax.Array) -> jax.Array:
  """Mirrors each image left-right with probability 1/2."""
  return flip_where(images, _flip_draws(rng, images.shape[0]))


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


@dataclasses.dataclass(frozen=True)
class DiscreteAugmentation:
  """A pipeline whose per-example choice is one of `num_views` views: `sample` draws view ids, `apply` renders them.

  `__call__` is the train-time pipeline (sample with the step's key, then apply), so a step that looks up cached
  teacher outputs by `sample(rng, n)` gets exactly the views its student sees.
  """
  num_views: int
  sample: Callable[[jax.Array, int], jax.Array]          # (rng, n) -> int32 view ids in [0, num_views)
  apply: Callable[[jax.Array, jax.Array], jax.Array]     # (images at image_size in [0, 1], view ids) -> images

  def __call__(self, rng, images, *, image_size):
    return self.apply(eval_transform(images, image_size=image_size), self.sample(rng, images.shape[0]))


def _one_view(rng, n):
  del rng
  return jnp.zeros((n,), jnp.int32)


def _flip_views(rng, n):
  return _flip_draws(rng, n).astype(jnp.int32)


_PADDING = 4  # the CIFAR recipe's crop: pad 4, crop back; 9 x 9 offsets x 2 flips = 162 views


def _crop_flip_views(rng, n):
  """View id = (row offset * 9 + column offset) * 2 + flip, drawn as the CIFAR crop-and-flip draws them."""
  crop_key, flip_key = jax.random.split(rng)
  offsets = _crop_offsets(crop_key, n, _PADDING)
  return (offsets[:, 0] * (2 * _PADDING + 1) + offsets[:, 1]) * 2 + _flip_draws(flip_key, n).astype(jnp.int32)


def _apply_crop_flip(images, views):
  position, flip = views // 2, views % 2 == 1
  offsets = jnp.stack([position // (2 * _PADDING + 1), position % (2 * _PADDING + 1)], axis=-1)
  return flip_where(crop_with_padding(images, offsets, padding=_PADDING), flip)


def _random_resized_crop(rng, images, *, image_size):
  crop_key, flip_key = jax.random.split(rng)
  return random_flip(flip_key, random_resized_crop(crop_key, images, size=image_size))


# Train-time pipelines by config name (data.augment): pipeline(rng, images_uint8, *, image_size) -> [0, 1] float32.
AUGMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    'none': DiscreteAugmentation(1, _one_view, lambda images, views: images),
    'flip': DiscreteAugmentation(2, _flip_views, lambda images, views: flip_where(images, views == 1)),
    # CIFAR recipe: pad 4, random 32x32 crop, flip.
    'crop_flip': DiscreteAugmentation((2 * _PADDING + 1) ** 2 * 2, _crop_flip_views, _apply_crop_flip),
    # ImageNet recipe: RandomResizedCrop to image_size, flip. Continuous boxes: no finite set of views.
    'random_resized_crop': _random_resized_crop,
}


def get_augmentation(name: str) -> Callable[..., jax.Array]:
  """The named train-time pipeline; an unknown name is a UserError listing the known ones."""
  if name not in AUGMENTATIONS:
    raise UserError(f'unknown augmentation {name!r} (config key data.augment); use one of {", ".join(AUGMENTATIONS)}')
  return AUGMENTATIONS[name]
