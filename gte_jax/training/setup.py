"""A stage's setup, once before its loop: sources first (a bad data config fails in seconds),
then the model (with the stage's normalisation, pooling, prompts and LoRA), the batch
iterator, the optimizer, the train state (restored when the workdir has checkpoints) and the
train step (:func:`gte_jax.training.step.build_train_step`)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from gte_jax import hf, objectives, sharded_io, storage
from gte_jax import sharding as shd
from gte_jax import workdir as wd
from gte_jax.checkpoint import Checkpointer, abstract_like
from gte_jax.data.mixture import is_replay
from gte_jax.data.mntp import masking_from_config
from gte_jax.data.pipeline import build_iterator, build_sources, epoch_records
from gte_jax.data.prefetch import with_prefetch
from gte_jax.models import lora
from gte_jax.models.encoder import ModelFn
from gte_jax.models.precision import compute_dtype
from gte_jax.prompts import configure_tokenizer, training_prompts, training_templates
from gte_jax.training.checks import TrainingError, check_source_batches, trains_lm_head
from gte_jax.training.optimizer import make_optimizer
from gte_jax.training.spec import ModelSpec, StageSpec, TrainSpec
from gte_jax.training.state import EXAMPLES_SEEN, checkpointed, initial_state
from gte_jax.training.step import TrainStep, build_train_step
from gte_jax.training.summary import finished_summary

log = logging.getLogger("gte_jax.train")


def load_model_for_training(model_cfg: ModelSpec, shardings_of: Callable | None = None):
    """(BiEncoder, tokenizer, PretrainedInfo) from ``model.init_from`` (the one rule of
    :mod:`gte_jax.workdir`), with the stage's normalisation and ``include_prompt`` applied so that
    the loss, in-training eval and every export see the same embedding. ``shardings_of``: the
    parameters of a model directory are read straight onto these shardings, each host reading
    only its devices' slices (``gte_jax.sharded_io``); without it they stay host arrays."""
    dtype = compute_dtype(model_cfg.dtype)
    if model_cfg.dtype == "auto":
        log.info("model.dtype=auto: %s compute on %s", dtype.name, jax.default_backend())
    base = lora.base_dtype(model_cfg.lora)  # every loaded parameter is frozen under LoRA
    model, tokenizer, info = wd.load_model(
        model_cfg.init_from,
        dtype=dtype,
        host=True,  # placed shard by shard by initial_state
        shardings_of=shardings_of,
        param_dtype=None if base == np.float32 else (lambda _path: base),
        **wd.model_overrides(model_cfg),
    )
    if model.normalize != model_cfg.normalize:
        log.info(
            "model.normalize=%s (the model directory said %s): the loss and the export use %s",
            model_cfg.normalize,
            model.normalize,
            "unit-norm (cosine) embeddings" if model_cfg.normalize else "raw embeddings",
        )
        model.normalize = model_cfg.normalize
    if model_cfg.pooling not in ("auto", model.pooling):
        log.info("model.pooling=%s (the model directory said %s)", model_cfg.pooling, model.pooling)
        model.pooling = model_cfg.pooling
    choice = model_cfg.include_prompt.lower()
    if choice != "auto":
        info.include_prompt = choice == "true"
    # On the tokenizer itself, so batches, in-training eval and every export (base_model/, whose
    # tokenizer sentence-transformers applies) pad and end texts alike.
    configure_tokenizer(
        tokenizer, padding_side=model_cfg.padding_side, append_eos=model_cfg.append_eos
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


def _total_steps(train_cfg: TrainSpec, num_records: int, batch_size: int) -> int:
    if train_cfg.num_steps:
        return train_cfg.num_steps
    epochs = train_cfg.epochs
    if epochs <= 0:
        raise TrainingError("set train.num_steps or train.epochs (> 0)")
    return max(1, math.ceil(epochs * num_records / batch_size))


@dataclasses.dataclass
class Stage:
    """What ``train_stage`` sets up once and the loop then uses."""

    config: StageSpec
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
    step: TrainStep  # the compiled train step (step.jitted)
    start_examples: int = 0  # examples of the steps before start_step (a resumed run)


def setup_stage(config: StageSpec, workdir: epath.Path, mesh: Any, num_chunks: int):
    """Sources, model, iterator, optimizer, state (restored when the workdir has checkpoints) and
    the compiled step; or the existing summary when this stage already finished."""
    is_main = jax.process_index() == 0
    tcfg, batch_size, data_cfg = config.train, config.train.batch_size, config.data
    # Sources first: a bad data config fails in seconds, before the model is loaded or written.
    sources = build_sources(data_cfg)
    check_source_batches(sources, num_chunks, mesh.shape[shd.DATA_AXIS])
    total_steps = _total_steps(tcfg, epoch_records(data_cfg, sources), batch_size)
    ckpt = Checkpointer(
        workdir / "checkpoints",
        every_steps=config.checkpoint.every_steps,
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save,
    )
    done = finished_summary(workdir, ckpt.latest_step(), total_steps)
    if done is not None:
        ckpt.close()
        return done
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        storage.write_text(workdir / "config.json", config.to_json())

    model, tokenizer, info = _stage_model(config, sources, mesh)
    # A base_model/ without its completion marker (a full disk or a kill while it was written):
    # written again, whole. Every process takes part in gathering sharded tensors; process 0 writes.
    if not storage.is_complete(workdir / "base_model"):
        hf.export_pretrained(model, tokenizer, workdir / "base_model", info=info, write=is_main)
    iterator = build_iterator(
        data_cfg,
        tokenizer=tokenizer,
        sources=sources,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        layout=shd.BatchLayout.of_mesh(mesh),
        batch_size=batch_size,
        include_prompt=info.include_prompt,
        pack_chunks=num_chunks,  # packing + GradCache: rows dealt to chunks by token budget
        mntp=_mntp_masking(config, model, tokenizer),
    )
    iterator.prime_row_floor(data_cfg.packing_estimate_batches, run_batches=total_steps)
    _inject_lora(config, model, workdir, is_main)
    model_fn, tx, schedule, state, frozen = initial_training(config, model, mesh, total_steps)
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
    iterator = with_prefetch(iterator, data_cfg.prefetch)
    step = build_train_step(config, mesh, model_fn, tx, schedule, state, num_chunks=num_chunks)
    return Stage(
        config, workdir, mesh, iterator, total_steps, schedule, model_fn, tokenizer, info,
        state, start_step, ckpt, step, start_examples,
    )  # fmt: skip


def initial_training(config: StageSpec, model: Any, mesh: Any, total_steps: int):
    """(model_fn, optimizer, schedule, initial train state on ``mesh``, LoRA's frozen base as
    host arrays) of a stage's model (LoRA already injected): what the step is built from, before
    a checkpoint is restored."""
    model_fn, params = ModelFn.from_module(model, train_lm_head=trains_lm_head(config))
    trainable, frozen = model_fn.split_params(params)
    # A workdir's base comes as float32 host arrays; a model directory's is already in it.
    frozen = lora.cast_frozen(frozen, lora.base_dtype(config.model.lora))
    tx, schedule = make_optimizer(config.train, total_steps)
    state = initial_state(
        trainable,
        tx,
        config.train.seed,
        mesh,
        config.sharding,
        frozen=frozen,
        objective_state=objectives.from_config(config).initial_state(),
    )
    # The placed frozen base (the host arrays or loaded shards were donated to the state).
    return model_fn, tx, schedule, state, state.get("frozen", {})


def _stage_model(config: StageSpec, sources: Any, mesh: Any):
    """(model, tokenizer, info) of a stage, its info carrying the prompts and templates this
    stage trains with (what the export records); its parameters loaded onto the train state's
    shardings."""
    model, tokenizer, info = load_model_for_training(
        config.model, lambda abstract: sharded_io.param_shardings(abstract, mesh, config.sharding)
    )
    longest = max(config.data.query_max_length, config.data.doc_max_length)
    if longest > model.config.max_length:
        raise TrainingError(
            f"data max length {longest} exceeds the model's {model.config.max_length} positions: "
            "lower data.query_max_length / data.doc_max_length"
        )
    # The export carries the prompts this stage trained with (after those of earlier stages);
    # replayed sources are an earlier stage's, whose prompts the chain already holds.
    own = [s for s in sources if not is_replay(s.name)]
    info.prompts = {**info.prompts, **training_prompts(own)}
    # A stage without instructions keeps the templates of the stage it started from.
    info.instruction_templates = training_templates(own) or info.instruction_templates
    return model, tokenizer, info


def _mntp_masking(config: StageSpec, model: Any, tokenizer: Any):
    """The MNTP masking rule of a ``kind="mntp"`` stage (None for other kinds); the model must
    have an LM head (a decoder with tied embeddings or a ``*ForCausalLM`` head)."""
    if config.kind != "mntp":
        return None
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
    return masking_from_config(config.mntp, tokenizer, config.data.seed)


FROZEN_BASE_FILE = "frozen_base.sha256"


def frozen_fingerprint(frozen: Any) -> str:
    """A cheap fingerprint of the frozen base weights: every leaf's path, shape, dtype and 4096
    evenly spaced entries (seconds for a 7B model; another checkpoint differs in all of them)."""
    digest = hashlib.sha256()
    leaves = sorted(
        (jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(frozen)
    )
    for name, x in leaves:
        a = x.reshape(-1)  # a sharded array is sampled where it lives: 4096 entries come back
        digest.update(f"{name}:{a.shape}:{np.dtype(a.dtype)};".encode())
        digest.update(np.ascontiguousarray(shd.host_value(a[:: max(1, a.size // 4096)])).tobytes())
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
        storage.write_text(path, fingerprint + "\n")


def _inject_lora(config: StageSpec, model: Any, workdir: epath.Path, is_main: bool) -> None:
    """With ``model.lora.enabled``: LoRA layers on the target projections (A from the run's seed)
    and ``<workdir>/lora.json``, which export and later stages read to rebuild the model."""
    lora_cfg = lora.LoRAConfig.from_config(config.model.lora)
    if lora_cfg is None:
        return
    paths = lora.inject(model, lora_cfg, rngs=nnx.Rngs(config.train.seed))
    log.info("LoRA (rank %d, alpha %g) on %d layers", lora_cfg.rank, lora_cfg.alpha, len(paths))
    if is_main:
        storage.write_text(workdir / wd.LORA_FILE, lora_cfg.to_json())
