"""Device mesh, shardings and multi-process global arrays.

The mesh has axes ``("data", "model")``. Today the batch is split over ``"data"`` and parameters
are replicated; the ``"model"`` axis (size 1 by default) is where tensor parallelism goes later.

The axes are ``AxisType.Auto`` (jax 0.10's ``jax.make_mesh`` defaults to ``Explicit``): the loss
is plain math on global arrays and we want the partitioner to choose and insert the all-gathers
(big_vision style). With Explicit axes, ``q @ d.T`` with both operands sharded on ``"data"`` would
be a sharding-in-types error that each call site would have to resolve by hand.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)


def make_mesh(
    data: int = -1,
    model: int = 1,
    devices: Sequence[jax.Device] | None = None,
    *,
    axis_types: tuple[AxisType, ...] = (AxisType.Auto, AxisType.Auto),
) -> Mesh:
    """A ``("data", "model")`` mesh over ``devices`` (default: all devices of all processes).

    ``data=-1`` takes every device not used by ``model``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devices) % model:
        raise ValueError(f"model={model} must be >= 1 and divide the {len(devices)} devices")
    if data == -1:
        data = len(devices) // model
    if data * model != len(devices):
        raise ValueError(
            f"mesh data={data} x model={model} does not match the {len(devices)} devices; "
            "pass data=-1 to use them all or pass `devices` explicitly"
        )
    return jax.make_mesh((data, model), MESH_AXES, axis_types=axis_types, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``"data"``, the rest replicated (also over ``"model"``)."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def process_batch_slice(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of the global batch that this process feeds to :func:`global_batch`.

    Derived from the sharding itself, so it holds for any device order in the mesh; raises if this
    process's devices do not own one contiguous block of rows.
    """
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    bounds = [
        (idx[0].start or 0, global_batch_size if idx[0].stop is None else idx[0].stop)
        for idx in index_map.values()
    ]
    starts, stops = [a for a, _ in bounds], [b for _, b in bounds]
    start, stop = min(starts), max(stops)
    covered = set().union(*[range(a, b) for a, b in bounds])
    if len(covered) != stop - start:
        raise ValueError("this process's devices do not hold a contiguous block of the batch")
    return slice(start, stop)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's slice of the batch into global arrays sharded over ``"data"``.

    Every array is split on its leading axis; the global batch size is the sum of the slices of
    all processes (``jax.make_array_from_process_local_data``).
    """
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }


def shard_params(params: Any, mesh: Mesh) -> Any:
    """Places a parameter (or optimizer-state) pytree on the mesh, replicated for now.

    Host values must be identical on every process (same init seed or same checkpoint).
    """
    sharding = replicated(mesh)

    def place(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        # Why a callback and not device_put: it builds the global array from host data on every
        # process without assuming the value is already on the (non-addressable) devices.
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, params)


def _cluster_detected() -> bool:
    """True on a multi-host TPU slice, a multi-task SLURM job or an Open MPI launch."""
    env = os.environ
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
        return True
    return int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts ``jax.distributed`` when more than one process takes part; returns whether it did.

    Arguments win over the env vars ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. With neither count nor id, a TPU pod / SLURM / Open MPI launch is detected
    and ``jax.distributed.initialize()`` discovers the rest itself (the coordinator too, unless
    given); otherwise (one process) this is a no-op. Call it before anything touches the devices.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])

    if num_processes is None and process_id is None and _cluster_detected():
        # The scheduler gives the process count and id; a coordinator address, when given,
        # replaces the one JAX derives (launch/slurm_gpu.sbatch sets it from `scontrol`).
        logger.info(
            "cluster environment detected; jax.distributed.initialize(%s) auto-configures",
            coordinator_address or "",
        )
        jax.distributed.initialize(coordinator_address)
        return True
    if coordinator_address is None and num_processes is None and process_id is None:
        return False
    if num_processes == 1:
        return False
    if coordinator_address is None or num_processes is None or process_id is None:
        raise ValueError(
            "multi-process start needs coordinator_address, num_processes and process_id "
            "(arguments or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); got "
            f"{coordinator_address!r}, {num_processes!r}, {process_id!r}"
        )
    logger.info(
        "jax.distributed: process %d of %d, coordinator %s",
        process_id,
        num_processes,
        coordinator_address,
    )
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
