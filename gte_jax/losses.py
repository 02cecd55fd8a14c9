"""Contrastive losses on the global batch: GTE's joint-partition loss, InfoNCE and INSTRUCTOR's.

Both are written as plain math on global arrays (big_vision style): inside one ``jax.jit`` with the
batch sharded over ``"data"``, XLA inserts the all-gathers of the candidate embeddings. A
``shard_map`` twin (:func:`sharded_contrastive_loss`) computes the same numbers with an explicit
``all_gather``; both call the same row kernel.

Sharding: given the train step's ``mesh`` (every loss takes ``mesh=``; the objectives pass it),
the loss runs as the twin: each device scores its own rows against the batch gathered once, and
the gradient of the gather is one reduce-scatter of the embeddings' gradients back to their rows.
Left to partition the global-view blocked loss by itself, XLA all-reduced each block's rows and
their gradients in every block: compiled for v5e-64 (GTE-base stage 1, batch 16,384, 16 blocks
of 1,024 rows), 0.93 x the float32 parameter bytes of all-reduce per step plus 0.23 x of
reduce-scatter; per device, one reduce-scatter of 0.23 x (``benchmarks/README.md``, "Activation
sharding and one reduction").

Conventions (see docs/design.md):
  * ``q``, ``d``: [n, D] L2-normalised query / positive-document embeddings; ``neg``: [n, K, D]
    hard negatives (K per query), also normalised. Cosine similarity is therefore a dot product.
  * ``q_ids``, ``d_ids``, ``neg_ids``: int text ids over the global batch and all roles; equal ids
    mean identical strings. ``None`` means "all texts distinct".
  * ``valid``: [n] (1 = real example). Padding rows add nothing to the loss and their texts
    (query, document and negatives) are never candidates.
  * ``neg_valid``: [n, K] (1 = a real negative). A record with fewer than K negatives carries
    placeholders marked 0 here: they are never candidates (no term in any partition sum, GTE or
    InfoNCE), so the loss equals the loss computed without them. ``None``: all real.

Masking rule (one rule for every term, decided on the text, never on embeddings): in the row of
example i, a candidate whose text is identical to q_i's or to d_i's text is removed (-inf before
logsumexp), except the positive pair (q_i, d_i) itself; the self terms (q_i, q_i) and (d_i, d_i)
are always removed. "Identical to d_i" catches a positive that appears twice in the batch (the
classic false negative); "identical to q_i" catches a query repeated as a document or as a query.

Memory: the rows are scored ``block_size`` at a time (:func:`_blocked_row_losses`): a ``lax.map``
over row blocks, each under ``jax.checkpoint``, so the forward and the backward hold the logits
of one block, [block, 2M + 2n], never those of the whole batch, [n, 2M + 2n]. The backward
recomputes a block's logits (one more pass of similarity matmuls, small next to the encoder).
Blocks are strided like GradCache's chunks (row i -> block i % B): with the rows split over
``"data"`` in contiguous shards, every block then spans all devices and no rows move to form it.
XLA still picks how to split a block's work (on the 8-device CPU mesh it gathers the block's
rows and splits the candidates instead); either way each device holds ~1/P of a block's logits
(tests/test_losses.py checks the compiled memory).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from gte_jax.sharding import DATA_AXIS

Array = jax.Array
Metrics = dict[str, Array]

GTE_TEMPERATURE = 0.01  # GTE §3: τ = 0.01.
INFONCE_TEMPERATURE = 0.05  # sentence-transformers MultipleNegativesRankingLoss: scale 20.
# INSTRUCTOR's release (README's train command): --cl_temperature 0.1 (0.01 before 2023-09).
INSTRUCTOR_TEMPERATURE = 0.1
# Rows scored at once. 1024 rows x (2M + 2n) float32 logits, e.g. 64 MiB per logits-sized array at
# n = 4096 without negatives; None = the whole batch in one block.
DEFAULT_BLOCK_SIZE = 1024

# Why HIGHEST: logits are cosines divided by τ = 0.01, so the bf16-pass default of TPU/GPU f32
# matmuls (~3 significant digits) would put errors of ~0.1-0.4 on the logits. The similarity
# matmuls are tiny next to the encoder, so full precision costs nothing that matters.
_PRECISION = lax.Precision.HIGHEST


class _Candidates(NamedTuple):
    """Everything a row is scored against: all queries and all documents of the global batch."""

    q: Array  # [n, D] all queries (candidates of the q→q and d→q terms)
    docs: Array  # [M, D] all positives then all hard negatives, M = n + n*K
    q_ids: Array  # [n]
    doc_ids: Array  # [M]
    q_ok: Array  # [n] bool: this query may act as a candidate (its example is valid)
    doc_ok: Array  # [M] bool


class _Rows(NamedTuple):
    """The rows (examples) scored by one call: all of them, or one device's shard."""

    q: Array  # [r, D]
    d: Array  # [r, D]
    index: Array  # [r] global index of each row (position of d_i among the candidate docs)
    q_ids: Array  # [r]
    d_ids: Array  # [r]


