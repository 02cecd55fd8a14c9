"""The one training loop. Every stage (weakly supervised pre-training, fine-tuning) is this loop with
another config.

Pure core: ``make_train_step`` returns a function of (state, global batch) -> (state, metrics) that
`jax.jit` compiles once; the loss is written on the *global* batch (every query against every
document on every device) and the data sharding of the batch makes XLA insert the gathers.
Thin shell: ``train`` wires config, data, model, checkpoints and metrics around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
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

from gte_jax import hooks as hooks_lib
from gte_jax import objectives
from gte_jax import sharding as shd
from gte_jax.errors import ConfigError
from gte_jax.models import attention
from gte_jax.models.encoder import ModelFn
from gte_jax.models.pooling import POOLING_MODES
from gte_jax.models.precision import as_float32, compute_dtype
from gte_jax.objectives.mntp import MNTP_LOGITS_BLOCK, mntp_value_and_grad  # noqa: F401
from gte_jax.timing import StageTimer

log = logging.getLogger("gte_jax.train")


# --------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------


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
    """AdamW with linear warmup then linear or cosine decay to zero, global-norm clipping.

    ``train_cfg`` is a config's ``train`` group; fields it lacks take their defaults from
    :func:`gte_jax.defaults.stage_config` (the one place defaults live)."""
    from gte_jax.defaults import stage_config

    cfg = stage_config().train
    cfg.update(dict(train_cfg))
    warmup = int(cfg.warmup_steps)
    if not warmup and cfg.warmup_ratio:
        warmup = int(round(float(cfg.warmup_ratio) * total_steps))
    warmup = min(warmup, max(total_steps - 1, 0))
    peak = float(cfg.learning_rate)
    decay_steps = max(total_steps - warmup, 1)
    kind = cfg.schedule
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
    if cfg.max_grad_norm:
        parts.append(optax.clip_by_global_norm(float(cfg.max_grad_norm)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(cfg.adam_b1),
            b2=float(cfg.adam_b2),
            eps=float(cfg.adam_eps),
            weight_decay=float(cfg.weight_decay),
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*parts), schedule


def update_count(opt_state: Any) -> jax.Array:
    """Updates applied so far (optax's ``count``): a skipped non-finite step does not count, so
    the learning rate of the next update is ``schedule(update_count(opt_state))``."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    if not counts:
        raise ValueError("the optimizer state has no update count")
    return counts[0][1]


# --------------------------------------------------------------------------------------------------
# The train step (pure)
# --------------------------------------------------------------------------------------------------


def make_embed_fn(model_fn: ModelFn, frozen: Mapping[str, Any] | None = None):
    """``embed_fn(params, inputs, rng) -> [b, D]`` for :mod:`gte_jax.gradcache` on pure params.

    With ``frozen`` (LoRA: the frozen base, a traced argument of the step, never a constant),
    ``params`` is the trainable part only, so gradients are taken w.r.t. it alone."""

    def embed_fn(params, inputs, rng):
        model = model_fn.module(model_fn.join_params(params, frozen) if frozen else params)
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
    objective: objectives.Objective | None = None,
    *,
    loss_name: str = "gte",
    loss_kwargs: Mapping[str, Any] | None = None,
    num_chunks: int = 1,
    gradcache: bool = False,
    dropout: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    schedule: Callable | None = None,
    kind: str = "contrastive",
) -> Callable:
    """``step(state, batch) -> (state, metrics)`` on the global batch.

    ``objective`` (:mod:`gte_jax.objectives`) gives the loss and its gradient: a contrastive one
    embeds every role (GradCache when ``gradcache``); MNTP scores the query role's masked tokens
    with the LM head. Without it, ``loss_name`` / ``loss_kwargs`` (``kind="mntp"``: MNTP) name
    a registered objective and its settings. Everything after the gradient (skip when not
    finite, the update, the state) is shared.

    ``state`` = {"params", "opt_state", "step", "rng"} (+ "frozen" with LoRA: the frozen base,
    passed through unchanged; "params" and the optimizer state are the LoRA factors alone).
    The dropout key of a step is
    ``fold_in(rng, step)``: a pure function of the step, so a resumed run draws the same masks.
    A non-finite loss or gradient leaves params and optimizer state untouched (``metrics["finite"]``
    says so; the loop counts and stops after too many in a row). With ``schedule``,
    ``metrics["learning_rate"]`` is the rate of this step's update (skipped steps do not advance
    it: :func:`update_count`).
    """
    if objective is None:
        name = "mntp" if kind == "mntp" else loss_name
        objective = objectives.get(name)
        if name != "mntp":
            objective = dataclasses.replace(objective, **dict(loss_kwargs or {}))

    def step_fn(state, batch):
        embed_fn = make_embed_fn(model_fn, state.get("frozen"))
        rng = jax.random.fold_in(state["rng"], state["step"]) if dropout else None
        inputs = objectives.StepInputs(
            model_fn, state["params"], state.get("frozen"), embed_fn, batch, rng, num_chunks,
            gradcache, mesh,
        )  # fmt: skip
        (loss, metrics), grads = objective.value_and_grad(inputs)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["finite"] = finite
        if schedule is not None:
            metrics["learning_rate"] = schedule(update_count(state["opt_state"]))
        new_state = {
            "params": keep(new_params, state["params"]),
            "opt_state": keep(new_opt, state["opt_state"]),
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        if "frozen" in state:  # returned as given: the donated buffers are reused in place
            new_state["frozen"] = state["frozen"]
        return new_state, metrics

    return step_fn


# --------------------------------------------------------------------------------------------------
# The loop (shell)
# --------------------------------------------------------------------------------------------------

# The lowest value each loss can reach (each objective's ``floor``; GTE's is ln 2).
LOSS_FLOORS = {name: objectives.get(name).floor for name in objectives.contrastive_names()}


# Per-source counts the summary reports (read = used + skipped; records short of K negatives are
# kept with a validity mask and counted).
_SOURCE_STATS = (
    "size", "read", "used", "skipped", "skipped_at_build", "num_negatives",
    "records_short_of_negatives", "unattributed",
)  # fmt: skip


class TrainingError(RuntimeError):
    """The run cannot start or go on with this config / input; the message says what to do."""


class TrainingDiverged(TrainingError):
    """The loss stayed NaN/Inf; the run stopped (its last good checkpoint is kept)."""


def load_model_for_training(model_cfg: Any):
    """(BiEncoder, tokenizer, PretrainedInfo) from ``model.init_from`` (the one rule of
    :mod:`gte_jax.workdir`), with the stage's normalisation and ``include_prompt`` applied so that
    the loss, in-training eval and every export see the same embedding."""
    from gte_jax import workdir as wd

    dtype = compute_dtype(model_cfg.dtype)
    if str(model_cfg.dtype) == "auto":
        log.info("model.dtype=auto: %s compute on %s", dtype.name, jax.default_backend())
    model, tokenizer, info = wd.load_model(
        str(model_cfg.init_from),
        dtype=dtype,
        host=True,  # placed shard by shard by initial_state
        **wd.model_overrides(model_cfg),
    )
    if model.normalize != bool(model_cfg.normalize):
        log.info(
            "model.normalize=%s (the model directory said %s): the loss and the export use %s",
            bool(model_cfg.normalize),
            model.normalize,
            "unit-norm (cosine) embeddings" if model_cfg.normalize else "raw embeddings",
        )
        model.normalize = bool(model_cfg.normalize)
    if str(model_cfg.pooling) not in ("auto", model.pooling):
        log.info("model.pooling=%s (the model directory said %s)", model_cfg.pooling, model.pooling)
        model.pooling = str(model_cfg.pooling)
    choice = str(model_cfg.include_prompt).lower()
    if choice != "auto":
        info.include_prompt = choice == "true"
    from gte_jax.prompts import configure_tokenizer

    # On the tokenizer itself, so batches, in-training eval and every export (base_model/, whose
    # tokenizer sentence-transformers applies) pad and end texts alike.
    configure_tokenizer(
        tokenizer, padding_side=str(model_cfg.padding_side), append_eos=bool(model_cfg.append_eos)
    )
    embeddings = getattr(model.encoder, "embeddings", None)
    if tokenizer.padding_side == "left" and hasattr(embeddings, "position_embeddings"):
        raise TrainingError(
            "left padding (model.padding_side, or the tokenizer's own) with absolute position "
            "embeddings makes each embedding depend on how many pads precede its text (a batch's "
            "longest text decides): set model.padding_side=right; left padding is for RoPE "
            "decoders (Qwen3-Embedding)"
        )
    return model, tokenizer, info


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
    from gte_jax.data.pipeline import source_kinds

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
    from gte_jax.ranges import range_problems

    tcfg, lcfg, data_devices = config.train, config.loss, mesh.shape[shd.DATA_AXIS]
    problems = range_problems(config) + stage_kind_problems(config)
    if str(config.kind) != "mntp" and lcfg.name not in objectives.contrastive_names():
        problems.append(f"loss.name={lcfg.name!r}: use one of {objectives.contrastive_names()}")
    else:
        problems.extend(objectives.from_config(config).problems(config))
    problems.extend(matryoshka_problems(lcfg))
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
        from gte_jax.models import lora

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
    from gte_jax.objectives.matryoshka import sorted_dims

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


def _total_steps(train_cfg: Any, num_records: int, batch_size: int) -> int:
    if train_cfg.num_steps:
        return int(train_cfg.num_steps)
    epochs = float(train_cfg.epochs)
    if epochs <= 0:
        raise TrainingError("set train.num_steps or train.epochs (> 0)")
    return max(1, math.ceil(epochs * num_records / batch_size))


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
    from gte_jax import storage

    storage.write_text(
        path, json.dumps(json_safe(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    )


def _finished_summary(workdir: epath.Path, last_step: int | None, total_steps: int):
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


@dataclasses.dataclass
class _Stage:
    """What ``train_stage`` sets up once and the loop then uses."""

    config: Any
    workdir: epath.Path
    mesh: Any
    iterator: Any
    total_steps: int
    schedule: Callable
    model_fn: Any
    tokenizer: Any
    info: Any
    state: Any
    start_step: int
    ckpt: Any
    jit_step: Callable
    start_examples: int = 0  # examples of the steps before start_step (a resumed run)


def _setup_stage(config: Any, workdir: epath.Path, mesh: Any, num_chunks: int):
    """Sources, model, iterator, optimizer, state (restored when the workdir has checkpoints) and
    the compiled step; or the existing summary when this stage already finished."""
    from gte_jax import hf, storage
    from gte_jax.checkpoint import Checkpointer, abstract_like
    from gte_jax.data.pipeline import build_iterator, build_sources
    from gte_jax.data.prefetch import with_prefetch

    is_main = jax.process_index() == 0
    tcfg, batch_size = config.train, int(config.train.batch_size)
    # Sources first: a bad data config fails in seconds, before the model is loaded or written.
    data_cfg = config.data.copy_and_resolve_references()
    data_cfg.batch_size = batch_size
    if data_cfg.max_length:  # one budget for queries and documents
        data_cfg.query_max_length = data_cfg.doc_max_length = int(data_cfg.max_length)
    sources = build_sources(data_cfg)
    check_source_batches(sources, num_chunks, mesh.shape[shd.DATA_AXIS])
    total_steps = _total_steps(tcfg, sum(len(s) for s in sources), batch_size)
    ckpt = Checkpointer(
        workdir / "checkpoints",
        every_steps=int(config.checkpoint.every_steps),
        max_to_keep=int(config.checkpoint.max_to_keep),
        async_save=bool(config.checkpoint.async_save),
    )
    done = _finished_summary(workdir, ckpt.latest_step(), total_steps)
    if done is not None:
        ckpt.close()
        return done
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        storage.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))

    model, tokenizer, info = _stage_model(config, data_cfg, sources)
    # A base_model/ without its completion marker (a full disk or a kill while it was written):
    # written again, whole.
    if is_main and not storage.is_complete(workdir / "base_model"):
        hf.export_pretrained(model, tokenizer, workdir / "base_model", info=info)
    iterator = build_iterator(
        data_cfg,
        tokenizer=tokenizer,
        sources=sources,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        layout=shd.BatchLayout.of_mesh(mesh),
        include_prompt=info.include_prompt,
        pack_chunks=num_chunks,  # packing + GradCache: rows dealt to chunks by token budget
        mntp=_mntp_masking(config, model, tokenizer),
    )
    iterator.prime_row_floor(int(data_cfg.packing_estimate_batches), run_batches=total_steps)
    tx, schedule = make_optimizer(tcfg, total_steps)
    _inject_lora(config, model, workdir, is_main)
    model_fn, params = ModelFn.from_module(model, train_lm_head=trains_lm_head(config))
    trainable, frozen = model_fn.split_params(params)
    state = initial_state(trainable, tx, int(tcfg.seed), mesh, config.sharding, frozen=frozen)
    restored = ckpt.restore(abstract_like(checkpointed(state)))
    _check_frozen_base(frozen, workdir, resuming=restored is not None, is_main=is_main)
    start_step = start_examples = 0
    if restored is not None:
        start_step, saved, data_state = restored
        state = {**state, **saved}
        # Checkpoints written before the count was saved: every step drew train.batch_size.
        start_examples = int(data_state.pop(EXAMPLES_SEEN, start_step * batch_size))
        iterator.set_state(data_state)
        log.info("resumed from %s at step %d", ckpt.directory, start_step)
    iterator = with_prefetch(iterator, int(data_cfg.prefetch))
    jit_step = _compiled_step(config, model_fn, tx, schedule, num_chunks, mesh, state)
    return _Stage(
        config, workdir, mesh, iterator, total_steps, schedule, model_fn, tokenizer, info,
        state, start_step, ckpt, jit_step, start_examples,
    )  # fmt: skip


def _stage_model(config: Any, data_cfg: Any, sources: Any):
    """(model, tokenizer, info) of a stage, its info carrying the prompts and templates this
    stage trains with (what the export records)."""
    from gte_jax.prompts import training_prompts, training_templates

    model, tokenizer, info = load_model_for_training(config.model)
    longest = max(int(data_cfg.query_max_length), int(data_cfg.doc_max_length))
    if longest > model.config.max_length:
        raise TrainingError(
            f"data max length {longest} exceeds the model's {model.config.max_length} positions: "
            "lower data.query_max_length / data.doc_max_length"
        )
    # The export carries the prompts this stage trained with (after those of earlier stages).
    info.prompts = {**info.prompts, **training_prompts(sources)}
    # A stage without instructions keeps the templates of the stage it started from.
    info.instruction_templates = training_templates(sources) or info.instruction_templates
    return model, tokenizer, info


# The data state of a checkpoint also holds the examples trained on up to its step, so that a
# resumed run's summary counts the whole run.
EXAMPLES_SEEN = "examples_seen"


def _mntp_masking(config: Any, model: Any, tokenizer: Any):
    """The MNTP masking rule of a ``kind="mntp"`` stage (None for other kinds); the model must
    have an LM head (a decoder with tied embeddings or a ``*ForCausalLM`` head)."""
    if str(config.kind) != "mntp":
        return None
    from gte_jax.data.mntp import masking_from_config

    tower = model.encoder
    has_head = getattr(tower, "lm_head", None) is not None or getattr(
        tower.config, "tie_word_embeddings", False
    )
    if not hasattr(tower, "lm_logits") or not has_head:
        raise TrainingError(
            f"kind=mntp predicts masked tokens with the LM head, but {config.model.init_from} "
            "has none: start from a decoder's *ForCausalLM checkpoint (lm_head.weight) or one "
            "with tied embeddings"
        )
    return masking_from_config(config.mntp, tokenizer, int(config.data.seed))


FROZEN_BASE_FILE = "frozen_base.sha256"


def frozen_fingerprint(frozen: Any) -> str:
    """A cheap fingerprint of the frozen base weights: every leaf's path, shape, dtype and 4096
    evenly spaced entries (seconds for a 7B model; another checkpoint differs in all of them)."""
    import hashlib

    digest = hashlib.sha256()
    leaves = sorted(
        (jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(frozen)
    )
    for name, x in leaves:
        a = np.asarray(x).reshape(-1)
        digest.update(f"{name}:{a.shape}:{a.dtype};".encode())
        digest.update(np.ascontiguousarray(a[:: max(1, a.size // 4096)]).tobytes())
    return digest.hexdigest()


def _check_frozen_base(frozen: Any, workdir: epath.Path, *, resuming: bool, is_main: bool) -> None:
    """Checkpoints of a LoRA run hold the factors only; the frozen base comes from
    ``model.init_from`` again on resume. If that now gives other weights, the factors would be
    applied to a base they were not trained on, silently: refuse (exit 2) instead."""
    if not jax.tree.leaves(frozen):
        return
    path = workdir / FROZEN_BASE_FILE
    fingerprint = frozen_fingerprint(frozen)
    if resuming and path.exists() and path.read_text().strip() != fingerprint:
        raise TrainingError(
            f"model.init_from gives other base weights than the ones this run's LoRA factors were "
            f"trained on ({path} differs): resume with the original model.init_from, or start a "
            "new workdir"
        )
    if is_main and not path.exists():
        from gte_jax import storage

        storage.write_text(path, fingerprint + "\n")


def _inject_lora(config: Any, model: Any, workdir: epath.Path, is_main: bool) -> None:
    """With ``model.lora.enabled``: LoRA layers on the target projections (A from the run's seed)
    and ``<workdir>/lora.json``, which export and later stages read to rebuild the model."""
    from flax import nnx

    from gte_jax.models import lora

    lora_cfg = lora.LoRAConfig.from_config(config.model.lora)
    if lora_cfg is None:
        return
    paths = lora.inject(model, lora_cfg, rngs=nnx.Rngs(int(config.train.seed)))
    log.info("LoRA (rank %d, alpha %g) on %d layers", lora_cfg.rank, lora_cfg.alpha, len(paths))
    if is_main:
        from gte_jax import storage
        from gte_jax import workdir as wd

        storage.write_text(workdir / wd.LORA_FILE, lora_cfg.to_json())


def _compiled_step(config, model_fn, tx, schedule, num_chunks: int, mesh, state) -> Callable:
    """The stage's jitted train step; its output state keeps the input state's shardings."""
    step_fn = make_train_step(
        model_fn,
        tx,
        objectives.from_config(config),
        num_chunks=num_chunks,
        gradcache=bool(config.train.gradcache),
        dropout=bool(config.model.train_dropout),
        mesh=mesh,
        schedule=schedule,
    )
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(step_fn, out_shardings=(state_sharding, None), donate_argnums=(0,))


class StepRunner:
    """Calls the jitted step. With several processes each new batch shape is compiled ahead
    (``lower().compile()``) and the processes meet at a host barrier before running it: a host
    that compiled faster would otherwise wait inside the step's first collective, and CPU
    collectives (gloo) give up after 30 s. Once per program, never per step."""

    def __init__(self, jit_step: Callable, timeout_s: float = 3600.0):
        self.jit_step = jit_step
        self.compiled: dict[Any, Any] = {}
        self.timeout_ms = int(timeout_s * 1000)

    def __call__(self, state: Any, batch: Mapping[str, Any]):
        if jax.process_count() == 1:
            return self.jit_step(state, batch)
        key = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items()))
        exe = self.compiled.get(key)
        if exe is None:
            from jax._src import distributed

            exe = self.jit_step.lower(state, batch).compile()
            barrier = f"gte_jax/step_compiled/{len(self.compiled)}"
            distributed.global_state.client.wait_at_barrier(barrier, self.timeout_ms)
            self.compiled[key] = exe
        return exe(state, batch)

    @property
    def programs(self) -> int | None:
        return len(self.compiled) if self.compiled else _cache_size(self.jit_step)


def _cache_size(fn: Any) -> int | None:
    """How many programs a jitted function compiled (None where JAX does not say)."""
    size = getattr(fn, "_cache_size", None)
    return int(size()) if callable(size) else None


def init_train_state(
    params: Any, tx: optax.GradientTransformation, seed: int, frozen: Any = None
) -> dict[str, Any]:
    """The train state every step, checkpoint and test uses: params, optimizer state, step, RNG;
    with ``frozen`` (LoRA's frozen base: ``ModelFn.split_params``) also "frozen", which is in
    neither the optimizer state nor the checkpoints (:func:`checkpointed`)."""
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }
    if frozen:
        state["frozen"] = frozen
    return state


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


def checkpointed(state: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint holds: the state less LoRA's frozen base, which the run reloads from
    ``model.init_from`` (the same bits: ``<workdir>/base_model`` is written from it)."""
    return {k: v for k, v in state.items() if k != "frozen"}


def full_params(model_fn: ModelFn, state: Mapping[str, Any]) -> dict[str, Any]:
    """Every parameter of the model (trainable + frozen): what eval and export rebuild it from."""
    return model_fn.join_params(state["params"], state.get("frozen", {}))


def initial_state(
    params: Any, tx, seed: int, mesh, sharding_cfg: Any, frozen: Any = None
) -> dict[str, Any]:
    """``init_train_state`` created where it lives: each parameter goes from host memory straight
    to its shards (``sharding.place``), and the optimizer state is made by a jitted init with the
    state's shardings, so under FSDP no device ever holds a whole model or its Adam moments (a
    7B model starts on chips that could not hold it). ``frozen``: LoRA's frozen base, placed the
    same way."""

    def init(p, f):
        return init_train_state(p, tx, seed, f)

    frozen = frozen or None
    shardings = shd.state_shardings(jax.eval_shape(init, params, frozen), mesh, sharding_cfg)
    placed = shd.place(params, shardings["params"])
    if frozen is not None:
        frozen = shd.place(frozen, shardings["frozen"])
    return jax.jit(init, out_shardings=shardings, donate_argnums=(0, 1))(placed, frozen)


def train_stage(config: Any, workdir: str | epath.PathLike) -> dict[str, Any]:
    """Runs one stage to its last step (resuming from ``workdir`` if it holds checkpoints) and
    returns the run summary; a stage that already finished is not run again."""
    from gte_jax import storage
    from gte_jax.checkpoint import absolute_path
    from gte_jax.ranges import range_problems

    workdir = absolute_path(workdir)
    if problems := range_problems(config):  # before the mesh: mesh.data=0 is one of them
        raise TrainingError(cannot_run(problems))
    mesh = run_mesh(config)
    num_chunks = check_config(config, mesh)
    storage.check_writable(workdir)  # read-only, full or unreachable: one line, nothing loaded
    st = _setup_stage(config, workdir, mesh, num_chunks)
    if isinstance(st, dict):
        return st
    loop = _Loop(st)
    loop.run()
    return loop.finish()


class _Loop:
    """The step loop of one stage: step, then the hooks that are due (the non-finite guard,
    metric logging, the progress bar, evaluation, checkpoints, preemption), each with its own
    interval (:mod:`gte_jax.hooks`). Metrics leave the device only for the hooks that read them."""

    def __init__(self, st: _Stage):
        from gte_jax.checkpoint import PreemptionFlag
        from gte_jax.metrics import MetricWriter

        self.st = st
        self.runner = StepRunner(st.jit_step)
        tcfg = st.config.train
        self.is_main = jax.process_index() == 0
        self.writer = MetricWriter(st.workdir / "logs", enabled=self.is_main)
        self.evaluator = Evaluator(
            st.config.eval, st.workdir, st.model_fn, st.tokenizer, st.info, self.writer
        )
        self.preempt = PreemptionFlag(fallback_every=max(1, int(tcfg.log_every)))
        self.max_bad = int(tcfg.max_consecutive_nonfinite)
        self.tracker = hooks_lib.new_tracker()
        self.timer = StageTimer()
        self.examples = 0
        self.step = st.start_step
        self.seconds = 0.0
        self.stopped = False
        self.interrupted: str | None = None  # the signal that stopped the run early, if any
        self.progress = None
        if self.is_main and bool(tcfg.progress_bar):
            from tqdm import tqdm

            self.progress = tqdm(
                total=st.total_steps, initial=st.start_step, desc=str(st.config.stage),
                file=sys.stderr,
            )  # fmt: skip
        log_every = max(1, int(tcfg.log_every))
        self.hooks = hooks_lib.Hooks()
        # The guard reads the on-device streak: checked at most max_bad steps late (the updates
        # of non-finite steps are skipped on the device anyway).
        self.hooks.add(self._guard, every=min(log_every, max(self.max_bad, 1)))
        self.hooks.add(self._log, every=log_every)
        if self.progress is not None:
            self.hooks.add(self._progress, every=1)
        if self.evaluator.enabled:
            self.hooks.add(self._evaluate, every=self.evaluator.every)
        self.hooks.add(self._checkpoint_and_preemption, every=1)

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
                while self.step < st.total_steps and not self.stopped:
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
                        time.perf_counter() - t0, self.examples,
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

    # ------------------------------------------------------------------------------ hooks

    def _guard(self, ctx: hooks_lib.StepContext) -> None:
        streak = int(self.tracker["streak"])
        if streak:
            log.warning(
                "steps %d-%d: non-finite loss/gradient, updates skipped", ctx.step - streak + 1,
                ctx.step,
            )  # fmt: skip
        if streak >= self.max_bad:
            self._log(ctx)
            raise TrainingDiverged(
                f"loss or gradients were NaN/Inf for {streak} steps in a row (at step "
                f"{ctx.step}); no update was applied on those steps. Lower "
                "train.learning_rate, raise train.warmup_ratio, or set loss.temperature higher; "
                f"the last good checkpoint is in {self.st.ckpt.directory} (rerun with the same "
                "--workdir to resume)."
            )

    def _log(self, ctx: hooks_lib.StepContext) -> None:
        m = dict(ctx.host_metrics())
        m["examples_per_second"] = ctx.examples / max(ctx.elapsed, 1e-9)
        self.writer.write(ctx.step, m, prefix="train/")

    def _progress(self, ctx: hooks_lib.StepContext) -> None:
        self.progress.update(ctx.step - self.progress.n)
        if ctx._host is not None:  # fetched by a log step: show it
            m = ctx._host
            self.progress.set_postfix(
                loss=f"{m['loss']:.4f}",
                acc=f"{m.get('accuracy', float('nan')):.3f}",
                ex_s=f"{ctx.examples / max(ctx.elapsed, 1e-9):.1f}",
                host=f"{100 * self.timer.host_seconds / max(ctx.elapsed, 1e-9):.0f}%",
                programs=self.runner.programs,
            )

    def _evaluate(self, ctx: hooks_lib.StepContext) -> None:
        self.evaluator(ctx.step, full_params(self.st.model_fn, ctx.state))

    def _checkpoint_and_preemption(self, ctx: hooks_lib.StepContext) -> None:
        stop = self.preempt.due(ctx.step)
        self.st.ckpt.save(
            ctx.step,
            checkpointed(ctx.state),
            {**self.st.iterator.get_state(), EXAMPLES_SEEN: self.st.start_examples + ctx.examples},
            force=stop or ctx.is_last,
        )
        if stop:
            log.warning(
                "stopped by %s at step %d; rerun with the same --workdir to resume",
                self.preempt.reason or "SIGTERM", ctx.step,
            )  # fmt: skip
            self.stopped = True
            self.interrupted = self.preempt.reason

    def finish(self) -> dict[str, Any]:
        """The summary (summary.json), the model card (card.json) and the export of a finished
        stage."""
        from gte_jax import workdir as wd
        from gte_jax.data.sources import skipped_records

        st = self.st
        completed = self.step >= st.total_steps
        if completed and self.evaluator.enabled and not self.evaluator.last:
            self.evaluator(self.step, full_params(st.model_fn, st.state))  # resumed at the end
        # MNTP's cross-entropy can reach 0; its accuracy is over the masked tokens.
        floor = objectives.from_config(st.config).floor
        stats = st.iterator.stats()
        packed = bool(st.iterator.packing)
        summary = {
            "stage": str(st.config.stage),
            # The whole run's counts; the rate is of this process's part (resumed_from_step on).
            "steps": int(self.step),
            "examples": int(st.start_examples + self.examples),
            "train_seconds": round(self.seconds, 3),
            "examples_per_second": round(self.examples / max(self.seconds, 1e-9), 3),
            "final_loss": float(self.tracker["loss"]),
            # GTE's loss cannot go below ln 2 (the positive is counted twice in its partition
            # function): "loss_above_floor" and the in-batch top-1 "final_accuracy" read better.
            "loss_floor": round(floor, 6),
            "loss_above_floor": float(self.tracker["loss"]) - floor,
            "final_accuracy": float(self.tracker["accuracy"]),
            # over the last ~10 finite steps (hooks.EMA_DECAY), kept on the device: this run's
            # steps only (a resumed run starts it again)
            "smoothed_loss": hooks_lib.smoothed(self.tracker, "loss"),
            "smoothed_accuracy": hooks_lib.smoothed(self.tracker, "accuracy"),
            "skipped_records": skipped_records(stats),
            "nonfinite_steps": int(self.tracker["nonfinite"]),
            "resumed_from_step": st.start_step,
            "compute_dtype": compute_dtype(st.config.model.dtype).name,
            # Where the time went (compile / host / device) and padding (processed per real token).
            "timing": {
                **self.timer.report(self.seconds, self.runner.programs),
                # Tokens per packed row at the end of the run (data.packing_row_length).
                **({"packed_row_length": dict(st.iterator.row_length)} if packed else {}),
            },
            "completed": completed,
            **({"stopped_by": self.interrupted} if self.stopped and not completed else {}),
            "eval_at_start": self.evaluator.first,
            "eval": self.evaluator.last,
            "best": self.evaluator.best_summary(),
            "sources": {
                name: {k: s[k] for k in _SOURCE_STATS if k in s} for name, s in stats.items()
            },
        }
        summary = json_safe(summary)
        card = wd.stage_card(st.config, summary)
        if self.is_main and completed:
            write_json(st.workdir / "card.json", card)
        if completed and st.config.export.enabled:
            summary["export"] = str(
                wd.export_workdir(st.workdir, st.workdir / "export", card=card)[0]
            )
        if self.is_main:
            write_json(st.workdir / "summary.json", summary)
        return summary


class Evaluator:
    """In-training evaluation: ``config.eval.sets`` at step 0 (``eval.at_start``), every
    ``eval.every_steps`` and at the end, written to TensorBoard (``eval/<set>/<metric>``) and the
    summary (``eval_at_start``: step 0 only; ``eval``: the last); with ``eval.best_metric`` the
    best model so far is exported to ``<workdir>/best`` (with ``best.json`` naming its step)."""

    def __init__(self, eval_cfg, workdir, model_fn, tokenizer, info, writer):
        self.enabled = bool(eval_cfg.sets)
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.best: tuple[int, float] | None = None
        if not self.enabled:
            return
        from gte_jax.evaluation import EvalSuite

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
        # A full copy on a local device (gathered first when sharded: every process calls this).
        local = shd.local_copy(params)
        # float32 whatever the training computes in: the figures are the export's, as
        # `gte-jax eval` / `encode` compute them (models/precision.py).
        model = as_float32(self.model_fn.module(local))
        t0 = time.perf_counter()
        metrics = self.suite(
            model,
            self.tokenizer,
            include_prompt=self.info.include_prompt,
            instruction_templates=self.info.instruction_templates,
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
        if jax.process_index() != 0:
            return
        from gte_jax import hf

        hf.export_pretrained(
            model,
            self.tokenizer,
            self.workdir / "best",
            info=self.info,
            card={"metrics": dict(metrics), "description": f"Best {self.metric} at step {step}."},
            lm_head=False,
        )
        write_json(
            self.workdir / "best.json",
            {"step": step, "metric": self.metric, "value": value, **metrics},
        )

    def best_summary(self) -> dict[str, Any] | None:
        if self.best is None:
            return None
        return {"step": self.best[0], "metric": self.metric, "value": self.best[1]}


def run(config: Any, workdir: str | epath.PathLike) -> list[dict[str, Any]]:
    """One stage, or each stage of a multi-stage config in order (``config.stages``), each in
    ``workdir/<stage>``; a stage whose ``model.init_from`` is ``"stage:<name>"`` starts from that
    stage's final checkpoint."""
    from gte_jax import storage
    from gte_jax.checkpoint import absolute_path
    from gte_jax.ranges import range_problems

    workdir = absolute_path(workdir)
    if "stages" not in config:
        return [train_stage(config, workdir)]
    # Every stage's ranges before the first stage starts: a later stage's typo must not cost the
    # hours of the earlier ones.
    problems = [p for name in config.stages for p in range_problems(config[name], f"{name}.")]
    if problems:
        raise TrainingError(cannot_run(problems))
    storage.check_writable(workdir)
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
