"""Several devices: data parallelism and sequence parallelism on ``jax.sharding`` meshes.

rnnjax places work on a :class:`jax.sharding.Mesh` with JAX's ``jit`` shardings and
``jax.shard_map``; it brings no distributed engine of its own.

- Data parallelism (:mod:`rnnjax.distributed.data`): ``rj.train.make_train_step(...,
  mesh=mesh)`` or the :func:`data_parallel` context split the batch over a mesh axis.
- Sequence parallelism (:mod:`rnnjax.distributed.sequence`): :func:`sequence_scan` splits
  one long sequence over a mesh axis along time.

On a multi-core CPU the devices are host devices: call :func:`use_cpu_cores` at the top of
the script (it sets ``jax_num_cpu_devices`` before JAX starts; rnnjax never sets it on
import) and pass ``mesh="local"`` to ``rj.train.make_train_step``.
Across hosts, call ``jax.distributed.initialize()`` first; a mesh over ``jax.devices()`` then
spans every process and :func:`shard_batch` assembles each process's local rows.
"""

from rnnjax.distributed.cores import cpu_core_count, use_cpu_cores
from rnnjax.distributed.sequence import sequence_scan
from rnnjax.sharding.data import (
    DataParallel,
    batch_shardings,
    check_batch,
    current_data_parallel,
    data_parallel,
    replicate,
    shard_batch,
    split_batch,
    state_shardings,
)
from rnnjax.sharding.mesh import SequenceSharding, check_mesh_axis

__all__ = [
    "use_cpu_cores",
    "cpu_core_count",
    "data_parallel",
    "current_data_parallel",
    "shard_batch",
    "replicate",
    "batch_shardings",
    "state_shardings",
    "check_mesh_axis",
    "check_batch",
    "sequence_scan",
    "SequenceSharding",
    "DataParallel",
    "split_batch",
]
