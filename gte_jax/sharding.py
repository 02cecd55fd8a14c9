"""Device mesh, shardings and multi-process global arrays.

The mesh has axes ``("data", "model")``. The batch is split over ``"data"``. Parameters and the
optimizer state are placed by :func:`state_shardings` (config group ``sharding``): replicated
(default), FSDP (every matrix split over ``"data"``; XLA gathers a layer's weights where they are
used and reduce-scatters their gradients) or FSDP + tensor parallelism over ``"model"``.

The axes are ``AxisType.Auto`` (jax 0.10's ``jax.make_mesh`` defaults to ``Explicit``): the loss
is plain math on global arrays and we want the partitioner to choose and insert the all-gathers
(big_vision style). With Explicit axes, ``q @ d.T`` with both operands sharded on ``"data"`` would
be a sharding-in-types error that each call site would have to resolve by hand.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import gte_jax.models.registry as registry
import gte_jax.models.scan as scan
from gte_jax.data.layout import BatchLayout

# Activation rules and the towers' constraint live in a leaf module the model families can
# import (this one imports their registry); re-exported here beside the parameter rules.
from gte_jax.models.partitioning import (  # noqa: F401
    ACTIVATION_AXIS_RULES,
    DATA_AXIS,
    MODEL_AXIS,
    activation_spec,
    constrain,
    mesh_context,
)

logger = logging.getLogger(__name__)

MESH_AXES = (DATA_AXIS, MODEL_AXIS)


def make_mesh(
    data: int = -1,
    model: int = 1,
    devices: Sequence[jax.Device] | None = None,
    *,
    slices: int = 1,
    axis_types: tuple[AxisType, ...] = (AxisType.Auto, AxisType.Auto),
) -> Mesh:
    """A ``("data", "model")`` mesh over ``devices`` (default: all devices of all processes).

    ``data=-1`` takes every device not used by ``model``. The device order is the platform's
    (``jax.make_mesh``: on TPU a ring through the physical torus, so neighbours on an axis are
    neighbours on the chip network). That order puts a host's chips at scattered places of the
    ``"data"`` axis on multi-host slices (v4-32: hosts 0,1,2,3,0,1,2,3,...), so nothing may assume a
    host's rows are one block: :class:`BatchLayout` reads the rows off the mesh.

    ``slices > 1`` (multislice: several TPU slices joined by the data-centre network, DCN): the
    ``"data"`` axis spans the slices, slice-major (``mesh_utils.create_hybrid_device_mesh``), so the
    global batch and the loss's negatives span them and only the data-parallel reductions cross
    DCN; ``"model"`` stays within a slice. Devices without a ``slice_index`` (CPU, GPU) take each
    process as a slice.
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
    if slices < 1 or data % slices:
        raise ValueError(f"mesh.slices={slices} must be >= 1 and divide mesh.data={data}")
    if slices == 1:
        return jax.make_mesh((data, model), MESH_AXES, axis_types=axis_types, devices=devices)
    from jax.experimental import mesh_utils

    granules = {getattr(d, "slice_index", None) for d in devices}
    by_process = None in granules or len(granules) == 1
    found = len({d.process_index for d in devices}) if by_process else len(granules)
    if found != slices:
        raise ValueError(
            f"mesh.slices={slices} but the devices come from {found} "
            + ("processes (no slice_index: a process is a slice)" if by_process else "slices")
        )
    array = mesh_utils.create_hybrid_device_mesh(
        (data // slices, model), (slices, 1), devices, process_is_granule=by_process
    )
    return Mesh(array, MESH_AXES, axis_types=axis_types)


def training_mesh(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """The mesh of a run from its config's ``mesh`` group: what ``train`` runs on and what
    ``plan`` compiles for (there with a TPU topology's devices). ``mesh.simulate_topology`` lays
    this machine's devices out as that topology's mesh lays out its hosts' chips (testing the
    multi-host layout on CPU processes; :func:`arrange_like`)."""
    data, model = int(mesh_cfg.data), int(mesh_cfg.model)
    slices = int(mesh_cfg.get("slices", 1))
    simulate = str(mesh_cfg.get("simulate_topology", "") or "")
    if simulate:
        from gte_jax import topologies

        topo = topologies.parse_topology(simulate)
        target = make_mesh(data, model, topologies.topology_devices(topo, slices), slices=slices)
        devices = arrange_like(target, list(jax.devices() if devices is None else devices))
        return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))
    return make_mesh(data, model, devices, slices=slices)


