"""The run summary (``summary.json``) of a stage, and the JSON helpers every training file
goes through (NaN-free, written whole or not at all)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from etils import epath

from gte_jax import objectives, storage
from gte_jax.data.sources import skipped_records
from gte_jax.models.precision import compute_dtype
from gte_jax.training import hooks as hooks_lib
from gte_jax.training.spec import StageSpec

log = logging.getLogger("gte_jax.train")

# The lowest value each loss can reach (each objective's ``floor``; GTE's is ln 2).
LOSS_FLOORS = {name: objectives.get(name).floor for name in objectives.contrastive_names()}


# Per-source counts the summary reports (read = used + skipped; records short of K negatives are
# kept with a validity mask and counted).
SOURCE_STATS = (
    "size", "read", "used", "skipped", "skipped_at_build", "num_negatives",
    "records_short_of_negatives", "unattributed", "drawn_batches", "drawn_examples",
)  # fmt: skip


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN / Inf floats replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: epath.PathLike, obj: Any) -> None:
    """Written whole or not at all (a full disk leaves the previous file, not a truncated one)."""
    storage.write_text(
        path, json.dumps(json_safe(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    )


def finished_summary(workdir: epath.Path, last_step: int | None, total_steps: int):
    """The summary of a stage that already ran to ``total_steps`` (a rerun is a no-op), or None."""
    path = workdir / "summary.json"
    if last_step is None or last_step < total_steps or not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not summary.get("completed") or int(summary.get("steps", -1)) != last_step:
        return None
    log.warning(
        "stage %r in %s is already complete (step %d of %d): nothing to do; its results are "
        "in %s. Raise train.num_steps to train further, or use a new --workdir.",
        summary.get("stage"),
        workdir,
        last_step,
        total_steps,
        path,
    )
    return {**summary, "already_complete": True}


def stage_summary(
    config: StageSpec,
    iterator: Any,
    evaluator: Any,
    *,
    steps: int,
    start_step: int,
    examples: int,
    start_examples: int,
    seconds: float,
    tracker: Mapping[str, Any],
    timing: Mapping[str, Any],
    completed: bool,
    stopped: bool,
    stopped_by: str | None,
) -> dict[str, Any]:
    """The summary of a stage's run: ``examples`` and ``seconds`` are this run's (from
    ``start_step``), ``stopped_by`` the signal that stopped it early (when ``stopped``),
    ``tracker`` :func:`gte_jax.training.hooks.track_finite`'s, ``timing``
    :meth:`gte_jax.timing.StageTimer.report`'s; NaN-free (:func:`json_safe`)."""
    # MNTP's cross-entropy can reach 0; its accuracy is over the masked tokens.
    floor = objectives.from_config(config).floor
    stats = iterator.stats()
    packed = bool(iterator.packing)
    summary = {
        "stage": config.stage,
        # The whole run's counts; the rate is of this process's part (resumed_from_step on).
        "steps": int(steps),
        "examples": int(start_examples + examples),
        "train_seconds": round(seconds, 3),
        "examples_per_second": round(examples / max(seconds, 1e-9), 3),
        "final_loss": float(tracker["loss"]),
        # GTE's loss cannot go below ln 2 (the positive is counted twice in its partition
        # function): "loss_above_floor" and the in-batch top-1 "final_accuracy" read better.
        "loss_floor": round(floor, 6),
        "loss_above_floor": float(tracker["loss"]) - floor,
        "final_accuracy": float(tracker["accuracy"]),
        # over the last ~10 finite steps (hooks.EMA_DECAY), kept on the device: this run's
        # steps only (a resumed run starts it again)
        "smoothed_loss": hooks_lib.smoothed(tracker, "loss"),
        "smoothed_accuracy": hooks_lib.smoothed(tracker, "accuracy"),
        "skipped_records": skipped_records(stats),
        "nonfinite_steps": int(tracker["nonfinite"]),
        "resumed_from_step": start_step,
        "compute_dtype": compute_dtype(config.model.dtype).name,
        # Where the time went (compile / host / device) and padding (processed per real token).
        "timing": {
            **timing,
            # Tokens per packed row at the end of the run (data.packing_row_length).
            **({"packed_row_length": dict(iterator.row_length)} if packed else {}),
        },
        "completed": completed,
        **({"stopped_by": stopped_by} if stopped and not completed else {}),
        "eval_at_start": evaluator.first,
        "eval": evaluator.last,
        "best": evaluator.best_summary(),
        "sources": {name: {k: s[k] for k in SOURCE_STATS if k in s} for name, s in stats.items()},
    }
    return json_safe(summary)
