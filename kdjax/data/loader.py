"""Device-resident datasets: the whole split lives on the devices, batches are gathered there.

Small and medium datasets (CIFAR, MNIST, Imagenette at 128-224 px) fit in device memory, so the input pipeline is
one gather per step on the device: no host decoding, no host-to-device copy per step, nothing for the accelerator
to wait on. The order of examples is a function of (seed, epoch) only, so a resumed run sees the same batches as an
uninterrupted one.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import mesh as mesh_lib


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The training order of one epoch: deterministic in (seed, epoch), independent of the device count."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int32)


@functools.partial(jax.jit, static_argnames=('batch_size',))
def _gather(images, labels, order, index, *, batch_size):
  rows = jax.lax.dynamic_slice_in_dim(order, index * batch_size, batch_size)
  return {'image': images[rows], 'label': labels[rows], 'index': rows}


@dataclasses.dataclass
class ResidentDataset:
  """A split's uint8 images and int32 labels, replicated on every device of the mesh."""
  images: jax.Array
  labels: jax.Array
  num_examples: int
  mesh: jax.sharding.Mesh

  @classmethod
  def from_arrays(cls, images: np.ndarray, labels: np.ndarray, mesh) -> 'ResidentDataset':
    return cls(images=mesh_lib.replicate(images, mesh), labels=mesh_lib.replicate(labels.astype(np.int32), mesh),
               num_examples=len(labels), mesh=mesh)

  def steps_per_epoch(self, batch_size: int) -> int:
    """Full batches per epoch; the remainder of the shuffled order is dropped (a different remainder each epoch)."""
    return self.num_examples // batch_size

  def epoch_order(self, seed: int, epoch: int) -> jax.Array:
    return jax.device_put(epoch_permutation(seed, epoch, self.num_examples), mesh_lib.replicated(self.mesh))

  def train_batch(self, order: jax.Array, index: int, batch_size: int) -> dict[str, jax.Array]:
    """Batch `index` of an epoch's order, sharded over the data axis."""
    batch = _gather(self.images, self.labels, order, jnp.int32(index), batch_size=batch_size)
    return jax.device_put(batch, mesh_lib.batch_sharded(self.mesh))

  def eval_batches(self, batch_size: int):
    """Every example once, in order; the last batch is padded and masked so its shape stays static."""
    sharding = mesh_lib.batch_sharded(self.mesh)
    for start in range(0, self.num_examples, batch_size):
      rows = np.arange(start, start + batch_size)
      mask = rows < self.num_examples
      rows = np.where(mask, rows, 0).astype(np.int32)
      batch = _gather(self.images, self.labels, jnp.asarray(rows), jnp.int32(0), batch_size=batch_size)
      batch['mask'] = jnp.asarray(mask)
      yield jax.device_put(batch, sharding)
