"""The 1-D `data` mesh: parameters replicated, batches split over every device of every process.

This is today's form of data parallelism in JAX (`jax.jit` over `NamedSharding`s instead of `pmap`): XLA inserts
the gradient all-reduce, and BatchNorm statistics computed over the sharded batch axis are the global-batch
statistics, so no hand-written `pmean` exists anywhere.
"""
import os

import jax
from jax.sharding import NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def maybe_initialize_distributed() -> None:
  """Join a multi-process run when the usual environment says so (`jax.distributed` reads it).

  Set `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (or run under SLURM / Open MPI, which
  `jax.distributed.initialize()` detects itself). A single process does nothing.
  """
  if os.environ.get('JAX_COORDINATOR_ADDRESS') and int(os.environ.get('JAX_NUM_PROCESSES', '1')) > 1:
    jax.distributed.initialize(
        coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(os.environ['JAX_NUM_PROCESSES']),
        process_id=int(os.environ['JAX_PROCESS_ID']))


def make_data_mesh() -> jax.sharding.Mesh:
  # Auto axes: shardings propagate from the step's inputs (GSPMD). Explicit axes (the default of
  # `jax.make_mesh`) would make every vmap over a sharded batch and a replicated key array an error.
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree, mesh):
  """Place a pytree of host or device arrays on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
