"""The one training loop. Every stage (weakly supervised pre-training, fine-tuning, MNTP,
SimCSE) is this loop with another config: setup (:mod:`gte_jax.training.setup`) -> step
(:mod:`gte_jax.training.step`) -> hooks (:mod:`gte_jax.training.hooks`) -> finish (the summary,
the model card and the export). Only ``gte_jax/commands/`` import this module
(``tests/test_architecture.py``); it runs :class:`gte_jax.training.spec.StageSpec` values."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from etils import epath

from gte_jax import interpolate, sharded_io, storage
from gte_jax import sharding as shd
from gte_jax import workdir as wd
from gte_jax.checkpoint import PreemptionFlag, absolute_path
from gte_jax.metrics import MetricWriter
from gte_jax.timing import StageTimer
from gte_jax.training import hooks as hooks_lib
from gte_jax.training.checks import check_config, run_mesh
from gte_jax.training.evaluator import Evaluator
from gte_jax.training.setup import Stage, setup_stage
from gte_jax.training.spec import StageSpec, parse, stage_specs
from gte_jax.training.state import full_params
from gte_jax.training.step import StepRunner
from gte_jax.training.summary import stage_summary, write_json

log = logging.getLogger("gte_jax.train")


@contextlib.contextmanager
def frozen_heap():
    """Everything alive on entry (modules, the model, the tokenizer: what lives for the whole
    run) is kept out of the cyclic collector's way until exit. Tracing the train step allocates
    enough to set off full collections, and each walked that heap: ~1 s of a MiniLM step's 3.6 s
    trace (profiled on 2 CPU cores). Collected first, so no garbage is kept. A caller that froze its own heap
    (``gc.freeze()`` before forking workers, say) keeps its policy: nothing is done then, since
    ``gc.unfreeze()`` would thaw the caller's objects too."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def train_stage(
    config: StageSpec | ml_collections.ConfigDict, workdir: str | epath.PathLike
) -> dict[str, Any]:
    """Runs one stage to its last step (resuming from ``workdir`` if it holds checkpoints) and
    returns the run summary; a stage that already finished is not run again. A one-stage
    ``ConfigDict`` is parsed first (:func:`gte_jax.training.spec.parse`)."""
    workdir = absolute_path(workdir)
    config = parse(config)  # settings refused here, before the mesh: mesh.data=0 is one of them
    mesh = run_mesh(config)
    num_chunks = check_config(config, mesh)
    storage.check_writable(workdir)  # read-only, full or unreachable: one line, nothing loaded
    st = setup_stage(config, workdir, mesh, num_chunks)
    if isinstance(st, dict):
        return st
    loop = Loop(st)
    loop.run()
    return loop.finish()


