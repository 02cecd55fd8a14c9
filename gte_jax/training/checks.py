"""Start-up checks: settings that cannot work are refused before any data or model is read
(:class:`TrainingError`, exit 2, one line per setting). ``gte-jax plan`` runs the same checks for
a pod's hosts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from gte_jax import interpolate, objectives
from gte_jax import sharding as shd
from gte_jax.data.pipeline import source_kinds
from gte_jax.errors import ConfigError
from gte_jax.gradcache import GATHER_MODES
from gte_jax.models import attention, lora
from gte_jax.models.pooling import POOLING_MODES
from gte_jax.models.precision import compute_dtype
from gte_jax.objectives.matryoshka import sorted_dims
from gte_jax.ranges import range_problems


class TrainingError(RuntimeError):
    """The run cannot start or go on with this config / input; the message says what to do."""


class TrainingDiverged(TrainingError):
    """The loss stayed NaN/Inf; the run stopped (its last good checkpoint is kept)."""


def trains_lm_head(config: Any) -> bool:
    """Only an MNTP stage reads (and so trains) a decoder's LM head; elsewhere it is frozen."""
    return config.kind == "mntp"


# Stage kind -> the kind of source it trains on (gte_jax/defaults.py documents each kind).
STAGE_KINDS = {"contrastive": "pairs", "simcse": "text", "mntp": "text"}


def stage_kind_problems(config: Any) -> list[str]:
    """Why the stage's data or model settings do not fit its ``kind`` (empty: they do).

    contrastive needs pair sources (a text source's positive is its own query). simcse needs
    text sources (a pair source can be read as one: ``kind="text"`` with ``text_field``), the
    same token budget for both views (data.max_length, or equal query/doc max lengths: the
    views must be the same tokens) and dropout (without it both views are one embedding)."""
    kind = str(config.kind)
    if kind not in STAGE_KINDS:
        return [f"kind={kind!r}: use one of {sorted(STAGE_KINDS)}"]
    problems = []
    try:
        sources = source_kinds(config.data)
    except ConfigError:  # no or malformed sources: build_sources says so, as before
        sources = {}
    need = STAGE_KINDS[kind]
    wrong = sorted(name for name, k in sources.items() if k != need)
    if wrong and need == "pairs":
        problems.append(
            f"kind=contrastive trains on pairs, but {wrong} are text sources (single texts): "
            "use kind=simcse for them, or read pair files as pairs"
        )
    elif wrong:
        problems.append(
            f"kind={kind} trains on single texts, but {wrong} are pair sources: list them in "
            "data.text_files, or set kind='text' and text_field (e.g. 'positive') in data.sources"
        )
    if kind == "mntp":
        tcfg = config.train
        chunk = int(tcfg.gradcache_chunk_size)
        chunked = bool(tcfg.gradcache) and chunk > 0 and int(tcfg.batch_size) > chunk
        if bool(config.data.packing) and chunked:
            problems.append(
                "kind=mntp with data.packing and train.gradcache: MNTP labels are laid out on "
                "one-chunk packed rows; use padded rows (data.packing=false) with GradCache"
            )
    if kind == "simcse":
        data, model = config.data, config.model
        if not int(data.max_length) and int(data.query_max_length) != int(data.doc_max_length):
            problems.append(
                f"kind=simcse: data.query_max_length={data.query_max_length} != "
                f"data.doc_max_length={data.doc_max_length}: both views must be the same tokens; "
                "set data.max_length"
            )
        if not bool(model.train_dropout) or float(model.dropout) == 0.0:
            problems.append(
                "kind=simcse: the two views differ only by dropout; model.train_dropout=false or "
                "model.dropout=0 makes them one embedding (set model.dropout, e.g. 0.1; "
                "LLM2Vec uses 0.3)"
            )
    return problems


def run_mesh(config: Any, devices: Any = None) -> jax.sharding.Mesh:
    """The run's mesh (``config.mesh``) over ``devices`` (default: every device of every
    process; ``gte-jax plan``: a TPU topology's); a mesh that cannot be built is a
    :class:`TrainingError` naming the setting."""
    try:
        return shd.training_mesh(config.mesh, devices)
    except ValueError as e:
        raise TrainingError(f"this config cannot run:\n  - mesh: {e}") from None


