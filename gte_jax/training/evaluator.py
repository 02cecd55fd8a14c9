"""In-training evaluation: the eval sets of ``config.eval`` on the model being trained, computed
as ``gte-jax eval`` computes them (float32, the model's prompts), and the best model so far."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import jax

from gte_jax import hf
from gte_jax import sharding as shd
from gte_jax.evaluation import EvalSuite
from gte_jax.models.precision import as_float32
from gte_jax.training.checks import TrainingError
from gte_jax.training.spec import EvalSpec
from gte_jax.training.summary import write_json

log = logging.getLogger("gte_jax.train")


class Evaluator:
    """In-training evaluation: ``config.eval.sets`` at step 0 (``eval.at_start``), every
    ``eval.every_steps`` and at the end, written to TensorBoard (``eval/<set>/<metric>``) and the
    summary (``eval_at_start``: step 0 only; ``eval``: the last); with ``eval.best_metric`` the
    best model so far is exported to ``<workdir>/best`` (with ``best.json`` naming its step)."""

    def __init__(self, eval_cfg: EvalSpec, workdir, model_fn, tokenizer, info, writer):
        self.enabled = bool(eval_cfg.sets)
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.best: tuple[int, float] | None = None
        if not self.enabled:
            return
        self.cfg = eval_cfg
        self.suite = EvalSuite(
            [dict(s) for s in eval_cfg.sets],
            batch_size=int(eval_cfg.batch_size),
            max_length=int(eval_cfg.max_length) or None,
        )
        self.suite.check_templates(info.instruction_templates)  # a template mismatch: now
        self.every = int(eval_cfg.every_steps)
        self.metric = str(eval_cfg.best_metric)
        self.sign = 1.0 if eval_cfg.best_mode == "max" else -1.0
        self.workdir, self.model_fn, self.tokenizer, self.info = workdir, model_fn, tokenizer, info
        self.writer = writer

    def due(self, step: int, total_steps: int) -> bool:
        return self.enabled and (step == total_steps or (self.every > 0 and step % self.every == 0))

    def __call__(self, step: int, params: Any) -> dict[str, float]:
        # Sharded as the train step holds them (no gathered or replicated copy: a 7B model fits
        # only sharded); every process calls this, each batch is split over "data".
        # float32 compute whatever the training computes in: the figures are the export's, as
        # `gte-jax eval` / `encode` compute them (models/precision.py).
        model = as_float32(self.model_fn.module(params))
        t0 = time.perf_counter()
        metrics = self.suite(
            model,
            self.tokenizer,
            include_prompt=self.info.include_prompt,
            instruction_templates=self.info.instruction_templates,
            mesh=shd.mesh_of(params),
        )
        log.info("eval at step %d (%.1f s): %s", step, time.perf_counter() - t0, metrics)
        self.writer.write(step, metrics, prefix="eval/")
        if step == 0:
            self.first = dict(metrics, step=step)
        self.last = dict(metrics, step=step)
        if self.metric:
            self._keep_best(step, model, metrics)
        return metrics

    def _keep_best(self, step: int, model: Any, metrics: Mapping[str, float]) -> None:
        if self.metric not in metrics:
            raise TrainingError(
                f"eval.best_metric={self.metric!r} is not among the eval metrics {sorted(metrics)}"
            )
        value = metrics[self.metric]
        if self.best is not None and self.sign * value <= self.sign * self.best[1]:
            return
        self.best = (step, value)
        # Every process takes part in each tensor's gather; process 0 writes.
        hf.export_pretrained(
            model,
            self.tokenizer,
            self.workdir / "best",
            info=self.info,
            card={"metrics": dict(metrics), "description": f"Best {self.metric} at step {step}."},
            lm_head=False,
            write=jax.process_index() == 0,
        )
        if jax.process_index() != 0:
            return
        write_json(
            self.workdir / "best.json",
            {"step": step, "metric": self.metric, "value": value, **metrics},
        )

    def best_summary(self) -> dict[str, Any] | None:
        if self.best is None:
            return None
        return {"step": self.best[0], "metric": self.metric, "value": self.best[1]}
