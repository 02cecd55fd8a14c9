"""Hooks: what the training loop does around the step, each with its own interval (levanter's
``add_hook(fn, every=N)``). The loop is setup -> step -> hooks -> finish; a new stage kind adds a
hook or a loss, not a branch in the loop.

A hook receives a :class:`StepContext`. The step's metrics stay on the device until a hook asks
for them (:meth:`StepContext.host_metrics`): steps where no due hook needs them do not wait for
the device, so the host can already prepare the next batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class StepContext:
    step: int  # steps done (1 after the first)
    total_steps: int
    state: Any  # the train state after this step (device arrays)
    metrics: Any  # this step's metrics (device arrays)
    elapsed: float  # seconds since the loop started
    examples: int  # examples trained on since the loop started (all processes)
    _host: dict[str, float] | None = None

    @property
    def is_last(self) -> bool:
        return self.step >= self.total_steps

    def host_metrics(self) -> dict[str, float]:
        """This step's metrics as floats (fetched from the device once, on first use)."""
        if self._host is None:
            fetched = jax.device_get(dict(self.metrics))
            self._host = {k: float(np.asarray(v)) for k, v in fetched.items()}
        return self._host


@dataclasses.dataclass
class Hook:
    fn: Callable[[StepContext], None]
    every: int = 1  # run after steps that are multiples of this (0: never periodically)
    at_last: bool = True  # run after the last step too
    name: str = ""

    def due(self, ctx: StepContext) -> bool:
        return (self.every > 0 and ctx.step % self.every == 0) or (self.at_last and ctx.is_last)


class Hooks:
    """An ordered list of hooks; :meth:`run` calls each that is due after a step."""

    def __init__(self) -> None:
        self.hooks: list[Hook] = []

    def add(self, fn: Callable[[StepContext], None], every: int = 1, *, at_last: bool = True):
        self.hooks.append(Hook(fn, int(every), at_last, getattr(fn, "__name__", "")))
        return fn

    def run(self, ctx: StepContext) -> None:
        for hook in self.hooks:
            if hook.due(ctx):
                hook.fn(ctx)


# ours: the smoothed loss's decay per finite step (an EMA over ~1 / (1 - 0.9) = 10 steps): one
# batch's loss swings with the batch (the demo's stage 1 ends on a single 4.59), ten steps' does not.
EMA_DECAY = 0.9


@jax.jit
def track_finite(tracker: dict[str, jax.Array], metrics: dict[str, jax.Array]):
    """On the device: the streak and total of non-finite steps, the last finite loss and
    accuracy, and their exponential moving averages over finite steps (no host round trip per
    step). The averages are kept unnormalised with their weight ``1 - decay^n`` (Adam's bias
    correction): :func:`smoothed` divides, so the first steps are not pulled towards 0."""
    finite = metrics["finite"].astype(bool)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    loss = metrics["loss"].astype(jnp.float32)
    accuracy = metrics["accuracy"].astype(jnp.float32)
    ema = lambda new, old: keep(EMA_DECAY * old + (1 - EMA_DECAY) * new, old)  # noqa: E731
    return {
        "streak": jnp.where(finite, 0, tracker["streak"] + 1),
        "nonfinite": tracker["nonfinite"] + (~finite).astype(jnp.int32),
        "loss": keep(loss, tracker["loss"]),
        "accuracy": keep(accuracy, tracker["accuracy"]),
        "loss_ema": ema(jnp.where(finite, loss, 0.0), tracker["loss_ema"]),
        "accuracy_ema": ema(jnp.where(finite, accuracy, 0.0), tracker["accuracy_ema"]),
        "ema_weight": ema(1.0, tracker["ema_weight"]),
    }


def new_tracker() -> dict[str, jax.Array]:
    nan = jnp.asarray(jnp.nan, jnp.float32)
    zero = jnp.zeros((), jnp.int32)
    zero_f = jnp.zeros((), jnp.float32)
    return {
        "streak": zero, "nonfinite": zero, "loss": nan, "accuracy": nan,
        "loss_ema": zero_f, "accuracy_ema": zero_f, "ema_weight": zero_f,
    }  # fmt: skip


def smoothed(tracker: dict[str, Any], name: str) -> float:
    """The bias-corrected moving average of ``name`` ("loss" or "accuracy") over the finite steps
    tracked (NaN before the first)."""
    weight = float(tracker["ema_weight"])
    return float(tracker[f"{name}_ema"]) / weight if weight > 0 else float("nan")