def _default_ids(n: int, k: int) -> tuple[Array, Array, Array]:
    """Distinct ids for every text: queries 0..n-1, documents n..2n-1, negatives 2n.."""
    q_ids = jnp.arange(n, dtype=jnp.int32)
    return q_ids, q_ids + n, (2 * n + jnp.arange(n * k, dtype=jnp.int32)).reshape(n, k)


def _prepare(q, d, neg, q_ids, d_ids, neg_ids, valid, neg_valid=None):
    """Casts to float32, fills default ids / validity (``neg_valid`` [n, K] bool, or None
    without negatives)."""
    # At least float32 (bf16 embeddings are upcast); float64 stays, for finite-difference tests.
    dtype = jnp.promote_types(jnp.result_type(q), jnp.float32)
    q = jnp.asarray(q, dtype)
    d = jnp.asarray(d, dtype)
    n = q.shape[0]
    if d.shape != q.shape:
        raise ValueError(f"q and d must have the same shape [n, D], got {q.shape} and {d.shape}")
    k = 0 if neg is None else neg.shape[1]
    if neg is not None:
        neg = jnp.asarray(neg, dtype)
        if neg.ndim != 3 or neg.shape[0] != n or neg.shape[2] != q.shape[1]:
            raise ValueError(f"neg must be [n, K, D] = [{n}, K, {q.shape[1]}], got {neg.shape}")
    dq, dd, dn = _default_ids(n, k)
    q_ids = dq if q_ids is None else jnp.asarray(q_ids, jnp.int32)
    d_ids = dd if d_ids is None else jnp.asarray(d_ids, jnp.int32)
    if neg is not None:
        neg_ids = dn if neg_ids is None else jnp.asarray(neg_ids, jnp.int32)
    valid = jnp.ones((n,), jnp.bool_) if valid is None else jnp.asarray(valid).astype(jnp.bool_)
    if neg is None:
        neg_valid = None
    elif neg_valid is None:
        neg_valid = jnp.ones((n, k), jnp.bool_)
    else:
        neg_valid = jnp.asarray(neg_valid).astype(jnp.bool_)
        if neg_valid.shape != (n, k):
            raise ValueError(f"neg_valid must be [n, K] = [{n}, {k}], got {neg_valid.shape}")
    return q, d, neg, q_ids, d_ids, neg_ids, valid, neg_valid


def _candidates(q, d, neg, q_ids, d_ids, neg_ids, valid, neg_valid) -> _Candidates:
    if neg is None:
        docs, doc_ids, doc_ok = d, d_ids, valid
    else:
        n, k, dim = neg.shape
        docs = jnp.concatenate([d, neg.reshape(n * k, dim)], axis=0)  # [n + n*K, D]
        doc_ids = jnp.concatenate([d_ids, neg_ids.reshape(n * k)])
        # Negatives of padding rows and placeholder negatives (neg_valid 0) are never candidates.
        neg_ok = valid[:, None] & neg_valid  # [n, K]
        doc_ok = jnp.concatenate([valid, neg_ok.reshape(n * k)])
    return _Candidates(q, docs, q_ids, doc_ids, valid, doc_ok)


