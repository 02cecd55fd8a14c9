"""Hooks: what the training loop does around the step, each an object with its own interval
(levanter's ``Callback``s, ``add_hook(fn, every=N)``). The loop is setup -> step -> hooks ->
finish; a new stage kind adds a hook or an objective, not a branch in the loop.

A hook receives a :class:`StepContext`. The step's metrics stay on the device until a hook asks
for them (:meth:`StepContext.host_metrics`): steps where no due hook needs them do not wait for
the device, so the host can already prepare the next batch. The loop's hooks, in order: the
non-finite guard (:class:`NonFiniteGuard`), metric logging (:class:`LogMetrics`), the progress
bar (:class:`ProgressBar`), evaluation (:class:`Evaluate`) and checkpoints with the preemption
check (:class:`CheckpointAndPreemption`).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gte_jax.training.checks import TrainingDiverged
from gte_jax.training.state import EXAMPLES_SEEN, checkpointed, full_params

log = logging.getLogger("gte_jax.train")


@dataclasses.dataclass
class StepContext:
    step: int  # steps done (1 after the first)
    total_steps: int
    state: Any  # the train state after this step (device arrays)
    metrics: Any  # this step's metrics (device arrays)
    elapsed: float  # seconds since the loop started
    examples: int  # examples trained on since the loop started (all processes)
    tracker: Any = None  # track_finite's record after this step (device arrays)
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


class Callback:
    """A hook as an object: called after the steps that are multiples of ``every`` (0: never
    periodically) and, with ``at_last``, after the last step."""

    every: int = 1
    at_last: bool = True

    def due(self, ctx: StepContext) -> bool:
        return (self.every > 0 and ctx.step % self.every == 0) or (self.at_last and ctx.is_last)

    def __call__(self, ctx: StepContext) -> None:
        raise NotImplementedError


@dataclasses.dataclass
class Hook(Callback):
    """A function as a hook."""

    fn: Callable[[StepContext], None]
    every: int = 1
    at_last: bool = True
    name: str = ""

    def __call__(self, ctx: StepContext) -> None:
        self.fn(ctx)


class Hooks:
    """An ordered list of hooks; :meth:`run` calls each that is due after a step."""

    def __init__(self) -> None:
        self.hooks: list[Callback] = []

    def add(self, fn: Callable[[StepContext], None], every: int = 1, *, at_last: bool = True):
        self.hooks.append(Hook(fn, int(every), at_last, getattr(fn, "__name__", "")))
        return fn

    def register(self, callback: Callback) -> Callback:
        self.hooks.append(callback)
        return callback

    def run(self, ctx: StepContext) -> None:
        for hook in self.hooks:
            if hook.due(ctx):
                hook(ctx)


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


# --------------------------------------------------------------------------------------------------
# The loop's hooks
# --------------------------------------------------------------------------------------------------


class NonFiniteGuard(Callback):
    """Warns about non-finite steps and stops the run (:class:`TrainingDiverged`) after
    ``max_bad`` in a row. It reads the on-device streak: checked at most ``max_bad`` steps late
    (the updates of non-finite steps are skipped on the device anyway)."""

    def __init__(self, max_bad: int, log_every: int, log_metrics: Callable, checkpoints: Any):
        self.max_bad, self.log_metrics, self.checkpoints = max_bad, log_metrics, checkpoints
        self.every = min(log_every, max(max_bad, 1))

    def __call__(self, ctx: StepContext) -> None:
        streak = int(ctx.tracker["streak"])
        if streak:
            log.warning(
                "steps %d-%d: non-finite loss/gradient, updates skipped", ctx.step - streak + 1,
                ctx.step,
            )  # fmt: skip
        if streak >= self.max_bad:
            self.log_metrics(ctx)
            raise TrainingDiverged(
                f"loss or gradients were NaN/Inf for {streak} steps in a row (at step "
                f"{ctx.step}); no update was applied on those steps. Lower "
                "train.learning_rate, raise train.warmup_ratio, or set loss.temperature higher; "
                f"the last good checkpoint is in {self.checkpoints} (rerun with the same "
                "--workdir to resume)."
            )


class LogMetrics(Callback):
    """The step's metrics and the examples per second, to the metric writer (``train/``)."""

    def __init__(self, writer: Any, every: int):
        self.writer, self.every = writer, every

    def __call__(self, ctx: StepContext) -> None:
        m = dict(ctx.host_metrics())
        m["examples_per_second"] = ctx.examples / max(ctx.elapsed, 1e-9)
        self.writer.write(ctx.step, m, prefix="train/")


class ProgressBar(Callback):
    """A tqdm bar on stderr; shows the metrics a log step fetched (never fetches them itself)."""

    def __init__(self, total: int, initial: int, desc: str, timer: Any, programs: Callable):
        # Imported only when a bar is asked for: tqdm is not a declared dependency (transformers
        # brings it).
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr)
        self.timer, self.programs = timer, programs

    def __call__(self, ctx: StepContext) -> None:
        self.bar.update(ctx.step - self.bar.n)
        if ctx._host is not None:  # fetched by a log step: show it
            m = ctx._host
            self.bar.set_postfix(
                loss=f"{m['loss']:.4f}",
                acc=f"{m.get('accuracy', float('nan')):.3f}",
                ex_s=f"{ctx.examples / max(ctx.elapsed, 1e-9):.1f}",
                host=f"{100 * self.timer.host_seconds / max(ctx.elapsed, 1e-9):.0f}%",
                programs=self.programs(),
            )

    def close(self) -> None:
        self.bar.close()


class Evaluate(Callback):
    """In-training evaluation (:class:`gte_jax.training.evaluator.Evaluator`) of the full model."""

    def __init__(self, evaluator: Any, model_fn: Any):
        self.evaluator, self.model_fn, self.every = evaluator, model_fn, evaluator.every

    def __call__(self, ctx: StepContext) -> None:
        self.evaluator(ctx.step, full_params(self.model_fn, ctx.state))


class CheckpointAndPreemption(Callback):
    """A checkpoint when one is due (the checkpointer's own interval), forced at the last step
    and when the run is asked to stop (SIGTERM, a preemption notice): then ``stopped`` is set
    and the loop ends after this step."""

    def __init__(self, checkpointer: Any, iterator: Any, preempt: Any, start_examples: int):
        self.ckpt, self.iterator, self.preempt = checkpointer, iterator, preempt
        self.start_examples = start_examples
        self.stopped = False
        self.reason: str | None = None  # the signal that stopped the run early, if any

    def __call__(self, ctx: StepContext) -> None:
        stop = self.preempt.due(ctx.step)
        self.ckpt.save(
            ctx.step,
            checkpointed(ctx.state),
            {**self.iterator.get_state(), EXAMPLES_SEEN: self.start_examples + ctx.examples},
            force=stop or ctx.is_last,
        )
        if stop:
            log.warning(
                "stopped by %s at step %d; rerun with the same --workdir to resume",
                self.preempt.reason or "SIGTERM", ctx.step,
            )  # fmt: skip
            self.stopped = True
            self.reason = self.preempt.reason
