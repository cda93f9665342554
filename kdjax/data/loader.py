"""Device-resident datasets: the whole split lives on the devices, batches are gathered there.

Small and medium datasets (CIFAR, MNIST, Imagenette at 128-224 px) fit in device memory, so the input pipeline is
one gather per step on the device: no host decoding, no host-to-device copy per step, nothing for the accelerator
to wait on. The order of examples is a function of (seed, epoch) only, so a resumed run sees the same batches as an
uninterrupted one.

Multi-process runs (`jax.distributed`): every process loads the whole split and places it on each of its own
devices, and every process computes the same global order with numpy. A batch is sharded over the `data` axis and
each device gathers only its own rows from its local copy, so a process materialises only its addressable shards
and feeding a step needs no communication between processes. The price is memory: every device (of every process)
holds the full split. Sharding the split itself would turn each step's gather into an all-to-all between hosts,
because a random global permutation sends any example to any device.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import mesh as mesh_lib


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The training order of one epoch: deterministic in (seed, epoch), independent of the device and process count."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int32)


def _take(table, rows, sharding):
  """table[rows] laid out like `rows`: with `rows` sharded and `table` replicated, each device gathers its own rows."""
  return jax.lax.with_sharding_constraint(table[rows], sharding)


def gather_batch(images, labels, order, index, *, batch_size, sharding) -> dict[str, jax.Array]:
  """Batch `index` of `order` from the resident split, sharded over the data axis; traceable (the train program
  calls it inside its loop, so gathering a batch costs no dispatch of its own).

  The slice of the (replicated) order is split over the data axis before the gather, so no device gathers rows that
  another device (or process) owns, and nothing crosses a process boundary.
  """
  rows = jax.lax.with_sharding_constraint(jax.lax.dynamic_slice_in_dim(order, index * batch_size, batch_size),
                                         sharding)
  return {'image': _take(images, rows, sharding), 'label': _take(labels, rows, sharding), 'index': rows}


_gather = jax.jit(gather_batch, static_argnames=('batch_size', 'sharding'))


@dataclasses.dataclass
class ResidentDataset:
  """A split's uint8 images and int32 labels, replicated on every device of the mesh (of every process)."""
  images: jax.Array
  labels: jax.Array
  num_examples: int
  mesh: jax.sharding.Mesh

  @classmethod
  def from_arrays(cls, images: np.ndarray, labels: np.ndarray, mesh) -> 'ResidentDataset':
    """Every process passes the same arrays (each loads the split itself); each places them on its devices."""
    replicated = mesh_lib.replicated(mesh)
    return cls(images=mesh_lib.host_to_mesh(np.asarray(images), replicated),
               labels=mesh_lib.host_to_mesh(np.asarray(labels, dtype=np.int32), replicated),
               num_examples=len(labels), mesh=mesh)

  def steps_per_epoch(self, batch_size: int) -> int:
    """Full batches per epoch; the remainder of the shuffled order is dropped (a different remainder each epoch)."""
    return self.num_examples // batch_size

  def epoch_order(self, seed: int, epoch: int) -> jax.Array:
    """The epoch's order on every device: one copy per epoch, then each step slices it on the device."""
    return mesh_lib.host_to_mesh(epoch_permutation(seed, epoch, self.num_examples), mesh_lib.replicated(self.mesh))

  def train_batch(self, order: jax.Array, index: int, batch_size: int) -> dict[str, jax.Array]:
    """Batch `index` of an epoch's order, sharded over the data axis."""
    return _gather(self.images, self.labels, order, jnp.int32(index), batch_size=batch_size,
                   sharding=mesh_lib.batch_sharded(self.mesh))

  def num_eval_batches(self, batch_size: int) -> int:
    """Batches of `eval_batch` that cover every example once (the last one padded and masked)."""
    return -(-self.num_examples // batch_size)


def eval_batch(images, labels, index, *, batch_size, sharding) -> dict[str, jax.Array]:
  """Batch `index` of the split in order, sharded over the data axis, with a mask of the real rows; traceable.

  Rows past the end (the last batch's padding) read row 0 and are masked out, so every batch has one static shape.
  The rows are computed on the devices from `index` (a device scalar), so an eval batch costs no host transfer.
  """
  rows = jax.lax.with_sharding_constraint(index * batch_size + jnp.arange(batch_size, dtype=jnp.int32), sharding)
  mask = rows < images.shape[0]
  rows = jnp.where(mask, rows, 0)
  return {'image': _take(images, rows, sharding), 'label': _take(labels, rows, sharding), 'mask': mask}