def _row_losses(
    kind: str, rows: _Rows, cands: _Candidates, temperature: float, symmetric: bool
) -> dict[str, Array]:
    """Per-row loss and metric sums for ``rows`` against all candidates. Shapes: r rows."""
    n = cands.q.shape[0]
    m = cands.docs.shape[0]
    sim_qd = jnp.einsum("rd,md->rm", rows.q, cands.docs, precision=_PRECISION)  # [r, M] s(q_i,c_j)
    is_pos = jnp.arange(m)[None, :] == rows.index[:, None]  # [r, M]: c_j is d_i
    is_self = jnp.arange(n)[None, :] == rows.index[:, None]  # [r, n]: q_j is q_i

    def same_text(ids):  # [r, C]: candidate text identical to q_i's or d_i's text
        return (ids[None, :] == rows.q_ids[:, None]) | (ids[None, :] == rows.d_ids[:, None])

    dup_doc = same_text(cands.doc_ids)  # [r, M]
    dup_q = same_text(cands.q_ids)  # [r, n]
    # The positive is kept even for padding rows, so no row is all -inf (its gradient would be NaN).
    keep_qd = is_pos | (cands.doc_ok[None, :] & ~dup_doc)  # [r, M]
    pos = jnp.sum(jnp.where(is_pos, sim_qd, 0.0), axis=1)  # [r] s(q_i, d_i)

    def masked(sim, keep):
        return jnp.where(keep, sim / temperature, -jnp.inf)

    if kind == "instructor":
        # INSTRUCTOR's q→d candidates are d_i and the batch's hard negatives, not the other
        # positives: the columns past the n positives.
        keep_qd = is_pos | (keep_qd & (jnp.arange(m) >= n)[None, :])
    logits_qd = masked(sim_qd, keep_qd)  # [r, M]
    if kind in ("gte", "instructor") or symmetric:
        sim_dq = jnp.einsum("rd,nd->rn", rows.d, cands.q, precision=_PRECISION)  # [r, n] s(q_j,d_i)
        logits_dq = masked(sim_dq, is_self | (cands.q_ok[None, :] & ~dup_q))  # [r, n]
    if kind == "gte":
        sim_qq = jnp.einsum("rd,nd->rn", rows.q, cands.q, precision=_PRECISION)  # [r, n]
        sim_dd = jnp.einsum("rd,md->rm", rows.d, cands.docs, precision=_PRECISION)  # [r, M]
        logits_qq = masked(sim_qq, ~is_self & cands.q_ok[None, :] & ~dup_q)
        logits_dd = masked(sim_dd, ~is_pos & cands.doc_ok[None, :] & ~dup_doc)
        # One joint partition function Z_i over all four terms: [r, 2M + 2n].
        joint = jnp.concatenate([logits_qd, logits_qq, logits_dq, logits_dd], axis=1)
        loss = jax.nn.logsumexp(joint, axis=1) - pos / temperature
    elif kind == "infonce":
        loss = jax.nn.logsumexp(logits_qd, axis=1) - pos / temperature
        if symmetric:
            loss = 0.5 * (loss + jax.nn.logsumexp(logits_dq, axis=1) - pos / temperature)
    elif kind == "instructor":  # two cross-entropies, added (not averaged) as the release does
        loss = jax.nn.logsumexp(logits_qd, axis=1) + jax.nn.logsumexp(logits_dq, axis=1)
        loss = loss - 2.0 * pos / temperature
    else:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {sorted(LOSSES)}")

    neg_keep = keep_qd & ~is_pos  # [r, M]: the q→d negatives actually in the softmax
    return {
        "loss": loss,
        "correct": (jnp.argmax(logits_qd, axis=1) == rows.index).astype(jnp.float32),
        "pos_sim": pos,
        "neg_sim_sum": jnp.sum(jnp.where(neg_keep, sim_qd, 0.0), axis=1),
        "neg_count": jnp.sum(neg_keep, axis=1).astype(jnp.float32),
    }


