"""Where a run's time goes: JAX compile time (from ``jax.monitoring`` events), host time (reading,
tokenising, packing, building global arrays), the rest (the device, as the host waits for it), and
how many of the tokens processed are real text (the rest is padding)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

_COMPILE_PREFIX = "/jax/core/compile/"
_lock = threading.Lock()
_totals = {"seconds": 0.0, "compiles": 0}
_registered = False


def _on_event(name: str, secs: float, **_kw: Any) -> None:
    if not name.startswith(_COMPILE_PREFIX):
        return
    with _lock:
        _totals["seconds"] += secs
        _totals["compiles"] += name.endswith("backend_compile_duration")


def compile_totals() -> dict[str, float]:
    """Seconds spent tracing, lowering and compiling, and backend compiles, since the first call
    (the listener is registered then)."""
    global _registered
    if not _registered:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _registered = True
    with _lock:
        return dict(_totals)


def token_counts(batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(real tokens, processed token slots) of a process-local batch, over every role."""
    real = processed = 0
    for key, value in batch.items():
        if key.endswith("_attention_mask"):
            real += int(np.asarray(value).sum())
            processed += int(np.asarray(value).size)
    return real, processed


class StageTimer:
    """Accumulates a stage's host seconds and token counts; :meth:`report` adds compile time."""

    def __init__(self) -> None:
        self.start = compile_totals()
        self.host_seconds = 0.0
        self.real_tokens = self.processed_tokens = 0

    def add_batch(self, batch: Mapping[str, np.ndarray], host_seconds: float) -> None:
        self.host_seconds += host_seconds
        real, processed = token_counts(batch)
        self.real_tokens += real
        self.processed_tokens += processed

    def report(self, wall_seconds: float, step_programs: int | None) -> dict[str, Any]:
        now = compile_totals()
        compile_seconds = now["seconds"] - self.start["seconds"]
        return {
            "wall_seconds": round(wall_seconds, 3),
            "compile_seconds": round(compile_seconds, 3),
            "compiles": int(now["compiles"] - self.start["compiles"]),
            "train_step_programs": step_programs,
            "host_seconds": round(self.host_seconds, 3),
            # What is left: the host waiting for the device (and hooks: eval, checkpoints).
            "device_and_other_seconds": round(
                max(wall_seconds - compile_seconds - self.host_seconds, 0.0), 3
            ),
            "real_tokens": self.real_tokens,
            "processed_tokens": self.processed_tokens,
            "processed_per_real_token": round(self.processed_tokens / max(self.real_tokens, 1), 4),
        }
