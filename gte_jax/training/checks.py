"""Start-up checks: settings that cannot work are refused before any data or model is read
(:class:`TrainingError`, exit 2, one line per setting). ``gte-jax plan`` runs the same checks for
a pod's hosts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from gte_jax import sharding as shd
from gte_jax.errors import TrainingError
from gte_jax.models import attention
from gte_jax.training.spec import (  # noqa: F401  (the config-only checks live with the spec)
    STAGE_KINDS,
    SpecError,
    StageSpec,
    cannot_run,
    matryoshka_problems,
    packing_problems,
    parse,
    stage_kind_problems,
)


class TrainingDiverged(TrainingError):
    """The loss stayed NaN/Inf; the run stopped (its last good checkpoint is kept)."""


def trains_lm_head(spec: StageSpec) -> bool:
    """Only an MNTP stage reads (and so trains) a decoder's LM head; elsewhere it is frozen."""
    return spec.kind == "mntp"


def run_mesh(
    config: StageSpec | ml_collections.ConfigDict, devices: Any = None
) -> jax.sharding.Mesh:
    """The run's mesh (``config.mesh``) over ``devices`` (default: every device of every
    process; ``gte-jax plan``: a TPU topology's); a mesh that cannot be built is a
    :class:`TrainingError` naming the setting."""
    try:
        return shd.training_mesh(config.mesh, devices)
    except ValueError as e:
        raise TrainingError(f"this config cannot run:\n  - mesh: {e}") from None


def check_config(config: StageSpec | ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
    """Refuses settings that cannot work on ``mesh``, before any data or model is read; returns
    the number of GradCache chunks. The settings alone were checked when the spec was parsed
    (a ``ConfigDict`` is parsed here); these are the checks of every process of ``mesh``
    (``gte-jax plan`` runs them for a pod's hosts): each must be able to feed its rows of the
    batch, on devices that can run the attention kernel."""
    spec = parse(config)
    data_devices, num_chunks = mesh.shape[shd.DATA_AXIS], spec.train.num_chunks
    batch_size = spec.train.batch_size
    problems = attention.config_problems(
        spec.model, mesh.devices.flat[0].platform, train_dropout=spec.model.train_dropout
    )
    if batch_size % (num_chunks * data_devices):
        problems.append(
            f"train.batch_size={batch_size} must be divisible by the {data_devices} data devices"
            + (f" x {num_chunks} GradCache chunks" if num_chunks > 1 else "")
        )
    if not problems:
        problems.extend(shd.layout_problems(mesh, [batch_size]))
    if problems:
        raise TrainingError(cannot_run(problems))
    return num_chunks


def check_source_batches(sources: Any, num_chunks: int, data_devices: int) -> None:
    """A per-source ``batch_size`` must split like the run's (checked at start-up, not when that
    source is first drawn)."""
    sizes = {s.name: int(s.options.batch_size or 0) for s in sources}
    bad = source_batch_problems(sizes, num_chunks, data_devices)
    if bad:
        raise TrainingError(cannot_run(bad))


def source_batch_problems(
    batch_sizes: Mapping[str, int], num_chunks: int, data_devices: int
) -> list[str]:
    """Per-source batch sizes (0: the run's) that do not split over the data devices x chunks."""
    need = num_chunks * data_devices
    return [
        f"source {name!r}: batch_size={bs} is not divisible by {need} "
        f"({data_devices} data devices x {num_chunks} GradCache chunks)"
        for name, bs in batch_sizes.items()
        if bs and bs % need
    ]