def _blocked_row_losses(
    kind: str,
    rows: _Rows,
    cands: _Candidates,
    temperature: float,
    symmetric: bool,
    block_size: int | None,
) -> dict[str, Array]:
    """:func:`_row_losses` in strided row blocks of at most ``block_size`` rows; same [r] outputs.

    Row i goes to block ``i % B``, position ``i // B`` (B blocks, rows padded with zeros up to a
    multiple of B; padded rows are scored against the candidates and dropped). Each block runs
    under ``jax.checkpoint``: the backward keeps only the block's inputs and recomputes its logits.
    """
    r = rows.q.shape[0]
    if block_size is None or r <= block_size:
        return _row_losses(kind, rows, cands, temperature, symmetric)
    if block_size < 1:
        raise ValueError(f"block_size must be a positive number of rows or None, not {block_size}")
    num_blocks = -(-r // block_size)
    per_block = -(-r // num_blocks)  # <= block_size
    pad = num_blocks * per_block - r

    def split(x):  # [r, ...] -> [B, r/B, ...]; the row split over devices stays on axis 1
        if pad:  # a padded row is q = d = 0 with index 0: its positive keeps it finite
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        x = x.reshape(per_block, num_blocks, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    def merge(x):  # [B, r/B] -> [r]
        return jnp.swapaxes(x, 0, 1).reshape(num_blocks * per_block)[:r]

    def block(block_rows: _Rows) -> dict[str, Array]:
        return _row_losses(kind, block_rows, cands, temperature, symmetric)

    # prevent_cse=False: inside lax.map (a scan) CSE cannot undo the rematerialisation.
    per_row = lax.map(jax.checkpoint(block, prevent_cse=False), _Rows(*map(split, rows)))
    return {key: merge(value) for key, value in per_row.items()}


def _row_sums(per_row: dict[str, Array], valid_rows: Array) -> dict[str, Array]:
    w = valid_rows.astype(jnp.float32)
    sums = {k: jnp.sum(w * v) for k, v in per_row.items()}
    sums["count"] = jnp.sum(w)
    return sums


def _finalize(sums: dict[str, Array]) -> tuple[Array, Metrics]:
    count = jnp.maximum(sums["count"], 1.0)
    loss = sums["loss"] / count
    metrics = {
        "loss": loss,
        "accuracy": sums["correct"] / count,
        "pos_sim": sums["pos_sim"] / count,
        "neg_sim": sums["neg_sim_sum"] / jnp.maximum(sums["neg_count"], 1.0),
        "num_examples": sums["count"],
    }
    return loss, metrics


def _split_rows(mesh: jax.sharding.Mesh | None, n: int, data_axis: str = DATA_AXIS) -> bool:
    """Whether a batch of ``n`` rows on ``mesh`` is scored per device (rows split over a
    ``data_axis`` of size > 1 that divides ``n``)."""
    if mesh is None or data_axis not in mesh.shape:
        return False
    shards = mesh.shape[data_axis]
    return shards > 1 and n % shards == 0


def _global_loss(
    kind,
    q,
    d,
    *,
    temperature,
    q_ids,
    d_ids,
    neg,
    neg_ids,
    valid,
    neg_valid,
    symmetric,
    block_size,
    mesh=None,
):
    if _split_rows(mesh, q.shape[0]):
        return sharded_contrastive_loss(
            kind, mesh, q, d, temperature=temperature, q_ids=q_ids, d_ids=d_ids, neg=neg,
            neg_ids=neg_ids, valid=valid, neg_valid=neg_valid, symmetric=symmetric,
            block_size=block_size,
        )  # fmt: skip
    q, d, neg, q_ids, d_ids, neg_ids, valid, neg_valid = _prepare(
        q, d, neg, q_ids, d_ids, neg_ids, valid, neg_valid
    )
    cands = _candidates(q, d, neg, q_ids, d_ids, neg_ids, valid, neg_valid)
    rows = _Rows(q, d, jnp.arange(q.shape[0]), q_ids, d_ids)
    per_row = _blocked_row_losses(kind, rows, cands, temperature, symmetric, block_size)
    return _finalize(_row_sums(per_row, valid))


def gte_loss(
    q: Array,
    d: Array,
    *,
    temperature: float = GTE_TEMPERATURE,
    q_ids: Array | None = None,
    d_ids: Array | None = None,
    neg: Array | None = None,
    neg_ids: Array | None = None,
    valid: Array | None = None,
    neg_valid: Array | None = None,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[Array, Metrics]:
    """GTE's improved contrastive loss with one joint partition function (Li et al., 2023, §3).

    With s the cosine and τ the temperature, for example i::

        Z_i = Σ_j e^{s(q_i,d_j)/τ} + Σ_{j≠i} e^{s(q_i,q_j)/τ} + Σ_j e^{s(q_j,d_i)/τ}
              + Σ_{j≠i} e^{s(d_j,d_i)/τ}
        L   = -(1/n) Σ_i log(e^{s(q_i,d_i)/τ} / Z_i)

    The positive appears twice in Z_i (in the q→d and the d→q sums), as in the paper.

    Hard negatives: they are extra *documents*, so they join every sum where d_j ranges over
    documents: the q→d sum (candidates for q_i) and the d→d sum (candidates for d_i) — all n*K
    negatives of the batch, not only those mined for query i. They never act as queries, so the
    q→q and d→q sums are unchanged. Masking, padding and ``neg_valid`` (placeholder negatives of
    records with fewer than K) follow the module docstring.

    Returns ``(loss, metrics)`` with metrics ``loss``, ``accuracy`` (in-batch q→d top-1 over the
    same candidates as the q→d sum), ``pos_sim`` (mean s(q_i, d_i)), ``neg_sim`` (mean q→d
    similarity over the unmasked negatives) and ``num_examples``. Computed in float32 (or
    float64 if given). ``block_size``: rows scored at once (module docstring, "Memory"); the
    numbers do not depend on it beyond float rounding. ``mesh``: a mesh whose ``"data"`` axis
    splits the batch (the train step's); the loss then runs as :func:`sharded_contrastive_loss`
    (module docstring, "Sharding"), the same numbers.
    """
    return _global_loss(
        "gte",
        q,
        d,
        temperature=temperature,
        q_ids=q_ids,
        d_ids=d_ids,
        neg=neg,
        neg_ids=neg_ids,
        valid=valid,
        neg_valid=neg_valid,
        symmetric=False,
        block_size=block_size,
        mesh=mesh,
    )


def infonce_loss(
    q: Array,
    d: Array,
    *,
    temperature: float = INFONCE_TEMPERATURE,
    q_ids: Array | None = None,
    d_ids: Array | None = None,
    neg: Array | None = None,
    neg_ids: Array | None = None,
    valid: Array | None = None,
    neg_valid: Array | None = None,
    symmetric: bool = False,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[Array, Metrics]:
    """InfoNCE with in-batch negatives: L = -(1/n) Σ_i log(e^{s(q_i,d_i)/τ} / Σ_c e^{s(q_i,c)/τ}).

    c ranges over all positives and all hard negatives of the batch (q→d). With ``symmetric``,
    the d→q loss (d_i against all queries; negatives are not queries) is averaged in.
    Masking, padding, metrics and ``block_size`` as in :func:`gte_loss`.
    """
    return _global_loss(
        "infonce",
        q,
        d,
        temperature=temperature,
        q_ids=q_ids,
        d_ids=d_ids,
        neg=neg,
        neg_ids=neg_ids,
        valid=valid,
        neg_valid=neg_valid,
        symmetric=symmetric,
        block_size=block_size,
        mesh=mesh,
    )


def instructor_loss(
    q: Array,
    d: Array,
    *,
    temperature: float = INSTRUCTOR_TEMPERATURE,
    q_ids: Array | None = None,
    d_ids: Array | None = None,
    neg: Array | None = None,
    neg_ids: Array | None = None,
    valid: Array | None = None,
    neg_valid: Array | None = None,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[Array, Metrics]:
    """INSTRUCTOR's loss (Su et al., 2023; the release's ``InstructorTrainer.compute_loss``): the
    sum of two cross-entropies, each averaged over the examples::

        L = -(1/n) Σ_i log(e^{s(q_i,d_i)/τ} / (e^{s(q_i,d_i)/τ} + Σ_c e^{s(q_i,c)/τ}))
            -(1/n) Σ_i log(e^{s(q_i,d_i)/τ} / Σ_j e^{s(q_j,d_i)/τ})

    c ranges over the hard negatives of the whole batch (not the other positives); j over all
    queries (q_i included, as the positive). Without hard negatives the first term is 0 and only
    d→q trains. Masking, padding, ``neg_valid``, metrics (top-1 over the first term's candidates)
    and ``block_size`` as in :func:`gte_loss`.
    """
    return _global_loss(
        "instructor",
        q,
        d,
        temperature=temperature,
        q_ids=q_ids,
        d_ids=d_ids,
        neg=neg,
        neg_ids=neg_ids,
        valid=valid,
        neg_valid=neg_valid,
        symmetric=False,
        block_size=block_size,
        mesh=mesh,
    )


LOSSES = {"gte": gte_loss, "infonce": infonce_loss, "instructor": instructor_loss}
TEMPERATURES = {
    "gte": GTE_TEMPERATURE,
    "infonce": INFONCE_TEMPERATURE,
    "instructor": INSTRUCTOR_TEMPERATURE,
}


def contrastive_loss(name: str, q: Array, d: Array, **kwargs: Any) -> tuple[Array, Metrics]:
    """Dispatches to :func:`gte_loss` (``"gte"``), :func:`infonce_loss` (``"infonce"``) or
    :func:`instructor_loss` (``"instructor"``)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name](q, d, **kwargs)


def sharded_contrastive_loss(
    name: str,
    mesh: jax.sharding.Mesh,
    q: Array,
    d: Array,
    *,
    temperature: float | None = None,
    q_ids: Array | None = None,
    d_ids: Array | None = None,
    neg: Array | None = None,
    neg_ids: Array | None = None,
    valid: Array | None = None,
    neg_valid: Array | None = None,
    symmetric: bool = False,
    data_axis: str = DATA_AXIS,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
) -> tuple[Array, Metrics]:
    """The same loss as :func:`contrastive_loss`, as a ``shard_map`` over ``data_axis``.

    Each device all-gathers the candidate embeddings (q, d, negatives) and scores only its own
    rows, so the logits live as [min(n/P, block_size), 2M + 2n] per device; the sums are
    ``psum``-ed. The gradient
    of ``all_gather`` is a reduce-scatter, so this is differentiable as is. The batch size must be
    divisible by the size of ``data_axis``. ``block_size`` blocks each device's own rows.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    if temperature is None:
        temperature = TEMPERATURES[name]
    q, d, neg, q_ids, d_ids, neg_ids, valid, neg_valid = _prepare(
        q, d, neg, q_ids, d_ids, neg_ids, valid, neg_valid
    )
    n = q.shape[0]
    shards = mesh.shape[data_axis]
    if n % shards:
        raise ValueError(f"batch size {n} is not divisible by the {data_axis!r} axis ({shards})")
    args = (q, d, q_ids, d_ids, valid) + (() if neg is None else (neg, neg_ids, neg_valid))
    # τ is an operand (replicated), not a closure: a learnable τ is a traced value
    tau = jnp.asarray(temperature, jnp.result_type(q.dtype, jnp.float32))

    def local(tau, q_l, d_l, q_ids_l, d_ids_l, valid_l, *neg_l):
        def gather(x):
            return lax.all_gather(x, data_axis, tiled=True)

        def gather_rows(x):  # [r, K, ...] gathered as [r*K, ...]: XLA:TPU cannot compile
            # the gradient's reduce-scatter of [r, 1, D<128] (v5e, "2nd-minor compaction")
            flat = gather(x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]))
            return flat.reshape(-1, *x.shape[1:])

        neg_all, neg_ids_all, neg_valid_all = (
            (None, None, None) if not neg_l else tuple(gather_rows(x) for x in neg_l)
        )
        cands = _candidates(
            gather(q_l), gather(d_l), neg_all, gather(q_ids_l), gather(d_ids_l), neg_ids_all,
            gather(valid_l), neg_valid_all,
        )  # fmt: skip
        start = lax.axis_index(data_axis) * q_l.shape[0]
        rows = _Rows(q_l, d_l, start + jnp.arange(q_l.shape[0]), q_ids_l, d_ids_l)
        per_row = _blocked_row_losses(name, rows, cands, tau, symmetric, block_size)
        return lax.psum(_row_sums(per_row, valid_l), data_axis)

    spec = jax.sharding.PartitionSpec(data_axis)
    sums = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(jax.sharding.PartitionSpec(),) + tuple(spec for _ in args),
        out_specs=jax.sharding.PartitionSpec(),
    )(tau, *args)
    return _finalize(sums)


MNTP_IGNORE = -100  # label of a position without a loss term (gte_jax/data/mntp.py, torch's)


def mntp_loss(logits: Array, labels: Array) -> tuple[Array, Metrics]:
    """Masked next-token prediction (LLM2Vec §2.2): masked token i is predicted from the output
    at position i − 1, so the logits of position i − 1 are scored against the label of i.

    ``logits`` [B, L, V] (any float dtype; the softmax runs in float32), ``labels`` [B, L] int:
    the original id at masked positions, -100 elsewhere (gte_jax/data/mntp.py). The loss is the
    cross-entropy averaged over the masked positions of the whole (global) batch — transformers'
    causal-LM loss with these labels — and 0 when nothing is masked. Metrics: ``loss``,
    ``accuracy`` (argmax = label over the masked positions), ``num_masked``.
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, L, V] and labels [B, L], got {logits.shape}, {labels.shape}"
        )
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    pred = logits[:, :-1].astype(dtype)  # [B, L-1, V]: position i-1 predicts token i
    target = jnp.asarray(labels)[:, 1:]  # [B, L-1]
    scored = target != MNTP_IGNORE
    safe = jnp.where(scored, target, 0)
    log_probs = jax.nn.log_softmax(pred, axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]  # [B, L-1]
    count = jnp.sum(scored)
    denom = jnp.maximum(count, 1).astype(dtype)
    loss = jnp.sum(jnp.where(scored, nll, 0.0)) / denom
    correct = jnp.sum(scored & (jnp.argmax(pred, axis=-1) == safe))
    return loss, {"loss": loss, "accuracy": correct / denom, "num_masked": count.astype(dtype)}


def mntp_loss_sums(
    hidden: Array,
    labels: Array,
    head_fn: Any,
    head_params: Any,
    *,
    block_size: int,
) -> tuple[Array, Array, Array]:
    """:func:`mntp_loss`'s sums from the hidden states of the scored positions only:
    ``(sum of -log p(label), correct predictions, scored positions)``; differentiable in
    ``hidden`` and ``head_params`` (the first sum).

    ``hidden`` [B, L, D] (the tower's final-normed output), ``labels`` [B, L] as for
    :func:`mntp_loss`, ``head_fn(head_params, h [n, D]) -> logits [n, V]`` (the decoder's LM
    head, :func:`gte_jax.models.decoder.head_logits`). Why: the logits of every position,
    [B, L, V], are the largest tensor of an LLM step (V = 32k-256k), while only the masked
    ~20 % of positions are scored. The scored positions (position i - 1 of each label i) are
    moved to the front of the flattened [B * (L - 1)] axis (a stable sort on "not scored"), then
    scored ``block_size`` at a time in a ``lax.scan``; a block past the last scored position is
    skipped by ``lax.cond`` (no LM-head matmul). The gradient is a custom VJP: a second scan
    recomputes each block's logits and pulls (softmax - onehot) back through the head, adding
    into the head's gradient in the carry — autodiff of the scan would stack one head-sized
    residual per block. Forward and backward hold one block's logits, [block_size, V]. Exact for
    any number of masked tokens: the static block count covers every position.
    """
    d = hidden.shape[-1]
    target = jnp.asarray(labels)[:, 1:].reshape(-1)  # [N = B*(L-1)]: label of token i ...
    source = hidden[:, :-1].reshape(-1, d)  # [N, D]: ... predicted from position i-1
    scored = target != MNTP_IGNORE
    count = jnp.sum(scored)
    n = target.shape[0]
    block = max(1, min(int(block_size), n))
    num_blocks = -(-n // block)
    order = jnp.argsort(~scored, stable=True)  # scored positions first, in order
    blocks = jnp.pad(order, (0, num_blocks * block - n)).reshape(num_blocks, block)
    valid = (jnp.arange(num_blocks * block) < count).reshape(num_blocks, block)
    targets = jnp.where(valid, jnp.take(target, blocks), 0)  # [num_blocks, block]
    nll, correct = _scored_nll(head_fn, source, head_params, blocks, targets, valid)
    return nll, correct, count.astype(jnp.float32)


def _block_logits(head_fn, params, source, idx) -> Array:
    return head_fn(params, jnp.take(source, idx, axis=0)).astype(jnp.float32)  # [block, V]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scored_nll(head_fn, source, params, blocks, targets, valid):
    return _scored_nll_fwd(head_fn, source, params, blocks, targets, valid)[0]


def _scored_nll_fwd(head_fn, source, params, blocks, targets, valid):
    def body(carry, xs):
        idx, tgt, ok = xs

        def terms():
            logits = _block_logits(head_fn, params, source, idx)
            nll = (
                jax.nn.logsumexp(logits, axis=-1)
                - jnp.take_along_axis(logits, tgt[:, None], axis=-1)[:, 0]
            )
            right = ok & (jnp.argmax(logits, axis=-1) == tgt)
            return jnp.sum(jnp.where(ok, nll, 0.0)), jnp.sum(right).astype(jnp.float32)

        zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        sums = lax.cond(ok[0], terms, lambda: zero)  # ok[0]: the block holds a scored position
        return (carry[0] + sums[0], carry[1] + sums[1]), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    out, _ = lax.scan(body, init, (blocks, targets, valid))
    return out, (source, params, blocks, targets, valid)


def _scored_nll_bwd(head_fn, res, g):
    source, params, blocks, targets, valid = res
    g_nll = g[0]  # the count of correct predictions has no gradient

    def body(carry, xs):
        idx, tgt, ok = xs

        def pull():
            d_source, d_params = carry
            h = jnp.take(source, idx, axis=0)
            logits, vjp = jax.vjp(
                lambda p, x: head_fn(p, x).astype(jnp.float32), params, h
            )  # [block, V]
            probs = jax.nn.softmax(logits, axis=-1)
            onehot = jax.nn.one_hot(tgt, logits.shape[-1], dtype=jnp.float32)
            d_logits = (probs - onehot) * (ok.astype(jnp.float32) * g_nll)[:, None]
            dp, dh = vjp(d_logits)
            return d_source.at[idx].add(dh.astype(d_source.dtype)), jax.tree.map(
                jnp.add, d_params, dp
            )

        return lax.cond(ok[0], pull, lambda: carry), None

    init = (jnp.zeros_like(source), jax.tree.map(jnp.zeros_like, params))
    (d_source, d_params), _ = lax.scan(body, init, (blocks, targets, valid))
    return d_source, d_params, None, None, None


_scored_nll.defvjp(_scored_nll_fwd, _scored_nll_bwd)
