"""The optimizer of every stage: AdamW with warmup then linear / cosine / constant decay and
global-norm clipping (BERT's recipe: no decay on biases and norm scales)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import optax

from gte_jax.training.spec import TrainSpec, train_spec


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
    train_cfg: TrainSpec | ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW with linear warmup then linear or cosine decay to zero, global-norm clipping.

    ``train_cfg`` is a stage spec's ``train``, or a config's ``train`` group (its unset fields at
    their defaults: :func:`gte_jax.training.spec.train_spec`)."""
    cfg = train_spec(train_cfg)
    warmup = cfg.warmup_steps
    if not warmup and cfg.warmup_ratio:
        warmup = int(round(cfg.warmup_ratio * total_steps))
    warmup = min(warmup, max(total_steps - 1, 0))
    peak = cfg.learning_rate
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
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.adam_b1,
            b2=cfg.adam_b2,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
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
