"""Meshes, shardings and multi-host set-up: the one home of device placement.

The mesh has two axes: ``"data"`` and ``"fsdp"`` (size `config.fsdp`, 1 by default). Batches
are split over both; parameters and optimizer state are replicated, or, with `fsdp > 1`, each
large array is split along one of its dimensions over ``"fsdp"`` (ZeRO-3 / FSDP style: XLA
gathers the weights for the forward pass and reduce-scatters the gradients). The same config
runs data-parallel or sharded by changing only `fsdp`.

On many hosts, call `initialize_distributed()` first; each process then feeds its own rows of
every global batch and `global_batch` assembles the global `jax.Array`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medjax.errors import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # a batch is split over every device
# Arrays smaller than this stay replicated under FSDP (biases, norms: gathering costs more).
FSDP_MIN_SIZE = 2**14


def _env_int(*names: str) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise ValueError(f"environment variable {n}={v!r} is not an integer") from None
    return None


def cluster_from_env() -> dict[str, Any] | None:
    """The multi-process job this process belongs to, from its environment, or None (one
    process).

    - explicit (any machine): `MEDJAX_COORDINATOR` or `JAX_COORDINATOR_ADDRESS` (host:port of
      process 0) with `MEDJAX_NUM_PROCESSES`/`JAX_NUM_PROCESSES` and
      `MEDJAX_PROCESS_ID`/`JAX_PROCESS_ID` -> those arguments;
    - Kubernetes indexed jobs / torchrun-style launchers: `MASTER_ADDR`, `MASTER_PORT`,
      `WORLD_SIZE` and `RANK` (or `JOB_COMPLETION_INDEX`) -> the same arguments;
    - TPU VMs of a pod slice, Slurm with more than one task, Open MPI: `{}`, and JAX's own
      cluster detection fills everything in.
    """
    coordinator = os.environ.get("MEDJAX_COORDINATOR") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = _env_int("MEDJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES")
    pid = _env_int("MEDJAX_PROCESS_ID", "JAX_PROCESS_ID")
    if not coordinator and os.environ.get("MASTER_ADDR") and _env_int("WORLD_SIZE"):
        coordinator = f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '29500')}"
        num = _env_int("WORLD_SIZE")
        pid = _env_int("RANK", "JOB_COMPLETION_INDEX")
    if coordinator:
        if num is None or pid is None:
            raise ValueError(
                f"coordinator {coordinator} is set but the number of processes and this "
                "process's id are not: set MEDJAX_NUM_PROCESSES and MEDJAX_PROCESS_ID (or pass "
                "--num_processes and --process_id)"
            )
        return {"coordinator_address": coordinator, "num_processes": num, "process_id": pid}
    if (
        (_env_int("SLURM_NTASKS") or 1) > 1
        or (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
        or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")
    ):
        return {}
    return None


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins the multi-process job when there is one; returns whether this is a multi-process run.

    Explicit arguments (the CLI's `--coordinator/--num_processes/--process_id`) win over the
    environment (`cluster_from_env`). Must run before the first JAX computation. On the CPU,
    cross-process collectives go through gloo (the CPU backend has no other). Calling it again
    is a no-op.
    """
    if jax.distributed.is_initialized():
        return True
    if coordinator or num_processes is not None or process_id is not None:
        if not coordinator or num_processes is None or process_id is None:
            raise ValueError(
                "a multi-process launch needs all three of --coordinator HOST:PORT, "
                "--num_processes N and --process_id I"
            )
        args: dict[str, Any] | None = {
            "coordinator_address": coordinator,
            "num_processes": int(num_processes),
            "process_id": int(process_id),
        }
    else:
        args = cluster_from_env()
    if args is None:
        return False
    if args and args["num_processes"] == 1:
        return False
    if args and not 0 <= args["process_id"] < args["num_processes"]:
        raise ValueError(f"process id {args['process_id']} is not in [0, {args['num_processes']})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**args)
    return True


def make_mesh(num_devices: int | None = None, fsdp: int = 1) -> Mesh:
    """A `("data", "fsdp")` mesh over the first `num_devices` devices (all when None or 0);
    `fsdp` devices share each parameter shard group, `num_devices // fsdp` groups hold replicas.

    The axes are `AxisType.Auto` on purpose: jit with explicit in/out shardings, GSPMD inside.
    """
    devices = jax.devices()
    n = len(devices) if not num_devices else int(num_devices)
    fsdp = int(fsdp or 1)
    if n > len(devices):
        raise ValueError(f"config asks for {n} devices but only {len(devices)} are visible")
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"config.fsdp={fsdp} must be >= 1 and divide the {n} devices")
    return jax.make_mesh(
        (n // fsdp, fsdp),
        BATCH_AXES,
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices[:n],
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, step, key)."""
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh, batch_dim: int = 0) -> NamedSharding:
    """Axis `batch_dim` (the batch) split over every device of the mesh; the rest unsplit."""
    return NamedSharding(mesh, P(*([None] * batch_dim), BATCH_AXES))


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch_size") -> int:
    """Returns the per-process batch size; raises when the global size does not divide evenly."""
    n_dev = mesh.devices.size
    if global_batch_size % n_dev:
        raise ConfigError(
            [
                f"config.{what}={global_batch_size} must be a multiple of the {n_dev} devices "
                "in the mesh"
            ]
        )
    return global_batch_size // jax.process_count()


def process_slice(global_batch_size: int) -> slice:
    """The rows of a global batch that this process feeds."""
    local = global_batch_size // jax.process_count()
    start = jax.process_index() * local
    return slice(start, start + local)


def process_sum(x: Any) -> np.ndarray:
    """A host array summed over every process of the run (itself on one process): statistics of
    data that each process holds a part of (its data shards)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=False)).sum(axis=0)


def global_batch(local: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global `jax.Array`s sharded over the data axis."""
    sharding = data_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def fsdp_spec(shape: tuple[int, ...], fsdp: int, skip: int = 0) -> P:
    """Where one array of a train state lives: its largest dimension divisible by `fsdp` is
    split over the fsdp axis when the array holds at least `FSDP_MIN_SIZE` values; otherwise
    (and with `fsdp == 1`) it is replicated. The first `skip` dimensions are never split (a
    replica axis)."""
    if fsdp <= 1 or int(np.prod(shape)) < FSDP_MIN_SIZE:
        return P()
    dims = sorted(range(skip, len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % fsdp == 0:
            return P(*([None] * d), FSDP_AXIS)
    return P()


def state_sharding(abstract_state: Any, mesh: Mesh, replica_axis: bool = False) -> Any:
    """Sharding pytree for a train state: replicated (data parallelism), or split over the
    mesh's fsdp axis when it has more than one device (`fsdp_spec`). With `replica_axis`, every
    leaf's leading axis indexes independent replicas (`medjax.train.replicas`) and is never
    split by FSDP."""
    fsdp = int(mesh.shape[FSDP_AXIS]) if FSDP_AXIS in mesh.shape else 1
    skip = 1 if replica_axis else 0
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), fsdp, skip)), abstract_state
    )
