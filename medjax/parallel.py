"""Meshes, shardings and multi-host set-up: the one home of device placement.

Batches are split over the mesh's ``"data"`` axis; parameters and optimizer state are replicated.
On many hosts, call `initialize_distributed()` first; each process then feeds its own slice of every
global batch and `global_batch` assembles the global `jax.Array`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` when the environment describes a multi-process job.

    Cloud TPU pods and SLURM/Open MPI clusters are detected by JAX itself; `JAX_COORDINATOR_ADDRESS`
    (with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`) covers hand-made clusters. One process: no-op.
    """
    markers = (
        "JAX_COORDINATOR_ADDRESS",
        "TPU_WORKER_HOSTNAMES",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
    )
    if any(os.environ.get(m) for m in markers) and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D data-parallel mesh over the first `num_devices` devices (all when None).

    The axis is `AxisType.Auto` on purpose: jit with explicit in/out shardings, GSPMD inside.
    """
    devices = jax.devices()
    n = len(devices) if not num_devices else int(num_devices)
    if n > len(devices):
        raise ValueError(f"config asks for {n} devices but only {len(devices)} are visible")
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, step, key)."""
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis; the rest unsplit."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch_size") -> int:
    """Returns the per-process batch size; raises when the global size does not divide evenly."""
    n_dev = mesh.devices.size
    if global_batch_size % n_dev:
        raise ValueError(
            f"config.{what}={global_batch_size} must be a multiple of the {n_dev} devices "
            "in the mesh"
        )
    return global_batch_size // jax.process_count()


def process_slice(global_batch_size: int) -> slice:
    """The rows of a global batch that this process feeds."""
    local = global_batch_size // jax.process_count()
    start = jax.process_index() * local
    return slice(start, start + local)


def global_batch(local: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global `jax.Array`s sharded over the data axis."""
    sharding = data_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def state_sharding(abstract_state: Any, mesh: Mesh) -> Any:
    """Sharding pytree for a train state: everything replicated (data parallelism)."""
    rep = replicated(mesh)
    return jax.tree.map(lambda _: rep, abstract_state)
