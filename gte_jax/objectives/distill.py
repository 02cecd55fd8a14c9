"""Distillation from a teacher's scores (FlagEmbedding's ``knowledge_distillation``): the student's
distribution over each query's own candidates (its positive and its K hard negatives) is pulled
towards the teacher's.

For query i with candidates c_0 = d_i, c_1..c_K = its negatives, teacher scores t_ij (the
``teacher_scores`` [B, 1+K] a ``gte-jax mine --teacher-scores`` run records) and student cosines
s_ij::

    p_ij = softmax_j(t_ij / τ_t)        (teacher, no gradient)
    r_ij = log_softmax_j(s_ij / τ_s)    (student, τ_s = the contrastive loss's temperature)
    L_distill = (1/n) Σ_i Σ_j p_ij (log p_ij - r_ij)

i.e. ``torch.nn.functional.kl_div(r, p, reduction="batchmean")``. FlagEmbedding minimises the
cross-entropy -Σ p log r (``kd_loss_type="kl_div"``), which differs from this KL by the teacher's
entropy, a constant: same gradient; the KL is 0 when the student matches the teacher, which makes
it readable in the logs. Placeholder negatives (``neg_valid`` 0) are in neither distribution;
padding rows (``valid`` 0) add nothing. Combined with the contrastive loss as
``L = L_contrastive + w · L_distill`` (:func:`with_distillation`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Metrics = dict[str, Array]

# Teacher temperature default: ours. Mined cosines span ~0.1; FlagEmbedding's bge recipes train
# the student at τ = 0.02, and the same τ keeps the teacher's distribution as sharp.
TEACHER_TEMPERATURE = 0.02


def student_scores(q: Array, d: Array, neg: Array | None) -> Array:
    """[n, 1+K] cosines of each query with its positive then its own negatives (unit vectors)."""
    pos = jnp.einsum("nd,nd->n", q, d, precision=lax.Precision.HIGHEST)[:, None]  # [n, 1]
    if neg is None:
        return pos
    negs = jnp.einsum("nd,nkd->nk", q, neg, precision=lax.Precision.HIGHEST)  # [n, K]
    return jnp.concatenate([pos, negs], axis=1)


def distill_loss(
    student: Array,
    teacher: Array,
    *,
    student_temperature: Array | float,
    teacher_temperature: Array | float = TEACHER_TEMPERATURE,
    valid: Array | None = None,
    neg_valid: Array | None = None,
) -> Array:
    """KL(teacher || student) over each row's candidates, averaged over the valid rows.

    ``student``, ``teacher``: [n, 1+K] scores (column 0 the positive); ``neg_valid`` [n, K]
    (1 = a real negative), ``valid`` [n]. Computed in float32 at least (float64 stays)."""
    dtype = jnp.promote_types(jnp.result_type(student), jnp.float32)
    student = jnp.asarray(student, dtype)
    teacher = lax.stop_gradient(jnp.asarray(teacher, dtype))
    n, c = student.shape
    if teacher.shape != (n, c):
        raise ValueError(f"teacher scores {teacher.shape} != student scores {student.shape}")
    keep = jnp.ones((n, c), jnp.bool_)
    if neg_valid is not None:
        keep = keep.at[:, 1:].set(jnp.asarray(neg_valid).astype(jnp.bool_))
    log_r = jax.nn.log_softmax(jnp.where(keep, student / student_temperature, -jnp.inf), axis=1)
    log_p = jax.nn.log_softmax(jnp.where(keep, teacher / teacher_temperature, -jnp.inf), axis=1)
    kl = jnp.sum(jnp.where(keep, jnp.exp(log_p) * (log_p - log_r), 0.0), axis=1)  # [n]
    w = jnp.ones((n,), dtype) if valid is None else jnp.asarray(valid).astype(dtype)
    return jnp.sum(w * kl) / jnp.maximum(jnp.sum(w), 1.0)


def with_distillation(
    loss_fn: Callable[..., tuple[Array, Metrics]],
    *,
    weight: float,
    teacher_temperature: float = TEACHER_TEMPERATURE,
) -> Callable[..., tuple[Array, Metrics]]:
    """``loss_fn(q, d, *, neg, temperature, teacher_scores=None, ...)`` plus ``weight`` x
    :func:`distill_loss` when ``teacher_scores`` [n, 1+K] is given (a batch without them: the
    contrastive loss alone). ``weight`` 0: the contrastive loss alone. Metrics gain
    ``distill_loss`` (unweighted) and ``contrastive_loss``; ``loss`` is the total."""

    def combined(q, d, *, teacher_scores=None, **kwargs: Any) -> tuple[Array, Metrics]:
        loss, metrics = loss_fn(q, d, **kwargs)
        if teacher_scores is None or not weight:
            return loss, metrics
        kd = distill_loss(
            student_scores(q, d, kwargs.get("neg")),
            teacher_scores,
            student_temperature=kwargs["temperature"],
            teacher_temperature=teacher_temperature,
            valid=kwargs.get("valid"),
            neg_valid=kwargs.get("neg_valid"),
        )
        total = loss + weight * kd
        return total, {**metrics, "contrastive_loss": loss, "distill_loss": kd, "loss": total}

    return combined
