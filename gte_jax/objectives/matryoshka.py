"""Matryoshka representation learning (Kusupati et al., 2022): one contrastive loss summed over
nested prefixes of the embedding, so that its first 256 (or 64) coordinates are an embedding too.

For prefix lengths m_1 > m_2 > ... and weights w_k, with L any contrastive loss of
:mod:`gte_jax.losses`::

    L_matryoshka = Σ_k w_k · L(trunc(q, m_k), trunc(d, m_k), trunc(neg, m_k))

where ``trunc(x, m)`` keeps the first m coordinates and re-normalises them
(:func:`gte_jax.models.pooling.truncate_embeddings`, the rule encode and the export apply).
This is sentence-transformers' ``MatryoshkaLoss(model, loss, dims, weights)`` with every dim used
at every step (its ``n_dims_per_step=-1``, the default): dims sorted largest first, weights 1 when
not given, no division by the sum of the weights. The embeddings are computed once; only the
similarity matmuls are repeated per dim (cheap next to the encoder), so GradCache works unchanged:
its cached gradient w.r.t. the full embeddings is the sum over dims.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from gte_jax.models.pooling import truncate_embeddings

Array = jax.Array
Metrics = dict[str, Array]
LossFn = Callable[..., tuple[Array, Metrics]]


def sorted_dims(
    dims: Sequence[int], weights: Sequence[float] | None = None
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(dims, weights) largest dim first (sentence-transformers' order); weights 1 when None.
    Raises ValueError for an empty or repeated dim list, a dim < 1, or a weight count that
    differs from the dim count."""
    dims = tuple(int(m) for m in dims)
    weights = (1.0,) * len(dims) if weights is None or not len(weights) else tuple(weights)
    if not dims or min(dims) < 1 or len(set(dims)) != len(dims):
        raise ValueError(f"matryoshka dims must be distinct positive sizes, got {list(dims)}")
    if len(weights) != len(dims):
        raise ValueError(f"{len(weights)} matryoshka weights for {len(dims)} dims {list(dims)}")
    pairs = sorted(zip(dims, (float(w) for w in weights), strict=True), reverse=True)
    return tuple(m for m, _ in pairs), tuple(w for _, w in pairs)


def matryoshka_loss(
    loss_fn: LossFn,
    q: Array,
    d: Array,
    *,
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
    neg: Array | None = None,
    **loss_kwargs: Any,
) -> tuple[Array, Metrics]:
    """Σ_k w_k · ``loss_fn(trunc(q, m_k), trunc(d, m_k), neg=trunc(neg, m_k), **loss_kwargs)``.

    ``q``, ``d`` [n, D], ``neg`` [n, K, D] or None; every dim must be <= D. ``loss_kwargs`` go to
    ``loss_fn`` unchanged (temperature, text ids, ``valid``, ``neg_valid``, ...). Metrics: those
    of the largest dim (accuracy, similarities), ``loss`` = the weighted sum, and
    ``loss_dim<m>`` = the unweighted loss at each dim m.
    """
    dims, weights = sorted_dims(dims, weights)
    if dims[0] > q.shape[-1]:
        raise ValueError(f"matryoshka dim {dims[0]} > the embedding dim {q.shape[-1]}")
    total, metrics = 0.0, {}
    for m, w in zip(dims, weights, strict=True):
        loss, dim_metrics = loss_fn(
            truncate_embeddings(q, m),
            truncate_embeddings(d, m),
            neg=None if neg is None else truncate_embeddings(neg, m),
            **loss_kwargs,
        )
        total = total + w * loss
        if not metrics:
            metrics = dict(dim_metrics)
        metrics[f"loss_dim{m}"] = loss
    metrics["loss"] = total
    return total, metrics