def arrange_like(target: Mesh, devices: Sequence[Any]) -> np.ndarray:
    """``devices`` in an array of ``target``'s shape where each sits at a place that a device of
    the same process index holds in ``target`` (in order). Raises unless the processes and
    devices per process match."""
    want = [d.process_index for d in target.devices.flat]
    have: dict[int, list[Any]] = {}
    for d in devices:
        have.setdefault(d.process_index, []).append(d)
    need = {p: want.count(p) for p in set(want)}
    if {p: len(v) for p, v in have.items()} != need:
        raise ValueError(
            f"mesh.simulate_topology needs {len(need)} processes with "
            f"{sorted(set(need.values()))} devices each (the topology's hosts and chips per "
            f"host); this run has {len(have)} processes with "
            f"{sorted({len(v) for v in have.values()})} devices each"
        )
    queues = {p: iter(sorted(v, key=lambda d: d.id)) for p, v in have.items()}
    return np.asarray([next(queues[p]) for p in want], dtype=object).reshape(target.devices.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``"data"``, the rest replicated (also over ``"model"``)."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def process_layouts(mesh: Mesh) -> dict[int, BatchLayout]:
    """Every process's :class:`BatchLayout` on ``mesh``."""
    procs = sorted({d.process_index for d in mesh.devices.flat})
    return {p: BatchLayout.of_mesh(mesh, p) for p in procs}


def layout_problems(mesh: Mesh, batch_sizes: Sequence[int]) -> list[str]:
    """Why the processes of ``mesh`` could not each feed their rows of every batch size (empty:
    they can). Every process must hold the same number of blocks (local batches of one shape,
    so one compiled program), and every batch size must split into the data axis's blocks."""
    layouts = process_layouts(mesh)
    problems = []
    counts = {p: lay.groups for p, lay in layouts.items()}
    if len(set(counts.values())) > 1:
        problems.append(
            f"processes hold different numbers of data-axis blocks {counts}: mesh.data "
            f"{mesh.shape[DATA_AXIS]} x mesh.model {mesh.shape[MODEL_AXIS]} does not spread the "
            "batch evenly over the hosts"
        )
    for bs in sorted(set(batch_sizes)):
        if bs < 1 or bs % mesh.shape[DATA_AXIS]:
            problems.append(
                f"batch size {bs} is not divisible by the {mesh.shape[DATA_AXIS]} data devices"
            )
    return problems


def global_batch(
    local_batch: Mapping[str, np.ndarray], mesh: Mesh, layout: BatchLayout | None = None
) -> dict[str, jax.Array]:
    """Turns this process's rows of the batch (``layout``'s blocks, in increasing order) into
    global arrays sharded over ``"data"``. Every array is split on its leading axis into
    ``layout.groups`` equal blocks; ``jax.make_array_from_process_local_data`` maps the process's
    i-th block to the i-th data-axis block it addresses, wherever that sits."""
    layout = layout or BatchLayout.of_mesh(mesh)
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        per, rest = divmod(value.shape[0], layout.groups)
        if rest:
            raise ValueError(
                f"{key}: {value.shape[0]} rows do not split into {layout.groups} blocks"
            )
        shape = (per * layout.num_blocks, *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out


def place(tree: Any, shardings: Any) -> Any:
    """Puts every leaf of ``tree`` on the mesh with the matching leaf of ``shardings``.

    Host values must be identical on every process (same init seed or same checkpoint): each
    process cuts its own shards out of its copy.
    """

    def one(x, sharding):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x  # already there (loaded onto its shards: gte_jax.sharded_io)
        if isinstance(x, jax.Array) and (not x.is_fully_addressable or len(x.devices()) > 1):
            return jax.device_put(x, sharding)  # resharded on the devices, no host copy
        host = np.asarray(x)
        # Why a callback and not device_put: it builds the global array from host data on every
        # process without assuming the value is already on the (non-addressable) devices.
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def shard_params(params: Any, mesh: Mesh) -> Any:
    """Places a parameter (or optimizer-state) pytree on the mesh, replicated on every device."""
    sharding = replicated(mesh)
    return place(params, jax.tree.map(lambda _: sharding, params))


def local_copy(tree: Any) -> Any:
    """The full value of every (possibly sharded) array, on one local device of this process.

    A collective when an array is sharded: call it on every process (e.g. before evaluating).
    """

    def one(x):
        if not x.sharding.is_fully_replicated:
            x = jax.device_put(x, NamedSharding(x.sharding.mesh, PartitionSpec()))
        return x.addressable_data(0)

    return jax.tree.map(one, tree)


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh the arrays of ``tree`` are sharded on (its first ``NamedSharding`` leaf's); None
    for host arrays or arrays on one device."""
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def host_value(x: Any) -> np.ndarray:
    """One array's whole value in this host's memory: a NumPy array as it is, a fully addressable
    ``jax.Array`` assembled from its shards (``jax.device_get``), a global one spanning processes
    gathered with ``multihost_utils.process_allgather`` (a collective: every process calls it for
    the same array). No device ever holds more than its shards (unlike :func:`local_copy`), no
    host more than this one array: what an export writes tensor by tensor."""
    if isinstance(x, jax.Array):
        if x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        from jax.experimental import multihost_utils  # only multi-process runs get here

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# --------------------------------------------------------------------------------------------------
# Parameter and optimizer-state shardings: parameter path -> logical axes -> mesh axes
# --------------------------------------------------------------------------------------------------

SHARDING_MODES = ("replicate", "fsdp", "fsdp_tp")

# The logical axes of a parameter come from its model family (``Family.logical_axes`` in
# gte_jax/models/registry.py, declared in each family's module), read off the last two components
# of its path, e.g. "params/encoder/layers/3/query/kernel" -> ("embed", "heads"). An Adam
# moment's path ends like its parameter's ("opt_state/1/0/mu/encoder/layers/3/query/kernel") and
# has its shape, so it gets its parameter's sharding. Names after MaxText: embed (model width),
# heads (heads x head_dim), mlp (feed-forward width), vocab.
#
# Logical axis -> mesh axis, per ``sharding.params`` mode: the one rule table of every family.
# FSDP needs no names (below); tensor parallelism splits attention heads and the MLP over
# "model" (Megatron's column/row split: one all-reduce per block), and the vocabulary where it
# divides.
LOGICAL_AXIS_RULES: dict[str, dict[str, str]] = {
    "replicate": {},
    "fsdp": {},
    "fsdp_tp": {"heads": MODEL_AXIS, "mlp": MODEL_AXIS, "vocab": MODEL_AXIS},
}
FSDP_MODES = ("fsdp", "fsdp_tp")


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """The logical axes the model families give the leaf at ``path``
    (:func:`gte_jax.models.registry.param_logical_axes`; all None when no family declares it or
    its rank differs from ``ndim``: optimizer counts, a test's own parameters).

    LoRA factors follow their layer's kernel [in, out]: ``lora_a`` [in, r] gets (in's axis, None),
    ``lora_b`` [r, out] (None, out's axis), so x·A·B comes out split like x·W (tensor
    parallelism: no extra collective) and FSDP splits each factor on its wide dim."""
    if scan.is_stacked_path(path) and ndim >= 1:
        # A scanned tower's layer parameter: the stacked layer axis first, never split.
        row = re.sub(rf"(^|/){scan.LAYERS}/", rf"\g<1>{scan.LAYERS}/0/", path, count=1)
        return (scan.LAYERS,) + logical_axes(row, ndim - 1)
    lora = re.search(r"^(.*)/lora_([ab])$", path)
    if lora and ndim == 2:
        kernel_in, kernel_out = logical_axes(lora.group(1) + "/kernel", 2)
        return (kernel_in, None) if lora.group(2) == "a" else (None, kernel_out)
    return registry.param_logical_axes(path, ndim) or (None,) * ndim


def leaf_spec(
    path: str,
    shape: Sequence[int],
    mesh_shape: Mapping[str, int],
    mode: str,
    rules: Sequence[tuple[str, Sequence[str | None]]] = (),
) -> PartitionSpec:
    """The ``PartitionSpec`` of one state leaf (parameter, optimizer moment or scalar).

    1. Scalars are replicated.
    2. ``rules`` (``sharding.rules``: (path regex, mesh axis or None per dim), first match wins)
       override the mode.
    3. ``fsdp_tp``: each logical axis that :data:`LOGICAL_AXIS_RULES` maps to a mesh axis of
       size > 1 is split over it when its size divides.
    4. ``fsdp`` / ``fsdp_tp``: a leaf of rank >= 2 (a matrix: vectors are tiny and would cost a
       collective each) has its largest dim not split yet and divisible by the ``"data"`` size
       split over ``"data"`` (the first such dim on a tie); none divisible: left as it is.
    """
    if mode not in SHARDING_MODES:
        raise ValueError(f"sharding.params={mode!r}: use one of {', '.join(SHARDING_MODES)}")
    ndim = len(shape)
    if ndim == 0:
        return PartitionSpec()
    for pattern, axes in rules:
        if re.search(pattern, path):
            return _checked_rule(pattern, tuple(axes), path, shape, mesh_shape)
    spec: list[str | None] = [None] * ndim
    names = logical_axes(path, ndim)
    for i, name in enumerate(names):
        axis = LOGICAL_AXIS_RULES[mode].get(name) if name else None
        if axis and mesh_shape[axis] > 1 and shape[i] % mesh_shape[axis] == 0:
            spec[i] = axis
    data = mesh_shape[DATA_AXIS]
    # The stacked layer axis of a scanned tower stays whole: the scan slices it per layer.
    stacked = sum(name == scan.LAYERS for name in names)
    if mode in FSDP_MODES and ndim - stacked >= 2 and data > 1:
        free = [
            i
            for i in range(ndim)
            if spec[i] is None and shape[i] % data == 0 and names[i] != scan.LAYERS
        ]
        if free:
            spec[max(free, key=lambda i: (shape[i], -i))] = DATA_AXIS
    return PartitionSpec(*spec)


def _checked_rule(pattern, axes, path, shape, mesh_shape) -> PartitionSpec:
    bad = None
    if len(axes) > len(shape):
        bad = f"has {len(axes)} axes for a leaf of shape {tuple(shape)}"
    for dim, axis in zip(shape, axes, strict=False):
        if axis is not None and (axis not in mesh_shape or dim % mesh_shape[axis]):
            bad = f"splits a dim of {dim} over {axis!r} (mesh {dict(mesh_shape)})"
    if bad:
        raise ValueError(
            f"sharding.rules entry ({pattern!r}, {axes}) matches {path!r} but {bad}: narrow the "
            "regex or change the axes"
        )
    return PartitionSpec(*axes)


def path_str(path: Any) -> str:
    """A pytree key path as "params/encoder/layers/3/query/kernel"."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def state_shardings(abstract_state: Any, mesh: Mesh, sharding_cfg: Any) -> Any:
    """A ``NamedSharding`` for every leaf of a train state (params, optimizer state, scalars).

    ``abstract_state`` may hold arrays or ``jax.ShapeDtypeStruct``s (only paths and shapes are
    read: fit for AOT compiles against a TPU topology). ``sharding_cfg`` is the config's
    ``sharding`` group (``params``: replicate | fsdp | fsdp_tp, ``rules``) or just a mode string.
    Adam's moments get their parameter's sharding (same path suffix, same shape); optax's
    counts, the step and the RNG are replicated.
    """
    if isinstance(sharding_cfg, str):
        mode, rules = sharding_cfg, ()
    else:
        mode, rules = str(sharding_cfg.params), tuple(sharding_cfg.rules)
    mesh_shape = dict(mesh.shape)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(
            mesh, leaf_spec(path_str(path), tuple(x.shape), mesh_shape, mode, rules)
        ),
        abstract_state,
    )


# jax.distributed.initialize's default: how long a launcher's coordinator may take to appear.
COORDINATOR_TIMEOUT_S = 300


def launcher_environment() -> Any:
    """The launcher JAX's own cluster detection finds here (``jax._src.clusters``, the list and
    order ``jax.distributed.initialize()`` uses): Open MPI, SLURM, a GKE TPU slice
    (``TPU_WORKER_HOSTNAMES``), a gcloud TPU VM (the GCE metadata server), Kubernetes; None
    outside one.

    The metadata server is asked only on a Cloud TPU VM: JAX sets ``running_in_cloud_tpu_vm`` at
    import from the TPU chips on the PCI bus (and ``TPU_SKIP_MDS_QUERY`` when there are none), so
    a laptop or CI machine, libtpu installed or not, sends no request. Opt-in methods (mpi4py)
    stay opt-in, as in JAX.
    """
    from jax._src import clusters

    return next(
        (
            env
            for env in clusters.ClusterEnv._cluster_types
            if not env.opt_in_only_method and env.is_env_present()
        ),
        None,
    )


def _from_launcher(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> tuple[str | None, int | None, int | None, str]:
    """Fills what the caller left unset from the launcher, if any, and names the source. The
    count comes first, so a one-process launch resolves no coordinator (on a TPU VM that waits
    for worker 0's DNS name)."""
    launcher = None
    try:
        launcher = launcher_environment()
        if launcher is None:
            return coordinator_address, num_processes, process_id, "no launcher detected"
        if num_processes is None:
            num_processes = int(launcher.get_process_count())
        if num_processes == 1:
            return coordinator_address, 1, process_id, launcher.__name__
        if process_id is None:
            process_id = int(launcher.get_process_id())
        if coordinator_address is None:
            coordinator_address = launcher.get_coordinator_address(
                timeout_secs=COORDINATOR_TIMEOUT_S,
                override_coordinator_port=os.environ.get("JAX_COORDINATOR_PORT"),
            )
    except Exception as err:
        where = "detecting the launcher" if launcher is None else f"reading {launcher.__name__}"
        raise RuntimeError(
            f"jax.distributed: {where} failed ({err!r}); pass --coordinator_address, "
            "--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
            "JAX_PROCESS_ID; JAX_NUM_PROCESSES=1 for one process) to start without it"
        ) from err
    return coordinator_address, num_processes, process_id, launcher.__name__


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts ``jax.distributed`` when more than one process takes part; returns whether it did.

    Arguments win over the env vars ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; what both leave unset comes from the launcher
    (:func:`launcher_environment`: gcloud TPU VM, GKE, multislice, SLURM, Open MPI), so
    ``launch/slurm_gpu.sbatch`` may name only the coordinator. The process count is settled
    first: one process (a single-host TPU VM, a one-task SLURM job, a plain machine) is a no-op.
    ``jax.distributed.initialize`` then gets all three values and, as without them, picks the
    local devices itself (``JAX_LOCAL_DEVICE_IDS``, else one GPU per SLURM / Open MPI task).
    Call it before anything touches the devices.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])

    source = "arguments / JAX_* env vars"
    if num_processes != 1 and None in (coordinator_address, num_processes, process_id):
        coordinator_address, num_processes, process_id, source = _from_launcher(
            coordinator_address, num_processes, process_id
        )
    if num_processes == 1 or (coordinator_address, num_processes, process_id) == (None,) * 3:
        logger.debug("one process (%s): jax.distributed not started", source)
        return False
    if coordinator_address is None or num_processes is None or process_id is None:
        raise ValueError(
            "multi-process start needs coordinator_address, num_processes and process_id "
            "(arguments or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) or a "
            "launcher JAX detects (TPU VM, GKE, SLURM, Open MPI); got "
            f"{coordinator_address!r}, {num_processes!r}, {process_id!r}"
        )
    logger.info(
        "jax.distributed: process %d of %d, coordinator %s (from %s)",
        process_id,
        num_processes,
        coordinator_address,
        source,
    )
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
