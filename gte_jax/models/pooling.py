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

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def pool_segments(
    hidden: jax.Array,  # [rows, length, embed]
    attention_mask: jax.Array,  # [rows, length], 1 = real token
    segment_ids: jax.Array,  # [rows, length], 1, 2, ... per packed text, 0 = pad
    mode: str,
    *,
    pool_mask: jax.Array | None = None,  # [rows, length], 1 = pooled
) -> jax.Array:
    """:func:`pool` of every text of packed rows: [rows, slots = length, embed] float32.

    Slot s of a row is its segment s + 1 (a row holds at most ``length`` texts, so ``length``
    slots always suffice and the slot axis needs no shape bucket of its own); an empty slot is a
    zero vector. Per segment the maths is that of :func:`pool` on the text alone: ``cls`` is the
    segment's first pooled token, ``last`` its last, and ``weighted_mean`` counts its weights
    1, 2, ... from the segment's first token.
    """
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; use one of {POOLING_MODES}.")
    hidden = hidden.astype(jnp.float32)
    length = hidden.shape[1]
    slots = jnp.arange(1, length + 1, dtype=segment_ids.dtype)[None, :, None]  # [1, slots, 1]
    member = segment_ids[:, None, :] == slots  # [rows, slots, length]
    real = member & attention_mask.astype(bool)[:, None, :]  # [rows, slots, length]
    pooled = real.astype(jnp.float32)
    if pool_mask is not None:
        pooled = pooled * pool_mask.astype(jnp.float32)[:, None, :]
    if mode == "mean":
        total = jnp.einsum("rsl,rld->rsd", pooled, hidden)  # [rows, slots, embed]
        count = jnp.sum(pooled, axis=2, keepdims=True)  # [rows, slots, 1]
        return total / jnp.maximum(count, 1e-9)
    if mode == "weighted_mean":
        first_real = jnp.argmax(real, axis=2)  # [rows, slots]: segment start
        positions = jnp.arange(1, length + 1, dtype=jnp.float32)[None, None, :]  # [1, 1, length]
        weights = pooled * (positions - first_real[:, :, None])  # [rows, slots, length]
        total = jnp.einsum("rsl,rld->rsd", weights, hidden)  # [rows, slots, embed]
        return total / jnp.maximum(jnp.sum(weights, axis=2, keepdims=True), 1e-9)
    has_any = jnp.any(pooled > 0, axis=2, keepdims=True)  # [rows, slots, 1]
    if mode == "cls":
        index = jnp.argmax(pooled, axis=2)  # [rows, slots] first pooled token
    else:
        index = length - 1 - jnp.argmax(pooled[:, :, ::-1], axis=2)  # [rows, slots] last one
    picked = jnp.take_along_axis(hidden, index[:, :, None], axis=1)  # [rows, slots, embed]
    return jnp.where(has_any, picked, 0.0)


def l2_normalize(x: Any, eps: float = 1e-12) -> Any:
    """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize's definition): the
    one normalisation of the package, for JAX arrays and NumPy arrays alike (NumPy in, NumPy out,
    in the input's dtype)."""
    xp = np if isinstance(x, np.ndarray) else jnp
    norm = xp.linalg.norm(x, axis=-1, keepdims=True)
    return x / xp.maximum(norm, eps)


def truncate_embeddings(x: Any, dim: int | None, *, normalize: bool = True) -> Any:
    """The first ``dim`` coordinates of each embedding, re-normalised when ``normalize``: the one
    truncation rule of Matryoshka training, ``gte-jax encode --dim``, eval and the export's
    ``truncate_dim`` (sentence-transformers' ``truncate_embeddings`` is the same prefix; cosines
    agree whatever the order of truncation and normalisation). ``None``: ``x`` unchanged.
    NumPy in, NumPy out, as :func:`l2_normalize`."""
    if dim is None:
        return x
    if not 1 <= dim <= x.shape[-1]:
        raise ValueError(f"truncation dim {dim} must be in [1, {x.shape[-1]}] (the model's dim)")
    x = x[..., :dim]
    return l2_normalize(x) if normalize else x