class Loop:
    """The step loop of one stage: step, then the hooks that are due, each with its own interval
    (:mod:`gte_jax.training.hooks`). Metrics leave the device only for the hooks that read them."""

    def __init__(self, st: Stage):
        self.st = st
        self.runner = StepRunner(st.step.jitted)
        tcfg = st.config.train
        self.is_main = jax.process_index() == 0
        self.writer = MetricWriter(st.workdir / "logs", enabled=self.is_main)
        self.evaluator = Evaluator(
            st.config.eval, st.workdir, st.model_fn, st.tokenizer, st.info, self.writer
        )
        self.preempt = PreemptionFlag(fallback_every=max(1, tcfg.log_every))
        self.tracker = hooks_lib.new_tracker()
        self.timer = StageTimer()
        self.examples = 0
        self.step = st.start_step
        self.seconds = 0.0
        self.progress: hooks_lib.ProgressBar | None = None
        self.hooks = self._hooks()

    def _hooks(self) -> hooks_lib.Hooks:
        st, tcfg = self.st, self.st.config.train
        log_every = max(1, tcfg.log_every)
        hooks = hooks_lib.Hooks()
        log_metrics = hooks_lib.LogMetrics(self.writer, log_every)
        max_bad = tcfg.max_consecutive_nonfinite
        hooks.register(hooks_lib.NonFiniteGuard(max_bad, log_every, log_metrics, st.ckpt.directory))
        hooks.register(log_metrics)
        if self.is_main and tcfg.progress_bar:
            self.progress = hooks.register(
                hooks_lib.ProgressBar(
                    st.total_steps, st.start_step, st.config.stage, self.timer,
                    lambda: self.runner.programs,
                )
            )  # fmt: skip
        if self.evaluator.enabled:
            hooks.register(hooks_lib.Evaluate(self.evaluator, st.model_fn))
        self.checkpoints = hooks.register(
            hooks_lib.CheckpointAndPreemption(st.ckpt, st.iterator, self.preempt, st.start_examples)
        )
        return hooks

    def run(self) -> None:
        st = self.st
        if self.evaluator.enabled and st.config.eval.at_start and self.step == 0:
            self.evaluator(0, full_params(st.model_fn, st.state))
        self.preempt.install()
        layout = st.iterator.layout
        blocks = layout.num_blocks  # local rows -> global rows
        t0 = time.perf_counter()
        try:
            with frozen_heap():  # the start-up heap, out of the GC's way
                while self.step < st.total_steps and not self.checkpoints.stopped:
                    t_host = time.perf_counter()
                    local = next(st.iterator)
                    batch = shd.global_batch(local, st.mesh, layout)
                    self.timer.add_batch(local, time.perf_counter() - t_host)
                    st.state, metrics = self.runner(st.state, batch)
                    self.tracker = hooks_lib.track_finite(self.tracker, metrics)
                    self.step += 1
                    self.examples += int(local["valid"].shape[0]) // layout.groups * blocks
                    ctx = hooks_lib.StepContext(
                        self.step, st.total_steps, st.state, metrics,
                        time.perf_counter() - t0, self.examples, self.tracker,
                    )  # fmt: skip
                    self.hooks.run(ctx)
        finally:
            self.seconds = time.perf_counter() - t0
            st.iterator.close()
            if self.progress is not None:
                self.progress.close()
            st.ckpt.close()
            self.writer.close()
            self.preempt.uninstall()

    def finish(self) -> dict[str, Any]:
        """The summary (summary.json), the model card (card.json) and the export of a finished
        stage."""
        st = self.st
        completed = self.step >= st.total_steps
        if completed and self.evaluator.enabled and not self.evaluator.last:
            self.evaluator(self.step, full_params(st.model_fn, st.state))  # resumed at the end
        summary = stage_summary(
            st.config, st.iterator, self.evaluator,
            steps=self.step, start_step=st.start_step, examples=self.examples,
            start_examples=st.start_examples, seconds=self.seconds, tracker=self.tracker,
            timing=self.timer.report(self.seconds, self.runner.programs), completed=completed,
            stopped=self.checkpoints.stopped, stopped_by=self.checkpoints.reason,
        )  # fmt: skip
        card = wd.stage_card(st.config, summary)
        if self.is_main and completed:
            write_json(st.workdir / "card.json", card)
        if completed and st.config.export.enabled:
            summary["export"] = str(
                wd.export_workdir(
                    st.workdir,
                    st.workdir / "export",
                    card=card,
                    interpolate=interpolate.from_config(st.config.export),
                    shardings_of=lambda abstract: sharded_io.param_shardings(
                        abstract, st.mesh, st.config.sharding
                    ),
                )[0]
            )
        if self.is_main:
            write_json(st.workdir / "summary.json", summary)
        return summary


def run(
    config: StageSpec | Sequence[StageSpec] | ml_collections.ConfigDict,
    workdir: str | epath.PathLike,
) -> list[dict[str, Any]]:
    """One stage (a spec: in ``workdir``), or each stage of a multi-stage config in order (a
    sequence of specs, :func:`gte_jax.training.spec.stage_specs`: each in ``workdir/<stage>``); a
    stage whose ``model.init_from`` is ``"stage:<name>"`` starts from that stage's final
    checkpoint. A ``ConfigDict`` is parsed first."""
    workdir = absolute_path(workdir)
    if isinstance(config, ml_collections.ConfigDict):
        config = stage_specs(config)
    if isinstance(config, StageSpec):
        return [train_stage(config, workdir)]
    storage.check_writable(workdir)
    summaries = []
    for spec in config:
        init = spec.model.init_from
        if init.startswith("stage:"):
            model = dataclasses.replace(spec.model, init_from=str(workdir / init.split(":", 1)[1]))
            spec = spec.replace(model=model)
        summaries.append(train_stage(spec, workdir / spec.stage))
        if not summaries[-1]["completed"]:
            break
    return summaries
