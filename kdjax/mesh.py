"""The 1-D `data` mesh: parameters replicated, batches split over every device of every process.

This is today's form of data parallelism in JAX (`jax.jit` over `NamedSharding`s instead of `pmap`): XLA inserts
the gradient all-reduce, and BatchNorm statistics computed over the sharded batch axis are the global-batch
statistics, so no hand-written `pmean` exists anywhere.
"""
import os

import jax
from jax.sharding import NamedSharding, PartitionSpec

from kdjax.errors import UserError

DATA_AXIS = 'data'


EXPLICIT_VARIABLES = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def maybe_initialize_distributed() -> None:
  """Join a multi-process run when the environment says so; a single process does nothing.

  Either set `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` on every process, or launch under
  SLURM (`SLURM_NTASKS` > 1) or Open MPI (`OMPI_COMM_WORLD_SIZE` > 1), whose variables `jax.distributed.initialize()`
  reads itself. Must run before anything touches a JAX backend: the CPU client is built with the cross-process
  collectives chosen here, and without them a CPU run of several processes cannot all-reduce its gradients.
  """
  launched = any(_env_int(var, 1) > 1 for var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))
  named = [var for var in EXPLICIT_VARIABLES if os.environ.get(var)]
  # Without a launcher that tells JAX the rest, a partial set would let each process train alone into one workdir.
  if named and len(named) < len(EXPLICIT_VARIABLES) and not launched:
    missing = [var for var in EXPLICIT_VARIABLES if var not in named]
    raise UserError(f'{", ".join(named)} set but not {", ".join(missing)}: a multi-process run needs all of '
                    f'{", ".join(EXPLICIT_VARIABLES)} on every process (JAX_PROCESS_ID an integer from 0)')
  explicit = len(named) == len(EXPLICIT_VARIABLES) and _env_int('JAX_NUM_PROCESSES') > 1
  if not (explicit or launched):
    return
  if jax.config.jax_cpu_collectives_implementation is None:
    # Gloo over TCP: jax 0.10's default, unset in older releases; JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi still
    # picks MPI. GPUs and TPUs bring their own collectives and ignore this setting.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if explicit:
    jax.distributed.initialize(
        coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
        num_processes=_env_int('JAX_NUM_PROCESSES'),
        process_id=_env_int('JAX_PROCESS_ID'))
  else:
    jax.distributed.initialize()


def _env_int(name: str, default: int | None = None) -> int:
  """An integer environment variable of a multi-process launch; a missing or malformed one is a UserError."""
  text = os.environ.get(name, '')
  if not text and default is not None:
    return default
  try:
    return int(text)
  except ValueError:
    raise UserError(f'{name}={text!r}: a multi-process run needs JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and '
                    'JAX_PROCESS_ID (an integer from 0) set on every process') from None


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
