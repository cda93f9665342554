"""The 1-D `data` mesh: parameters replicated, batches split over every device of every process.

This is today's form of data parallelism in JAX (`jax.jit` over `NamedSharding`s instead of `pmap`): XLA inserts
the gradient all-reduce, and BatchNorm statistics computed over the sharded batch axis are the global-batch
statistics, so no hand-written `pmean` exists anywhere.
"""
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from kdjax.errors import UserError

DATA_AXIS = 'data'


EXPLICIT_VARIABLES = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def maybe_initialize_distributed() -> None:
  """Join a multi-process run when the environment says so; a single process does nothing.

  Either set `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` on every process, or launch
  several tasks with SLURM's `srun` or Open MPI's `mpirun`, whose variables `jax.distributed.initialize()` reads
  itself. Must run before anything touches a JAX backend: the CPU client is built with the cross-process
  collectives chosen here, and without them a CPU run of several processes cannot all-reduce its gradients.
  """
  launched = _launcher()
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
  try:
    if explicit:
      jax.distributed.initialize(
          coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
          num_processes=_env_int('JAX_NUM_PROCESSES'),
          process_id=_env_int('JAX_PROCESS_ID'))
    else:
      jax.distributed.initialize()
  except ValueError as error:  # JAX's word for a launch it cannot read
    raise UserError(f'could not join the multi-process run ({error}); set JAX_COORDINATOR_ADDRESS (host:port of '
                    'process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process') from None


# What `jax.distributed.initialize()` itself needs to read a launch (its SLURM and Open MPI cluster detection).
_SLURM_STEP = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID')


def _launcher() -> bool:
  """Whether srun or mpirun started this process as one of several.

  `SLURM_NTASKS` > 1 alone is an allocation (`salloc -n 4`), not a launch: a `python main.py` typed in its shell
  is one process, and runs as one. Open MPI 5 no longer sets the variable JAX finds its coordinator by, so a launch
  by it needs the explicit variables."""
  if _env_int('SLURM_NTASKS', 1) > 1 and all(var in os.environ for var in _SLURM_STEP):
    return True
  if _env_int('OMPI_COMM_WORLD_SIZE', 1) > 1:
    if 'OMPI_MCA_orte_hnp_uri' not in os.environ and not all(os.environ.get(v) for v in EXPLICIT_VARIABLES):
      raise UserError('launched by Open MPI without OMPI_MCA_orte_hnp_uri (Open MPI 5), which JAX needs to find its '
                      'coordinator: set JAX_COORDINATOR_ADDRESS=<host of rank 0>:<free port>, '
                      'JAX_NUM_PROCESSES=$OMPI_COMM_WORLD_SIZE and JAX_PROCESS_ID=$OMPI_COMM_WORLD_RANK')
    return 'OMPI_MCA_orte_hnp_uri' in os.environ
  return False


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


def host_to_mesh(value: np.ndarray, sharding) -> jax.Array:
  """A global array from a host array every process holds whole: each process fills only its own devices.

  `make_array_from_callback` asks this process for its addressable shards only, which is what multi-process
  placement needs; in one process it is a plain host-to-device copy.
  """
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicate(tree, mesh):
  """Place a pytree of host or device arrays, the same on every process, on every device of the mesh.

  In one process this is `jax.device_put`. Across processes `jax.device_put` of a process-local value checks that
  every process passed the same one by gathering the whole value from every process: for a teacher-output table of
  gigabytes, that many gigabytes per process on every host. Each process fills its own devices instead.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def place(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # already global
      return jax.device_put(leaf, sharding)
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      # A typed key (a dropout layer's RNG state) has no NumPy form: place its raw data, then wrap it again.
      return jax.random.wrap_key_data(place(jax.random.key_data(leaf)), impl=jax.random.key_impl(leaf))
    return host_to_mesh(np.asarray(leaf), sharding)
  return jax.tree.map(place, tree)


def same_everywhere(digest: bytes) -> bool:
  """Whether every process holds the same `digest` (a fixed-length hash of something each process made itself)."""
  if jax.process_count() == 1:
    return True
  rows = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest, np.uint8)))
  return bool((rows == rows[0]).all())


def all_processes(ok: bool) -> bool:
  """True when `ok` holds in every process: a decision that leads to collectives (restore this checkpoint, load
  or build a table) must be the same everywhere, or the processes' programs pair up wrongly and hang."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