def check_config(config: Any, mesh: jax.sharding.Mesh) -> int:
    """Refuses settings that cannot work, before any data or model is read; returns the number
    of GradCache chunks. The start-up checks of every process of ``mesh`` (``gte-jax plan``
    runs them for a pod's hosts): each must be able to feed its rows of the batch."""
    tcfg, lcfg, data_devices = config.train, config.loss, mesh.shape[shd.DATA_AXIS]
    problems = range_problems(config) + stage_kind_problems(config)
    if str(config.kind) != "mntp" and lcfg.name not in objectives.contrastive_names():
        problems.append(f"loss.name={lcfg.name!r}: use one of {objectives.contrastive_names()}")
    else:
        problems.extend(objectives.from_config(config).problems(config))
    problems.extend(matryoshka_problems(lcfg))
    problems.extend(interpolate.config_problems(config.export))
    if str(config.model.include_prompt).lower() not in ("auto", "true", "false"):
        problems.append(
            f"model.include_prompt={config.model.include_prompt!r}: use auto, true or false"
        )
    if str(config.model.pooling) not in ("auto", *POOLING_MODES):
        problems.append(
            f"model.pooling={config.model.pooling!r}: use auto or one of {list(POOLING_MODES)}"
        )
    try:
        compute_dtype(config.model.dtype)
    except ValueError as e:  # names the setting and the choices
        problems.append(str(e))
    problems.extend(
        attention.config_problems(
            config.model,
            mesh.devices.flat[0].platform,
            train_dropout=bool(config.model.train_dropout),
        )
    )
    if str(config.model.padding_side) not in ("auto", "left", "right"):
        problems.append(
            f"model.padding_side={config.model.padding_side!r}: use auto, left or right"
        )
    if config.model.lora.enabled:
        problems.extend(lora.config_problems(config.model.lora))
    if tcfg.schedule not in ("linear", "cosine", "constant"):
        problems.append(f"train.schedule={tcfg.schedule!r}: use linear, cosine or constant")
    if config.sharding.params not in shd.SHARDING_MODES:
        problems.append(
            f"sharding.params={config.sharding.params!r}: use one of "
            + ", ".join(shd.SHARDING_MODES)
        )
    elif int(config.mesh.model) != 1 and config.sharding.params != "fsdp_tp":
        problems.append(
            f"mesh.model={config.mesh.model}: only sharding.params=fsdp_tp uses the model axis "
            "(tensor parallelism); otherwise it would only waste devices: set mesh.model=1"
        )
    if config.sharding.gather_params not in GATHER_MODES:
        problems.append(
            f"sharding.gather_params={config.sharding.gather_params!r}: use one of "
            + ", ".join(GATHER_MODES)
        )
    batch_size, chunk = int(tcfg.batch_size), int(tcfg.gradcache_chunk_size)
    num_chunks = 1
    if tcfg.gradcache and chunk > 0 and batch_size > 0:
        if batch_size % chunk:
            problems.append(
                f"train.gradcache_chunk_size={chunk} must divide train.batch_size={batch_size}"
            )
        else:
            num_chunks = batch_size // chunk
    problems.extend(packing_problems(config.data, num_chunks))
    if batch_size > 0 and batch_size % (num_chunks * data_devices):
        problems.append(
            f"train.batch_size={batch_size} must be divisible by the {data_devices} data devices"
            + (f" x {num_chunks} GradCache chunks" if num_chunks > 1 else "")
        )
    if not problems:
        problems.extend(shd.layout_problems(mesh, [batch_size]))
    if problems:
        raise TrainingError(cannot_run(_one_per_key(problems)))
    return num_chunks


def matryoshka_problems(lcfg: Any) -> list[str]:
    """loss.matryoshka_dims / _weights that cannot work (sizes are checked against the model's
    dim when the loss first runs: the model is not loaded yet here)."""
    dims, weights = tuple(lcfg.matryoshka_dims), tuple(lcfg.matryoshka_weights)
    if not dims and not weights:
        return []
    try:
        sorted_dims(dims, weights)
    except (ValueError, TypeError) as e:
        return [f"loss.matryoshka_dims={list(dims)}: {e}"]
    if any(float(w) < 0 for w in weights):
        return [f"loss.matryoshka_weights={list(weights)}: weights must be >= 0"]
    return []


def cannot_run(problems: list[str]) -> str:
    """One line for one problem (what a user reads first), a list for several."""
    if len(problems) == 1:
        return f"this config cannot run: {problems[0]}"
    return "this config cannot run:\n  - " + "\n  - ".join(problems)


def _one_per_key(problems: list[str]) -> list[str]:
    """The first line about each ``key=value`` setting (the range table's comes first; a
    group's own check, e.g. model.lora's, may say the same again)."""
    seen, out = set(), []
    for line in problems:
        key = line.split("=", 1)[0] if "=" in line.split(" ", 1)[0] else None
        if key is None or key not in seen:
            out.append(line)
        seen.add(key)
    return out


def packing_problems(data: Any, num_chunks: int) -> list[str]:
    """Packed-row settings that cannot work (docs/design.md, "Packed batches")."""
    problems = []
    row_length = int(data.packing_row_length)
    if row_length > 0 and bool(data.packing) and num_chunks > 1:
        problems.append(
            f"data.packing_row_length={row_length} with {num_chunks} GradCache chunks: chunks "
            "budget their tokens in rows of the max lengths; leave data.packing_row_length=0"
        )
    return problems


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
