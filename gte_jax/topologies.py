"""TPU chips and topologies as libtpu describes them (no TPU needed): what ``gte-jax plan``
compiles for and what ``mesh.simulate_topology`` lays CPU processes out as. No other gte_jax
module is imported here, so the mesh code (gte_jax/sharding.py) can use it without a cycle."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

# --------------------------------------------------------------------------------------------------
# TPU chips and topologies
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: HBM per chip and dense bf16 peak FLOP/s per chip."""

    generation: str  # our name, as in "v5e:8x8"
    hbm_gib: float
    peak_bf16_flops: float
    dims: int  # 2 (v5e, v6e: 2D torus) or 3 (v4, v5p)
    # chip_config_name for get_topology_desc: "megacore" makes one device per v4 chip (its two
    # TensorCores fused, as JAX uses a v4 by default); v5p's "default" is already megacore.
    chip_config: str
    cores_in_name: bool  # "v4-32" / "v5p-8" count TensorCores (2 per chip); v5e / v6e count chips


# Per-chip HBM and dense bf16 peak from Google Cloud's TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): v4 32 GiB, 275 TFLOP/s; v5e 16 GiB,
# 197 TFLOP/s; v5p 95 GiB, 459 TFLOP/s; v6e (Trillium) 32 GiB, 918 TFLOP/s. The same peaks as
# benchmarks/mfu.py's PEAK_BF16.
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32, 275e12, 3, "megacore", True),
    "v5e": Chip("v5e", 16, 197e12, 2, "default", False),
    "v5p": Chip("v5p", 95, 459e12, 3, "default", True),
    "v6e": Chip("v6e", 32, 918e12, 2, "default", False),
}
_GENERATION_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v6lite": "v6e"}

# Slice shapes of the names Cloud TPU uses (accelerator types): chips for v5e / v6e, TensorCores
# (2 per chip) for v4 / v5p.
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}  # fmt: skip
_SHAPES_3D = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8",
              512: "4x8x8", 1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16"}  # fmt: skip


def _known_names() -> dict[str, str]:
    names = {}
    for n, shape in _SHAPES_2D.items():
        for prefix in ("v5litepod", "v5e", "v6e"):
            names[f"{prefix}-{n}"] = f"{_GENERATION_ALIASES.get(prefix, prefix)}:{shape}"
    for n, shape in _SHAPES_3D.items():
        for prefix in ("v4", "v5p"):
            names[f"{prefix}-{n}"] = f"{prefix}:{shape}"
    return names


KNOWN_TOPOLOGIES: dict[str, str] = _known_names()


class PlanError(ValueError):
    """Bad input to the planner (unknown topology, model shape, config); the message says what to
    do. The CLI exits 2 on it."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # canonical "v5e:8x8"
    chip: Chip
    shape: tuple[int, ...]
    accelerator_type: str  # Cloud TPU's name, e.g. "v5litepod-64" (TPU_ACCELERATOR_TYPE)

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        # Single-host slices hold up to 8 v5e/v6e chips (2x4) and 4 v4/v5p chips (2x2x1); bigger
        # slices have 4-chip (2x2x1) hosts. The bound only decides the process layout, not the step.
        dims = (*self.shape, 1)[:3]
        if self.chip.dims == 2 and self.chips <= 8:
            return (dims[0], dims[1], 1)
        return (min(dims[0], 2), min(dims[1], 2), 1)


def parse_topology(text: str) -> Topology:
    """``"v5e:8x8"``, ``"v4:2x2x4"``, or a Cloud TPU name (``"v5litepod-64"``, ``"v4-32"``)."""
    raw = text.strip().lower()
    canonical = KNOWN_TOPOLOGIES.get(raw, raw)
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", canonical)
    generation = m and _GENERATION_ALIASES.get(m.group(1), m.group(1))
    if not m or generation not in CHIPS:
        raise PlanError(
            f"unknown topology {text!r}: use GENERATION:SHAPE with GENERATION one of "
            f"{sorted(CHIPS)} (e.g. v5e:8x8, v5p:2x2x2, v4:2x2x1) or a Cloud TPU name: "
            + ", ".join(sorted(KNOWN_TOPOLOGIES, key=_name_order))
        )
    chip = CHIPS[generation]
    shape = tuple(int(d) for d in m.group(2).split("x"))
    if chip.dims == 3 and len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != chip.dims or min(shape) < 1:
        raise PlanError(
            f"topology {text!r}: {generation} slices have {chip.dims} dimensions "
            f"(e.g. {generation}:{'8x8' if chip.dims == 2 else '2x2x2'})"
        )
    name = f"{generation}:{'x'.join(map(str, shape))}"
    count = math.prod(shape) * (2 if chip.cores_in_name else 1)
    prefix = {"v5e": "v5litepod"}.get(generation, generation)
    return Topology(name, chip, shape, f"{prefix}-{count}")


def _name_order(name: str) -> tuple[str, int]:
    prefix, _, n = name.rpartition("-")
    return prefix, int(n)


def topology_devices(topology: Topology, num_slices: int = 1) -> list[Any]:
    """The devices of ``topology`` as libtpu describes them (no TPU needed); ``num_slices``
    such slices (multislice: each device has a ``slice_index``)."""
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError(
            "compiling for a TPU topology needs libtpu (no TPU needed): "
            'pip install -e ".[plan]"   (or: pip install libtpu)'
        )
    # Without a TPU VM's metadata libtpu logs errors about the accelerator type and worker
    # hostnames; these two variables (what a one-host TPU VM sets) keep it quiet. A real TPU VM
    # already has them and keeps its own.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu takes /tmp/libtpu_lockfile for the chips of the machine; compiling touches no chip,
    # so a plan may run beside a training job (or any JAX program that loaded libtpu).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from gte_jax import tpu_flags

    tpu_flags.apply()  # the flags train runs with (the CLI set them already; a library caller too)
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topology.name,
        chip_config_name=topology.chip.chip_config,
        chips_per_host_bounds=topology.chips_per_host_bounds,
        num_slices=int(num_slices),
    )
    devices = list(desc.devices)
    if len(devices) != topology.chips * num_slices:
        raise PlanError(
            f"libtpu describes {topology.name} with {len(devices)} devices, not "
            f"{topology.chips} chips: this libtpu version lays the chip out differently"
        )
    return devices
