"""Multi-process start-up and the mapping from processes to the data they load.

Launch one process per host (or per GPU); every process runs the same command:

    # SLURM: detected automatically
    srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 python -m cosmos_jax.train --config ...
    # anything else: tell each process the coordinator (process 0's host:port), the count and its id
    JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i python -m cosmos_jax.train ...

Data: a global batch array is sharded over the mesh's batch axes (data x fsdp). Processes whose devices hold the
same batch rows (e.g. a context-parallel group spread over two hosts) must load the same samples, so each process
reads the shard of its *data rank*, not of its process index.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize() -> bool:
    """`jax.distributed.initialize()` when launched as several processes; True if it ran.

    Multi-process means: JAX_NUM_PROCESSES > 1 (with JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID), or a SLURM job
    step with more than one task, or Open MPI's launcher. A single plain process is left alone.
    """
    if jax.distributed.is_initialized():
        return True
    n = os.environ.get("JAX_NUM_PROCESSES")
    if n is not None:
        missing = [k for k in _ENV if not os.environ.get(k)]
        if missing:
            raise ValueError(f"multi-process launch: JAX_NUM_PROCESSES is set but {', '.join(missing)} is not")
        if int(n) <= 1:
            return False
        jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(n), process_id=int(os.environ["JAX_PROCESS_ID"]))
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "OMPI_MCA_orte_hnp_uri" in os.environ:
        jax.distributed.initialize()
        return True
    return False


@dataclasses.dataclass(frozen=True)
class DataShard:
    """Which part of the global batch this process loads."""
    rank: int         # index of this process's batch slice
    count: int        # number of distinct batch slices over all processes
    local_batch: int  # samples this process loads per step


def batch_axes(mesh) -> tuple[str, ...]:
    """Mesh axes the batch dimension is split over (the `activation_batch` rule)."""
    return tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    """Sharding of a [B, ...] batch array: rows over the batch axes, replicated over the rest."""
    return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


def data_shard(mesh, global_batch: int) -> DataShard:
    """This process's slice of the global batch; an error when the batch does not split over the mesh."""
    n = int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))
    if global_batch % n:
        raise ValueError(f"data.batch_size={global_batch} is not divisible by mesh data x fsdp = {n}; use "
                         "mesh.context for single-sample steps, or a batch that splits over the batch axes")
    index_map = batch_sharding(mesh, 1).devices_indices_map((global_batch,))
    rows = sorted({(s[0].start or 0, s[0].stop or global_batch) for d, s in index_map.items()
                   if d.process_index == jax.process_index()})
    start, stop = rows[0][0], rows[-1][1]
    if any(a[1] != b[0] for a, b in zip(rows, rows[1:])):
        raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {rows}")
    local = stop - start
    return DataShard(rank=start // local, count=global_batch // local, local_batch=local)


def global_batch_array(local: np.ndarray, mesh, global_batch: int) -> jax.Array:
    """This process's rows -> one global array sharded over the batch axes."""
    sharding = batch_sharding(mesh, local.ndim)
    return jax.make_array_from_process_local_data(sharding, local, (global_batch,) + local.shape[1:])
