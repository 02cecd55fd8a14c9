"""Pooling token states into one vector per text, and L2 normalisation.

Semantics follow sentence-transformers' ``Pooling`` module, so exported models embed identically:
the pooled set is ``attention_mask * pool_mask`` (``pool_mask`` = 1 where a token counts, 0 on a
leading prompt/instruction), and

- ``mean``: average of the pooled tokens;
- ``cls``: the first pooled token (position 0 under right padding);
- ``last``: the last pooled token, right or left padding alike;
- ``weighted_mean``: weights 1, 2, 3, ... counted from the first real (non-pad) token — SGPT's
  position weighting, ``pooling_mode_weightedmean_tokens``; excluded prompt tokens keep their
  place in the count.

A row with nothing to pool gives a zero vector.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

POOLING_MODES = ("mean", "cls", "last", "weighted_mean")


def pool(
    hidden: jax.Array,  # [batch, length, embed]
    attention_mask: jax.Array,  # [batch, length], 1 = real token
    mode: str,
    *,
    pool_mask: jax.Array | None = None,  # [batch, length], 1 = pooled
) -> jax.Array:
    """Pool ``hidden`` over the tokens selected by the masks; returns [batch, embed] float32."""
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; use one of {POOLING_MODES}.")
    hidden = hidden.astype(jnp.float32)
    real = attention_mask.astype(jnp.float32)  # [batch, length]
    pooled = real if pool_mask is None else real * pool_mask.astype(jnp.float32)
    if mode == "mean":
        total = jnp.einsum("bl,bld->bd", pooled, hidden)  # [batch, embed]
        count = jnp.sum(pooled, axis=1, keepdims=True)  # [batch, 1]
        return total / jnp.maximum(count, 1e-9)
    if mode == "weighted_mean":
        length = hidden.shape[1]
        first_real = jnp.argmax(real, axis=1)  # [batch]; left-pad count
        positions = jnp.arange(1, length + 1, dtype=jnp.float32)[None, :]  # [1, length]
        weights = pooled * (positions - first_real[:, None])  # [batch, length]
        total = jnp.einsum("bl,bld->bd", weights, hidden)  # [batch, embed]
        return total / jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1e-9)
    has_any = jnp.any(pooled > 0, axis=1, keepdims=True)  # [batch, 1]
    if mode == "cls":
        index = jnp.argmax(pooled, axis=1)  # [batch] first pooled token
    else:
        length = pooled.shape[1]
        index = length - 1 - jnp.argmax(pooled[:, ::-1], axis=1)  # [batch] last pooled token
    picked = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]  # [batch, embed]
    return jnp.where(has_any, picked, 0.0)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize's definition)."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)
