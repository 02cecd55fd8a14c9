"""From sampled records to the batch dict of docs/design.md: read, tokenise, bucket, pad, slice.

Division of labour over processes: every process draws the same global batch (the α-sampler is
a pure function of the seed and the step) but reads, tokenises and materialises only its own
rows: the blocks of the mesh's ``"data"`` axis its devices hold
(:class:`~gte_jax.data.layout.BatchLayout`; on a multi-host TPU slice those blocks are scattered
over the axis, e.g. hosts 0,1,2,3,0,1,2,3,... on a v4-32). Text ids must still be exact over the
global batch, so each process publishes a 64-bit hash of every text it read and all assign the
ids from the assembled hashes by :func:`assign_text_ids`' rule (:func:`exchange_text_ids`; one
host-side exchange per batch, docs/pod_input.md). The padded length must be the same
everywhere, so the processes agree on the longest tokenised length with one tiny all-gather of
two int32s per batch (``agree_lengths``; a no-op for one process) and pad to the smallest bucket
that holds it. The alternative rule without communication -- every process tokenises the whole
global batch just to learn the lengths -- would make tokenisation cost O(global batch) per host,
the thing the split is meant to avoid; character-count estimates are not exact and would
truncate.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np

from gte_jax.data.layout import BatchLayout
from gte_jax.data.mixture import MixtureSampler
from gte_jax.data.mntp import MntpMasking, label_rows
from gte_jax.data.sources import PairRecord, Source
from gte_jax.prompts import PromptLengths, pool_masks

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Pure helpers


def bucket_lengths(max_length: int, min_bucket: int = 16, multiple: int = 0) -> tuple[int, ...]:
    """The padded lengths a batch may take, ending with ``max_length`` itself.

    ``multiple == 0``: powers of two from ``min_bucket``, e.g. (16, 32, 64, 128) for 128 and
    (16, 32, 64, 128, 200) for 200: at most ~log2(max) shapes to compile, and a batch is never
    padded to more than twice its longest text. ``multiple > 0``: every multiple of it from the
    first one >= ``min_bucket``, e.g. (16, 32, 48, ..., 128) for 16: at most ``multiple - 1``
    pad tokens per row beyond the longest text, for up to max/multiple shapes to compile.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if multiple < 0:
        raise ValueError(f"bucket multiple must be >= 0, got {multiple}")
    out = []
    if multiple:
        b = max(multiple, -(-min_bucket // multiple) * multiple)
        while b < max_length:
            out.append(b)
            b += multiple
    else:
        b = min_bucket
        while b < max_length:
            out.append(b)
            b *= 2
    out.append(max_length)
    return tuple(out)


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def _take(items: Sequence[Any], rows: np.ndarray) -> list[Any]:
    return [items[i] for i in rows]


def assign_text_ids(
    queries: Sequence[str], docs: Sequence[str], negatives: Sequence[Sequence[str]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids equal ⇔ identical strings, over all roles of the (global) batch.

    Decided on the raw text (before prefixes/instructions): the same content must not serve as
    a negative of itself whether it appears as a query or a document.
    """
    table: dict[str, int] = {}

    def ids(texts: Sequence[str]) -> list[int]:
        return [table.setdefault(t, len(table)) for t in texts]

    q = np.asarray(ids(queries), dtype=np.int32)
    d = np.asarray(ids(docs), dtype=np.int32)
    k = len(negatives[0]) if len(negatives) else 0
    n = np.asarray([ids(row) for row in negatives], dtype=np.int32).reshape(len(negatives), k)
    return q, d, n


def text_hashes(texts: Sequence[str]) -> np.ndarray:
    """[n] uint64: the first 8 bytes of BLAKE2b of each text's UTF-8 bytes, the same on every
    process and run (Python's ``hash`` of a str is salted per process)."""
    digests = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest() for t in texts)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def ids_from_hashes(
    queries: np.ndarray, docs: np.ndarray, negatives: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`assign_text_ids`' rule on text hashes ([B], [B], [B, K] uint64): ids numbered by
    first appearance in the order queries, documents, negatives (row-major).

    Equal to the ids of the texts unless two different texts of one batch share a hash: for n
    distinct texts the chance is about n^2 / 2^65, 3e-11 for the 2 x 16384 texts of a GTE
    stage-1 batch, 3e-6 over 100k such steps. Its only effect would be one pair masked as a
    duplicate (a negative fewer in one row of the loss), so it is not checked for."""
    b, k = negatives.shape
    flat = np.concatenate([queries, docs, negatives.reshape(-1)])
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int32)
    rank[np.argsort(first)] = np.arange(len(first), dtype=np.int32)
    ids = rank[inverse.reshape(-1)]
    return ids[:b], ids[b : 2 * b], ids[2 * b :].reshape(b, k)


def pad_ids(
    rows: Sequence[Sequence[int]], length: int, pad_id: int, *, left: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """[N, length] int32 ids and attention mask; rows must already fit (truncated upstream).
    ``left``: pads before the text (the tokenizer's ``padding_side == "left"``)."""
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, row in enumerate(rows):
        at = slice(length - len(row), length) if left else slice(0, len(row))
        ids[i, at] = row
        mask[i, at] = 1
    return ids, mask


# --------------------------------------------------------------------------------------------
# Batch plan: the texts of one global batch's rows (all of them, or one process's)


@dataclasses.dataclass
class GlobalBatchPlan:
    """The texts of ``rows`` of one global batch of ``batch_size`` examples: every row (one
    process, or a process that reads the whole batch) or one process's own rows. The lists and
    arrays are indexed by position in ``rows`` (:meth:`positions`)."""

    step: int
    sources: list[str]  # [n] source name of each example
    queries: list[str]  # [n] raw texts
    query_prefixes: list[str]  # [n] query prompts (the source's, or the record's instruction)
    docs: list[str]  # [n]
    doc_prefixes: list[str]  # [n] prompts of the document and negatives of each example
    negatives: list[list[str]]  # [n][K]; placeholders (NEG_PLACEHOLDER) where neg_valid is 0
    query_text_id: np.ndarray | None  # [n] (None until exchange_text_ids when rows are partial)
    doc_text_id: np.ndarray | None  # [n]
    neg_text_id: np.ndarray | None  # [n, K]
    neg_valid: np.ndarray  # [n, K] int32: 1 = a real negative, 0 = the record had fewer than K
    rows: np.ndarray | None = None  # [n] increasing global rows held; None: every row
    batch_size: int | None = None  # global examples; None: n
    # [n, 1+K] float32 teacher scores (positive, then negatives; 0 for placeholders) when every
    # record read has them (PairRecord.teacher_scores), else None: no key in the batch.
    teacher_scores: np.ndarray | None = None

    @property
    def size(self) -> int:
        """Examples of the global batch (not only the rows held)."""
        return len(self.queries) if self.batch_size is None else self.batch_size

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Where global ``rows`` (all held) sit in this plan's lists."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.rows is None:
            return rows
        at = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)
        if (self.rows[at] != rows).any():
            raise ValueError(f"rows {rows.tolist()} are not all held by this plan")
        return at


# The text standing in for a missing negative (a record with fewer than K): it is tokenised like
# any text (a few tokens, so every row keeps K negatives and one shape) and masked out of the loss
# by ``neg_valid``. Parsed records never hold an empty text, so it is never a real text's twin.
NEG_PLACEHOLDER = ""


def _fill_negatives(rec: PairRecord, k: int) -> tuple[list[str], list[int]]:
    """The first K of the record's negatives, placeholders after them, and their validity."""
    real = list(rec.negatives[:k])
    return real + [NEG_PLACEHOLDER] * (k - len(real)), [1] * len(real) + [0] * (k - len(real))


def _read_records(drawn: Sequence[tuple[str, int]], sources: Mapping[str, Source]) -> list[Any]:
    """The records of ``drawn``, in order, with one read per source."""
    at: dict[str, list[int]] = {}
    for j, (name, _) in enumerate(drawn):
        at.setdefault(name, []).append(j)
    records: list[Any] = [None] * len(drawn)
    for name, rows in at.items():
        for j, rec in zip(rows, sources[name].many([drawn[j][1] for j in rows]), strict=True):
            records[j] = rec
    return records


def make_plan(
    step: int,
    drawn: Sequence[tuple[str, int]],
    sources: Mapping[str, Source],
    num_negatives: int,
    rows: np.ndarray | None = None,
) -> GlobalBatchPlan:
    """The plan of the global batch ``drawn``, reading only the records of ``rows`` (global
    indices, increasing; None: all). Text ids are assigned here when every row is read; for a
    part, :func:`exchange_text_ids` assigns them over the global batch."""
    held = drawn if rows is None else [drawn[int(j)] for j in rows]
    names, queries, qpre, docs, dpre, negs, neg_ok = [], [], [], [], [], [], []
    records = _read_records(held, sources)
    for (name, _), rec in zip(held, records, strict=True):
        opts = sources[name].options
        names.append(name)
        queries.append(rec.query)
        qpre.append(opts.query_prompt(rec.instruction))
        docs.append(rec.positive)
        dpre.append(opts.doc_prompt(rec.doc_instruction))
        texts, ok = _fill_negatives(rec, num_negatives)
        negs.append(texts)
        neg_ok.append(ok)
    n_ok = np.asarray(neg_ok, dtype=np.int32).reshape(len(held), num_negatives)
    ids = assign_text_ids(queries, docs, negs) if rows is None else (None, None, None)
    return GlobalBatchPlan(
        step, names, queries, qpre, docs, dpre, negs, *ids, n_ok,
        rows=None if rows is None else np.asarray(rows, dtype=np.int64), batch_size=len(drawn),
        teacher_scores=_teacher_scores(records, num_negatives),
    )  # fmt: skip


def _teacher_scores(records: Sequence[PairRecord], k: int) -> np.ndarray | None:
    """[B, 1+K] float32: each record's teacher scores cut or padded (0, masked by ``neg_valid``)
    to K negatives, as :func:`_fill_negatives` does; None unless every record has them."""
    if not records or not all(rec.teacher_scores for rec in records):
        return None
    out = np.zeros((len(records), 1 + k), np.float32)
    for i, rec in enumerate(records):
        scores = rec.teacher_scores[: 1 + k]
        out[i, : len(scores)] = scores
    return out


# --------------------------------------------------------------------------------------------
# Tokenising one process's slice


@dataclasses.dataclass
class TokenizedSlice:
    query_ids: list[list[int]]
    doc_ids: list[list[int]]
    neg_ids: list[list[int]]  # [b * K] row-major
    rows: slice
    # Pool masks (1 = pooled) when prompt tokens are excluded from pooling (include_prompt=False).
    query_pool: list[list[int]] | None = None
    doc_pool: list[list[int]] | None = None
    neg_pool: list[list[int]] | None = None

    def max_lengths(self) -> np.ndarray:
        """[2] int32: longest query, longest doc/negative of this slice."""
        lq = max((len(r) for r in self.query_ids), default=1)
        ld = max((len(r) for r in self.doc_ids + self.neg_ids), default=1)
        return np.asarray([lq, ld], dtype=np.int32)


def _tokenize(tokenizer, prefixes: Sequence[str], texts: Sequence[str], max_length: int):
    full = [p + t for p, t in zip(prefixes, texts, strict=True)]
    enc = tokenizer(full, truncation=True, max_length=max_length, add_special_tokens=True)
    return enc["input_ids"]


def tokenize_slice(
    plan: GlobalBatchPlan,
    tokenizer,
    rows: np.ndarray,
    *,
    query_max_length: int,
    doc_max_length: int,
    prompt_lengths: PromptLengths | None = None,
) -> TokenizedSlice:
    """Tokenises this process's rows of ``plan`` (global row indices, in local order); with
    ``prompt_lengths`` (``include_prompt`` is False) every role also gets pool masks without its
    prompt's tokens (:mod:`gte_jax.prompts`)."""
    rows = np.asarray(rows, dtype=np.int64)
    at = plan.positions(rows)
    q_pre, q_txt = _take(plan.query_prefixes, at), _take(plan.queries, at)
    q_ids = _tokenize(tokenizer, q_pre, q_txt, query_max_length)
    d_pre = _take(plan.doc_prefixes, at)
    d_ids = _tokenize(tokenizer, d_pre, _take(plan.docs, at), doc_max_length)
    negs = _take(plan.negatives, at)
    flat_negs = [t for row in negs for t in row]
    flat_pre = [p for p, row in zip(d_pre, negs, strict=True) for _ in row]
    n_ids = _tokenize(tokenizer, flat_pre, flat_negs, doc_max_length) if flat_negs else []
    out = TokenizedSlice(q_ids, d_ids, n_ids, rows)
    if prompt_lengths is not None:
        out.query_pool = pool_masks(prompt_lengths, q_pre, q_ids)
        out.doc_pool = pool_masks(prompt_lengths, d_pre, d_ids)
        out.neg_pool = pool_masks(prompt_lengths, flat_pre, n_ids)
    return out


def materialize(
    plan: GlobalBatchPlan,
    tok: TokenizedSlice,
    *,
    query_length: int,
    doc_length: int,
    pad_id: int,
    num_negatives: int,
    left_pad: bool = False,
) -> dict[str, np.ndarray]:
    """The process-local batch dict (docs/design.md table), padded to the agreed bucket lengths
    (before the texts with ``left_pad``; pool masks move with their tokens)."""
    b, at = len(tok.query_ids), plan.positions(tok.rows)
    q_ids, q_mask = pad_ids(tok.query_ids, query_length, pad_id, left=left_pad)
    d_ids, d_mask = pad_ids(tok.doc_ids, doc_length, pad_id, left=left_pad)
    out = {
        "query_input_ids": q_ids,
        "query_attention_mask": q_mask,
        "doc_input_ids": d_ids,
        "doc_attention_mask": d_mask,
        "query_text_id": plan.query_text_id[at],
        "doc_text_id": plan.doc_text_id[at],
        "valid": np.ones((b,), dtype=np.int32),
    }
    if tok.query_pool is not None:
        out["query_pool_mask"], _ = pad_ids(tok.query_pool, query_length, 0, left=left_pad)
        out["doc_pool_mask"], _ = pad_ids(tok.doc_pool, doc_length, 0, left=left_pad)
    if num_negatives:
        n_ids, n_mask = pad_ids(tok.neg_ids, doc_length, pad_id, left=left_pad)
        out["neg_input_ids"] = n_ids.reshape(b, num_negatives, doc_length)
        out["neg_attention_mask"] = n_mask.reshape(b, num_negatives, doc_length)
        if tok.neg_pool is not None:
            n_pool, _ = pad_ids(tok.neg_pool, doc_length, 0, left=left_pad)
            out["neg_pool_mask"] = n_pool.reshape(b, num_negatives, doc_length)
        out["neg_text_id"] = plan.neg_text_id[at]
        out["neg_valid"] = plan.neg_valid[at]
    if plan.teacher_scores is not None:
        out["teacher_scores"] = plan.teacher_scores[at]
    return out


# --------------------------------------------------------------------------------------------
# Sequence packing: several texts per row, so that padding nearly vanishes


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: rows of text indices, each row's lengths sum <= capacity.

    Longest text first, each into the fullest row it still fits (ties: the older row); within a
    row, texts keep their placement order. Deterministic; O(n log n) plus list inserts.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free tokens, row index)
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"text {i} has {n} tokens, more than the packed row length {capacity}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, r = free.pop(at)
            rows[r].append(i)
            bisect.insort(free, (room - n, r))
        else:
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
    return rows


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def packed_arrays(
    texts: Sequence[Sequence[int]],
    rows: Sequence[Sequence[int]],
    *,
    num_rows: int,
    length: int,
    pad_id: int,
    slot_offset: int = 0,
    pool: Sequence[Sequence[int]] | None = None,
    token_types: Sequence[Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """One role's packed model inputs (keys without the role prefix).

    ``input_ids`` / ``attention_mask`` / ``segment_ids`` (1, 2, ... per text of a row, 0 = pad) /
    ``position_ids`` (0, 1, ... from each text's first token; the model adds RoBERTa's offset)
    [num_rows, length], optional ``pool_mask`` and ``token_type_ids`` (the tokenizer's, laid out
    with their tokens) [num_rows, length], and ``slot_index`` [n]: text i
    lies in row r as the s-th text (s from 0) -> ``slot_offset + r * length + s``. The slot axis
    has ``length`` entries per row (a row holds at most ``length`` texts), so it needs no bucket
    of its own; ``slot_offset`` makes the index global over the processes' rows.
    """
    ids = np.full((num_rows, length), pad_id, dtype=np.int32)
    mask = np.zeros((num_rows, length), dtype=np.int32)
    segments = np.zeros((num_rows, length), dtype=np.int32)
    positions = np.zeros((num_rows, length), dtype=np.int32)
    pooled = np.zeros((num_rows, length), dtype=np.int32) if pool is not None else None
    types = np.zeros((num_rows, length), dtype=np.int32) if token_types is not None else None
    slot_index = np.full((len(texts),), -1, dtype=np.int32)
    if len(rows) > num_rows:
        raise ValueError(f"{len(rows)} packed rows do not fit in num_rows={num_rows}")
    for r, members in enumerate(rows):
        start = 0
        for s, i in enumerate(members):
            n = len(texts[i])
            ids[r, start : start + n] = texts[i]
            mask[r, start : start + n] = 1
            segments[r, start : start + n] = s + 1
            positions[r, start : start + n] = np.arange(n)
            if pooled is not None:
                pooled[r, start : start + n] = pool[i]
            if types is not None:
                types[r, start : start + n] = token_types[i]
            slot_index[i] = slot_offset + r * length + s
            start += n
    if (slot_index < 0).any():
        raise ValueError("every text must be placed in exactly one row")
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "segment_ids": segments,
        "position_ids": positions,
        "slot_index": slot_index,
    }
    if pooled is not None:
        out["pool_mask"] = pooled
    if types is not None:
        out["token_type_ids"] = types
    return out


def _at_least_rows(rows: list[list[int]], n: int) -> list[list[int]]:
    """``rows`` split until there are ``n`` (moves the last text of the row with the most texts
    into a row of its own), so that every GradCache chunk of a device holds a real text."""
    rows = [list(r) for r in rows]
    while len(rows) < n:
        most = max(range(len(rows)), key=lambda r: (len(rows[r]), -r))
        if len(rows[most]) < 2:
            raise ValueError(f"{sum(map(len, rows))} texts cannot fill {n} rows")
        rows.append([rows[most].pop()])
    return rows


def chunk_plan(num_rows: int, max_rows_per_chunk: int, row_multiple: int = 1) -> tuple[int, int]:
    """(chunks, rows per chunk) of one role on one device, GradCache by token budget.

    ``max_rows_per_chunk`` rows of L tokens is the budget (what one padded chunk holds at full
    length); the fewest chunks within it, then rows balanced over them: at most chunks - 1 empty
    rows per device beyond the rounding to ``row_multiple``."""
    chunks = max(1, -(-num_rows // max(1, max_rows_per_chunk)))
    return chunks, round_up(max(1, -(-num_rows // chunks)), row_multiple)


def packed_chunk_arrays(
    texts: Sequence[Sequence[int]],
    rows: Sequence[Sequence[int]],
    *,
    num_chunks: int,
    rows_per_chunk: int,
    slots_per_chunk: int,
    length: int,
    pad_id: int,
    device: int,
    num_devices: int,
    pool: Sequence[Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """One device's packed rows of one role dealt to ``num_chunks`` GradCache chunks.

    Packed row k (best-fit decreasing order) goes to chunk ``k % C``, row ``k // C``; keys as
    :func:`packed_arrays`, with rows [R, C, L] (axis 1 = chunk), ``slot_index`` [S, C] (chunk
    c's texts: slots of chunk c's global rows [D * R, L], i.e. ``(device * R + r) * L + s``;
    unused entries repeat the chunk's first text) and ``chunk_index`` [n]: text i's place in the
    chunk outputs [C, D * S] flattened, ``c * D * S + device * S + j``.
    """
    c_, r_, s_ = num_chunks, rows_per_chunk, slots_per_chunk
    base = packed_arrays(texts, rows, num_rows=c_ * r_, length=length, pad_id=pad_id, pool=pool)
    out = {key: v.reshape(r_, c_, length) for key, v in base.items() if key != "slot_index"}
    slot_index = np.full((s_, c_), -1, dtype=np.int32)
    chunk_index = np.zeros((len(texts),), dtype=np.int32)
    used = [0] * c_
    for i, slot in enumerate(base["slot_index"]):
        k, s = divmod(int(slot), length)
        c, r = k % c_, k // c_
        j = used[c]
        if j >= s_:
            raise ValueError(f"chunk {c} holds more than slots_per_chunk={s_} texts")
        used[c] += 1
        slot_index[j, c] = (device * r_ + r) * length + s
        chunk_index[i] = c * num_devices * s_ + device * s_ + j
    if min(used) == 0:
        raise ValueError("every chunk of a device must hold a text (see _at_least_rows)")
    out["slot_index"] = np.where(slot_index < 0, slot_index[:1], slot_index)
    out["chunk_index"] = chunk_index
    return out


def materialize_packed(
    plan: GlobalBatchPlan,
    tok: TokenizedSlice,
    *,
    query_length: int,
    doc_length: int,
    pad_id: int,
    num_negatives: int,
    row_multiple: int = 1,
    layout: BatchLayout | None = None,
    agree_rows: Callable[[np.ndarray], np.ndarray] = lambda x: x,
    chunks: int = 1,
    row_floor: MutableMapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """The process-local batch with every role packed (docs/design.md, "Packed batches").

    The process's examples are split into its ``layout.groups`` blocks, one per device of the
    data axis it holds (``layout.blocks``: their places on the axis), and each block is packed into
    its own rows: a device's rows hold exactly its examples, so the global layout (and the
    dropout masks drawn on it) depends on the number of data devices only, not on how they are
    spread over processes. Row counts per device are
    agreed over devices and processes (max) and rounded up to ``row_multiple``, so every device
    holds the same [R, L] shapes.

    ``chunks > 1`` (GradCache): docs/design.md "Packing with GradCache" (each role's rows dealt
    to the fewest chunks within a padded chunk's token budget, :func:`packed_chunk_arrays`).

    ``row_floor`` (one chunk): rows per device at least ``row_floor[key]``, raised to what this
    batch used (shapes only grow: ``PairBatchIterator.prime_row_floor``).
    """
    layout = layout or BatchLayout((0,), 1)
    if chunks > 1:
        return _materialize_packed_chunked(
            plan, tok, query_length=query_length, doc_length=doc_length, pad_id=pad_id,
            num_negatives=num_negatives, row_multiple=row_multiple, layout=layout,
            agree_rows=agree_rows, chunks=chunks,
        )  # fmt: skip
    groups = layout.groups
    b = len(tok.query_ids)
    if b % groups:
        raise ValueError(f"{b} examples do not split over {groups} local devices")
    roles = _role_specs(tok, query_length, doc_length, num_negatives)
    # A text longer than its role's rows (rows shorter than the max length: see
    # PairBatchIterator.prime_row_floor) is agreed in the same all-gather as the row counts.
    longer = any(len(t) > length for _, texts, length, _ in roles for t in texts)
    if longer:
        local = [1] + [0] * len(roles)
    else:
        blocks, texts_of, layouts = _device_layouts(b, groups, roles)
        local = [0] + [max(max(len(rows), 1) for rows in per_block) for per_block in layouts]
    overflow, *counts = agree_rows(np.asarray(local, np.int32))
    if overflow:
        raise RowOverflow(tok.max_lengths())
    out = {}
    floor = row_floor if row_floor is not None else {}
    for (role, texts, length, pool), per_block, count in zip(roles, layouts, counts, strict=True):
        key = _floor_key(role, b, num_negatives)
        num_rows = round_up(max(int(count), floor.get(key, 0)), row_multiple)  # per device
        floor[key] = num_rows
        parts = [
            packed_arrays(
                texts_of(texts, blk),
                rows,
                num_rows=num_rows,
                length=length,
                pad_id=pad_id,
                slot_offset=layout.blocks[g] * num_rows * length,
                pool=None if pool is None else texts_of(pool, blk),
            )
            for g, (blk, rows) in enumerate(zip(blocks, per_block, strict=True))
        ]
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if role == "neg":
            arrays["slot_index"] = arrays["slot_index"].reshape(b, num_negatives)
        out.update({f"{role}_{k}": value for k, value in arrays.items()})
    return _with_ids(out, plan, tok, num_negatives)


class RowOverflow(Exception):
    """A text (on some process) is longer than its role's packed rows: the caller re-packs the
    batch into longer rows. ``longest``: this process's [query, doc] longest text."""

    def __init__(self, longest: np.ndarray):
        super().__init__(f"a text is longer than the packed rows (here: {longest.tolist()})")
        self.longest = longest


def fit_row_length(longest: int, max_length: int, headroom: bool = True) -> int:
    """The packed row length for texts of at most ``longest`` tokens seen at start-up, rounded up
    to a multiple of 8, at most ``max_length``. ``headroom``: an eighth more, when the batches
    seen are not the whole run (a later batch's longest text is rarely that much longer).
    Attention over a packed row costs in proportion to its length (block-diagonal, computed
    dense), so rows no longer than the data needs are cheaper."""
    extra = int(longest) // 8 if headroom else 0
    return max(1, min(int(max_length), round_up(int(longest) + extra, 8)))


def _floor_key(role: str, local_batch: int, num_negatives: int) -> str:
    """Row floors are per role and batch shape (per-source batch sizes and K differ)."""
    return f"{role}/{local_batch}/{num_negatives}"


def packed_rows_needed(tok: TokenizedSlice, lengths: Mapping[str, int], groups: int) -> dict:
    """Rows per device each role of ``tok`` needs when packed (:func:`_floor_key` -> rows)."""
    b = len(tok.query_ids)
    k = len(tok.neg_ids) // max(b, 1)
    roles = _role_specs(tok, lengths["query"], lengths["doc"], k)
    _, _, layouts = _device_layouts(b, groups, roles)
    return {
        _floor_key(role, b, k): max(max(len(rows), 1) for rows in per_device)
        for (role, *_), per_device in zip(roles, layouts, strict=True)
    }


def _with_ids(
    out: dict[str, np.ndarray], plan: GlobalBatchPlan, tok: TokenizedSlice, num_negatives: int
) -> dict[str, np.ndarray]:
    """Adds the text ids, negative validity and ``valid`` of this process's rows."""
    b, at = len(tok.query_ids), plan.positions(tok.rows)
    out["query_text_id"] = plan.query_text_id[at]
    out["doc_text_id"] = plan.doc_text_id[at]
    if num_negatives:
        out["neg_text_id"] = plan.neg_text_id[at]
        out["neg_valid"] = plan.neg_valid[at]
    if plan.teacher_scores is not None:
        out["teacher_scores"] = plan.teacher_scores[at]
    out["valid"] = np.ones((b,), dtype=np.int32)
    return out


def _device_layouts(b: int, groups: int, roles):
    """Each local device's contiguous block of examples and, per role, its texts packed into rows
    of the role's length: (blocks, texts_of(texts, block), [role][device] -> rows)."""
    per = b // groups
    blocks = [range(g * per, (g + 1) * per) for g in range(groups)]

    def texts_of(texts, block):  # negatives are flattened [b * K]: a block is K times longer
        k = len(texts) // b
        return [texts[i] for e in block for i in range(e * k, (e + 1) * k)]

    layouts = [
        [pack_rows([len(t) for t in texts_of(texts, blk)], length) for blk in blocks]
        for _, texts, length, _ in roles
    ]
    return blocks, texts_of, layouts


def _role_specs(tok: TokenizedSlice, query_length: int, doc_length: int, num_negatives: int):
    roles = [("query", tok.query_ids, query_length, tok.query_pool)]
    roles.append(("doc", tok.doc_ids, doc_length, tok.doc_pool))
    if num_negatives:
        roles.append(("neg", tok.neg_ids, doc_length, tok.neg_pool))
    return roles


def _materialize_packed_chunked(
    plan, tok, *, query_length, doc_length, pad_id, num_negatives, row_multiple, layout,
    agree_rows, chunks,
) -> dict[str, np.ndarray]:  # fmt: skip
    groups = layout.groups
    b = len(tok.query_ids)
    if b % (groups * chunks):
        raise ValueError(f"{b} examples do not split over {groups} devices x {chunks} chunks")
    roles = _role_specs(tok, query_length, doc_length, num_negatives)
    blocks, texts_of, layouts = _device_layouts(b, groups, roles)
    # Round 1: rows per device (max over devices and processes) -> chunks and rows per chunk.
    counts = agree_rows(np.asarray([max(len(r) for r in lay) for lay in layouts], np.int32))
    plans = []
    for (_, texts, _, _), count in zip(roles, counts, strict=True):
        budget = (b // groups // chunks) * (len(texts) // b)  # rows of one padded chunk, per device
        plans.append(chunk_plan(int(count), budget, row_multiple))
    # Every chunk of every device holds a text (no empty slot is ever normalised).
    layouts = [
        [_at_least_rows(r, c) for r in lay] for lay, (c, _) in zip(layouts, plans, strict=True)
    ]

    def most_per_chunk(rows, c):
        return max(sum(len(rows[k]) for k in range(j, len(rows), c)) for j in range(c))

    # Round 2: texts per chunk (max over chunks, devices, processes).
    slots = agree_rows(
        np.asarray(
            [
                max(most_per_chunk(r, c) for r in lay)
                for lay, (c, _) in zip(layouts, plans, strict=True)
            ],
            np.int32,
        )
    )
    out = {}
    for (role, texts, length, pool), lay, (c, r), s in zip(
        roles, layouts, plans, slots, strict=True
    ):
        parts = [
            packed_chunk_arrays(
                texts_of(texts, blk),
                rows,
                num_chunks=c,
                rows_per_chunk=r,
                slots_per_chunk=round_up(int(s), row_multiple),
                length=length,
                pad_id=pad_id,
                device=layout.blocks[g],
                num_devices=layout.num_blocks,
                pool=None if pool is None else texts_of(pool, blk),
            )
            for g, (blk, rows) in enumerate(zip(blocks, lay, strict=True))
        ]
        arrays = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        if role == "neg":
            arrays["chunk_index"] = arrays["chunk_index"].reshape(b, num_negatives)
        out.update({f"{role}_{key}": value for key, value in arrays.items()})
    return _with_ids(out, plan, tok, num_negatives)


@dataclasses.dataclass
class Prepared:
    """A drawn, tokenised batch waiting for its layout (:meth:`PairBatchIterator.prepare`)."""

    plan: GlobalBatchPlan
    tok: TokenizedSlice
    labels: Any  # MNTP labels per query row, or None
    sampler_state: dict[str, Any] | None  # right after this batch's draw


_AGREEMENTS = itertools.count()  # one key prefix per agreement; every process counts alike


class HostAllGather:
    """Every JAX process's bytes, in process order, on the host only: through
    ``jax.distributed``'s coordination service (each process sets its key, one barrier, one read
    of the round's keys), never a device program. Why not ``multihost_utils.process_allgather``:
    that runs a collective on the devices, which would take turns with the train step, and from a
    prefetch thread could be enqueued in a different order on different hosts. Every process must
    call it the same number of times (the iterator: once per batch, in step order), and build its
    exchanges in the same order (each gets its own key prefix from a count)."""

    def __init__(self, timeout_s: float = 600.0):
        import jax
        from jax._src import distributed

        self.client = distributed.global_state.client  # None: one JAX process, nothing to agree
        self.process, self.processes = jax.process_index(), jax.process_count()
        self.prefix = f"gte_jax/agree/{next(_AGREEMENTS)}"
        self.round = 0
        self.timeout_ms = int(timeout_s * 1000)

    @classmethod
    def between_processes(cls) -> HostAllGather | None:
        """An exchange when there are several JAX processes to exchange with, else None."""
        from jax._src import distributed

        if distributed.global_state.client is None:
            return None
        out = cls()
        return out if out.processes > 1 else None

    def __call__(self, local: bytes) -> list[bytes]:
        if self.client is None:
            return [bytes(local)]
        key = f"{self.prefix}/{self.round}"
        self.client.key_value_set_bytes(f"{key}/{self.process}", bytes(local))
        self.client.wait_at_barrier(f"{key}/all", self.timeout_ms)
        got = {int(k.rsplit("/", 1)[-1]): v for k, v in self.client.key_value_dir_get_bytes(key)}
        if sorted(got) != list(range(self.processes)):
            raise RuntimeError(f"agreement {key}: {len(got)} of {self.processes} processes")
        if self.round:  # every process has read the previous round once all set this one
            self.client.key_value_delete(f"{self.prefix}/{self.round - 1}/{self.process}")
        self.round += 1
        return [got[p] for p in range(self.processes)]


class HostAllGatherMax:
    """Element-wise max of a small int32 array over all JAX processes (:class:`HostAllGather`)."""

    def __init__(self, timeout_s: float = 600.0):
        self.gather = HostAllGather(timeout_s)

    def __call__(self, local: np.ndarray) -> np.ndarray:
        local = np.ascontiguousarray(local, dtype=np.int32)
        parts = self.gather(local.tobytes())
        return np.max([np.frombuffer(v, dtype=np.int32).reshape(local.shape) for v in parts], 0)


# What a process publishes instead of its hashes when it could not read its rows: the others stop
# with an error at once instead of waiting at the next exchange's barrier for it.
_READ_FAILED = np.asarray([1], dtype=np.uint64).tobytes()


def _hash_payload(plan: GlobalBatchPlan) -> bytes:
    """[0, n, rows (n), query hashes (n), doc hashes (n), negative hashes (n * K)] uint64."""
    negatives = [t for row in plan.negatives for t in row]
    head = np.asarray([0, len(plan.rows)], dtype=np.uint64)
    parts = [head, plan.rows.astype(np.uint64), text_hashes(plan.queries)]
    return np.concatenate([*parts, text_hashes(plan.docs), text_hashes(negatives)]).tobytes()


def exchange_text_ids(
    plan: GlobalBatchPlan, gather: Callable[[bytes], list[bytes]]
) -> GlobalBatchPlan:
    """``plan`` (this process's rows) with the text ids of the global batch: every process
    publishes the hashes of the texts it read (:func:`text_hashes`), all assemble the global
    [B], [B], [B, K] hash arrays and number them by :func:`assign_text_ids`' rule
    (:func:`ids_from_hashes`). ``gather``: bytes -> every process's bytes (:class:`HostAllGather`)."""
    b, k = plan.size, plan.neg_valid.shape[1]
    q, d = np.zeros(b, np.uint64), np.zeros(b, np.uint64)
    n, held = np.zeros((b, k), np.uint64), np.zeros(b, np.int64)
    for p, payload in enumerate(gather(_hash_payload(plan))):
        words = np.frombuffer(payload, dtype=np.uint64)
        if words[0]:
            raise RuntimeError(
                f"process {p} could not read its rows of batch {plan.step} (its log says why)"
            )
        m = int(words[1])
        rows, hashes = words[2 : 2 + m].astype(np.int64), words[2 + m :]
        q[rows], d[rows], n[rows] = hashes[:m], hashes[m : 2 * m], hashes[2 * m :].reshape(m, k)
        held[rows] += 1
    if (held != 1).any():
        raise RuntimeError(
            f"batch {plan.step}: rows {np.flatnonzero(held != 1)[:8]} are not held once"
        )
    ids = ids_from_hashes(q, d, n)
    return dataclasses.replace(
        plan, query_text_id=ids[0][plan.rows], doc_text_id=ids[1][plan.rows],
        neg_text_id=ids[2][plan.rows],
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The iterator training uses


def _negatives_per_source(sources: Sequence[Source], mixed: bool) -> dict[str, int]:
    """K per source; mixed batches hold every source, so K is the largest and the others' rows
    are padded with masked placeholder negatives."""
    ks = {s.name: s.num_negatives for s in sources}
    if mixed and len(set(ks.values())) > 1:
        logger.info("mixed batches: num_negatives %s -> %d for all", ks, max(ks.values()))
        ks = dict.fromkeys(ks, max(ks.values()))
    return ks


class PairBatchIterator:
    """Infinite iterator of process-local batch dicts over an α-mixture of sources.

    Args:
      sources: the sources (names must be unique).
      tokenizer: a Hugging Face fast tokenizer.
      global_batch_size: examples per global batch (per-source override: ``options.batch_size``).
      seed, alpha, mixed, weights: see :class:`~gte_jax.data.mixture.MixtureSampler`.
      query_max_length, doc_max_length: token budgets (special tokens and prefix included).
      layout: this process's rows of each global batch (:class:`BatchLayout`, read off the
        mesh); default ``BatchLayout.contiguous(process_index, process_count, pack_groups)``.
      process_index, process_count: without ``layout``, process p of P holds the p-th block.
      min_bucket, bucket_multiple: padded lengths are :func:`bucket_lengths` (powers of two, or
        multiples of ``bucket_multiple`` when > 0).
      packing: pack several texts per row (:func:`materialize_packed`) instead of one text per
        padded row; rows are at most ``query_max_length`` / ``doc_max_length`` long (see
        ``pack_row_length``).
      pack_row_multiple: with packing, each device's row count per role is rounded up to a
        multiple of this (larger: fewer shapes to compile).
      pack_row_length: with packing, tokens per packed row. None: the role's max length. 0: fitted
        to the data by :meth:`PairBatchIterator.prime_row_floor` (:func:`fit_row_length` of the
        longest primed text; the max length until then). k > 0: ``min(k, max length)``. A batch
        with a longer text switches the run to rows of the max lengths (one more shape).
      pack_groups: without ``layout``, the process's devices on the data axis; each packs its own
        examples.
      pack_chunks: the run's GradCache chunks (``batch_size / gradcache_chunk_size``); > 1 with
        packing gives the chunked packed layout (docs/design.md, "Packing with GradCache").
      agree_lengths: ``[n] int32 -> [n] int32`` max over processes (lengths, or row counts); default: identity for one
        process, :class:`HostAllGatherMax` otherwise.
      host_gather: ``bytes -> [bytes of every process]`` (:class:`HostAllGather`); default: one
        when there are several ``jax.distributed`` processes. With it, and rows of other
        processes in the batch, the iterator reads only its own rows' records and the text ids
        come from the exchanged hashes (:func:`exchange_text_ids`); without it every process
        reads the whole global batch. :meth:`stats` then exchanges once too (the bad records
        each process met), so every process must call it.
      include_prompt: the model's ``include_prompt``; False: prompt tokens (prefixes,
        instructions) are not pooled, by :mod:`gte_jax.prompts`' rule.
      mntp: MNTP masking (:mod:`gte_jax.data.mntp`): the query role's tokens are masked (a pure
        function of the seed, the step and each text's place in the global batch) and the batch
        gains ``query_labels`` (original ids at masked positions, -100 elsewhere), laid out like
        the tokens, padded or packed (not GradCache-chunked).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        tokenizer,
        *,
        global_batch_size: int,
        seed: int = 0,
        alpha: float = 0.5,
        query_max_length: int = 64,
        doc_max_length: int = 256,
        process_index: int = 0,
        process_count: int = 1,
        mixed: bool = False,
        weights: Sequence[float] | None = None,
        min_bucket: int = 16,
        bucket_multiple: int = 0,
        packing: bool = False,
        pack_row_multiple: int = 1,
        pack_row_length: int | None = None,
        pack_groups: int = 1,
        pack_chunks: int = 1,
        agree_lengths: Callable[[np.ndarray], np.ndarray] | None = None,
        include_prompt: bool = True,
        mntp: MntpMasking | None = None,
        layout: BatchLayout | None = None,
        host_gather: Callable[[bytes], list[bytes]] | None = None,
    ):
        self.sources = {s.name: s for s in sources}
        if len(self.sources) != len(sources):
            raise ValueError(f"source names must be unique: {[s.name for s in sources]}")
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Padded (not packed) rows pad on the tokenizer's side (gte_jax.prompts.configure_tokenizer).
        self.left_pad = getattr(tokenizer, "padding_side", "right") == "left"
        self.process_index, self.process_count = process_index, process_count
        if layout is None:
            layout = BatchLayout.contiguous(process_index, process_count, int(pack_groups))
        self.layout = layout
        self.query_max_length, self.doc_max_length = query_max_length, doc_max_length
        self.query_buckets = bucket_lengths(query_max_length, min_bucket, bucket_multiple)
        self.doc_buckets = bucket_lengths(doc_max_length, min_bucket, bucket_multiple)
        self.packing, self.pack_row_multiple = bool(packing), int(pack_row_multiple)
        self.pack_groups, self.pack_chunks = layout.groups, int(pack_chunks)
        if self.pack_row_multiple < 1:
            raise ValueError(f"pack_row_multiple must be >= 1, got {pack_row_multiple}")
        if mntp is not None and self.packing and self.pack_chunks > 1:
            raise ValueError(
                "MNTP labels need padded or one-chunk packed rows, not GradCache chunks"
            )
        self.mntp = mntp
        self.sampler = MixtureSampler(
            {s.name: len(s) for s in sources},
            global_batch_size,
            alpha=alpha,
            seed=seed,
            batch_sizes={s.name: s.options.batch_size for s in sources},
            mixed=mixed,
            weights=weights,
        )
        for bs in self.sampler.batch_sizes:
            layout.block_rows(bs)  # divisibility check
        self.num_negatives = _negatives_per_source(sources, mixed)
        # include_prompt=False: every batch carries pool masks without the prompt tokens (one key
        # set for every batch, or jit would retrace).
        self.prompt_lengths = None if include_prompt else PromptLengths(tokenizer)
        if self.prompt_lengths is not None:  # refuse a prompt that does not split exactly, now
            for s in sources:
                for query, doc in {("", ""), *(s.record_instructions or ())}:
                    self.prompt_lengths(s.options.query_prompt(query))
                    self.prompt_lengths(s.options.doc_prompt(doc))
        if agree_lengths is None:
            agree_lengths = HostAllGatherMax() if process_count > 1 else (lambda x: x)
        self.agree_lengths = agree_lengths
        self._init_exchanges(host_gather, process_count)
        # Packed rows per device and role only grow (saved with the sampler state, so a resumed
        # run packs as the uninterrupted one did): see prime_row_floor.
        self.row_floor: dict[str, int] = {}
        self._init_row_length(pack_row_length)
        # The sampler state of the last batch handed out (None: the sampler's own).
        self._consumed_sampler_state: dict[str, Any] | None = None

    def _init_exchanges(self, host_gather, process_count: int) -> None:
        """Own rows only when there are others' rows and a way to exchange text hashes. The
        bad-record counts of :meth:`stats` get an exchange object of their own: stats run on the
        loop's thread after the prefetch thread's batches, and each object's rounds must match
        over the processes."""
        if host_gather is None and process_count > 1:
            host_gather = HostAllGather.between_processes()
            self._stats_gather = HostAllGather.between_processes()
        else:
            self._stats_gather = host_gather
        self.reads_own_rows = (
            host_gather is not None and self.layout.groups < self.layout.num_blocks
        )
        self._host_gather = host_gather if self.reads_own_rows else None

    def _init_row_length(self, pack_row_length: int | None) -> None:
        """Tokens per packed row: "query" (queries) and "doc" (documents and negatives); saved
        with the state too. Only ever fitted at start-up or raised to the max lengths."""
        if pack_row_length is not None and int(pack_row_length) < 0:
            raise ValueError(f"pack_row_length must be >= 0 or None, got {pack_row_length}")
        # GradCache chunks (pack_chunks > 1) budget tokens in rows of the max lengths.
        self.fit_row_length = pack_row_length == 0 and self.pack_chunks == 1
        fixed = int(pack_row_length or 0) if self.pack_chunks == 1 else 0
        self.row_length = {
            role: min(fixed, n) if fixed else n for role, n in self._max_row_length().items()
        }

    def _max_row_length(self) -> dict[str, int]:
        return {"query": self.query_max_length, "doc": self.doc_max_length}

    def _role_row_lengths(self) -> dict[str, int]:
        """Row length per packed role (negatives are documents), keyed as the row floors."""
        return {**self.row_length, "neg": self.row_length["doc"]}

    def prime_row_floor(self, num_batches: int, run_batches: int | None = None) -> dict[str, int]:
        """Sets the packed row counts (and, with ``pack_row_length=0``, the row lengths) from the
        first ``num_batches`` batches' lengths (drawn from a copy of the sampler: nothing is
        consumed), so that a run compiles one train-step program instead of one per new row
        count. Same on every process (all-gathers). ``run_batches``: the batches the run draws;
        when no more than ``num_batches``, only those are primed, and the rows fitted to them
        need no headroom."""
        whole_run = run_batches is not None and 0 < run_batches <= num_batches
        if whole_run:
            num_batches = int(run_batches)
        if not self.packing or self.pack_chunks > 1 or num_batches <= 0:
            return self.row_floor
        sampler = copy.deepcopy(self.sampler)
        toks = []
        for _ in range(num_batches):
            step = sampler.step
            plan = self._plan(step, sampler.next())
            toks.append(
                tokenize_slice(
                    plan,
                    self.tokenizer,
                    self.layout.rows(plan.size),
                    query_max_length=self.query_max_length,
                    doc_max_length=self.doc_max_length,
                )  # fmt: skip
            )
        # The longest primed texts, the same on every process.
        longest = self.agree_lengths(np.max([t.max_lengths() for t in toks], axis=0))
        if not self.fit_row_length and (
            longest[0] > self.row_length["query"] or longest[1] > self.row_length["doc"]
        ):
            self._rows_to_max_lengths(None, longest)
        if self.fit_row_length:  # rows as long as the primed texts need
            self.row_length = {
                "query": fit_row_length(longest[0], self.query_max_length, not whole_run),
                "doc": fit_row_length(longest[1], self.doc_max_length, not whole_run),
            }
            logger.info(
                "packed rows: %d query / %d doc tokens (longest of %s: %d / %d; max lengths "
                "%d / %d)", self.row_length["query"], self.row_length["doc"],
                f"the run's {num_batches} batches" if whole_run else
                f"{num_batches} primed batches, plus an eighth",
                longest[0], longest[1], self.query_max_length, self.doc_max_length,
            )  # fmt: skip
        lengths = self._role_row_lengths()
        needed: dict[str, int] = {}
        for tok in toks:
            for key, n in packed_rows_needed(tok, lengths, self.pack_groups).items():
                needed[key] = max(needed.get(key, 0), n)
        keys = sorted(needed)  # the same keys on every process: the plans are global
        agreed = self.agree_lengths(np.asarray([needed[k] for k in keys], np.int32))
        for key, n in zip(keys, agreed, strict=True):
            self.row_floor[key] = max(
                self.row_floor.get(key, 0), round_up(int(n), self.pack_row_multiple)
            )
        return self.row_floor

    def __iter__(self) -> PairBatchIterator:
        return self

    def next_plan(self) -> GlobalBatchPlan:
        """Advances the sampler and reads the next global batch's texts: all of them, or this
        process's rows only (:attr:`reads_own_rows`), with text ids over the global batch."""
        self._consumed_sampler_state = None  # the state is the sampler's again
        return self._next_plan()

    def _next_plan(self) -> GlobalBatchPlan:
        step = self.sampler.step
        return self._plan(step, self.sampler.next())

    def _plan(self, step: int, drawn: Sequence[tuple[str, int]]) -> GlobalBatchPlan:
        """The plan of ``drawn``; with own rows only, one exchange, also when the read fails."""
        k = self.num_negatives[drawn[0][0]]
        if self._host_gather is None:
            return make_plan(step, drawn, self.sources, k)
        try:
            plan = make_plan(step, drawn, self.sources, k, self.layout.rows(len(drawn)))
        except Exception:
            self._host_gather(_READ_FAILED)  # the others stop too, not at a barrier's timeout
            raise
        return exchange_text_ids(plan, self._host_gather)

    def materialize(self, plan: GlobalBatchPlan) -> dict[str, np.ndarray]:
        """Tokenises this process's rows of ``plan`` and pads it to the agreed buckets."""
        return self.finish(self._tokenized(plan, None))

    def _tokenized(self, plan: GlobalBatchPlan, sampler_state: Any) -> Prepared:
        rows = self.layout.rows(plan.size)
        tok = tokenize_slice(
            plan,
            self.tokenizer,
            rows,
            query_max_length=self.query_max_length,
            doc_max_length=self.doc_max_length,
            prompt_lengths=self.prompt_lengths,
        )
        labels = None
        if self.mntp is not None:
            tok.query_ids, labels = self.mntp(tok.query_ids, step=plan.step, examples=rows)
        return Prepared(plan, tok, labels, sampler_state)

    def prepare(self) -> Prepared:
        """The host-only half of :meth:`__next__`: draws the next global batch, reads its texts
        and tokenises this process's rows (no JAX call, no exchange between processes: safe in
        a prefetch thread, :mod:`gte_jax.data.prefetch`). Carries the sampler state right after
        the draw, which becomes the iterator's state when :meth:`finish` hands the batch out."""
        plan = self._next_plan()
        return self._tokenized(plan, self.sampler.get_state())

    def finish(self, prepared: Prepared) -> dict[str, np.ndarray]:
        """The other half: the lengths agreed across processes, rows padded or packed."""
        if prepared.sampler_state is not None:
            self._consumed_sampler_state = prepared.sampler_state
        if prepared.labels is None:
            return self._layout(prepared.plan, prepared.tok)
        batch = self._layout(prepared.plan, prepared.tok)
        batch["query_labels"] = label_rows(batch, prepared.labels, "query", self.layout)
        return batch

    def _layout(self, plan: GlobalBatchPlan, tok: TokenizedSlice) -> dict[str, np.ndarray]:
        """The tokenised slice packed into rows or padded to the agreed buckets."""
        if self.packing:
            try:
                return self._packed(plan, tok)
            except RowOverflow as e:  # rows of the max lengths from now on (one more shape)
                self._rows_to_max_lengths(plan.step, e.longest)
                return self._packed(plan, tok)
        lq, ld = (int(x) for x in self.agree_lengths(tok.max_lengths()))
        return materialize(
            plan,
            tok,
            query_length=pick_bucket(lq, self.query_buckets),
            doc_length=pick_bucket(ld, self.doc_buckets),
            pad_id=self.pad_id,
            num_negatives=len(plan.negatives[0]),
            left_pad=self.left_pad,
        )

    def _rows_to_max_lengths(self, step: int | None, longest: np.ndarray) -> None:
        """Packed rows become the roles' max lengths; each row floor keeps the tokens it had
        (rows x length), so the longer rows need no more rows than the primed ones did.
        ``step``: the batch that needed it (None: a primed batch)."""
        old = self._role_row_lengths()
        self.row_length = self._max_row_length()
        new = self._role_row_lengths()
        for key, n in self.row_floor.items():
            role = key.split("/")[0]
            self.row_floor[key] = round_up(-(-n * old[role] // new[role]), self.pack_row_multiple)
        logger.warning(
            "%s holds a text longer than the packed rows (%d query / %d doc tokens; longest "
            "here: %d / %d): rows of the max lengths (%d / %d) from now on, one more train-step "
            "program (a larger data.packing_row_length avoids it)",
            "a primed batch" if step is None else f"batch {step}", old["query"], old["doc"],
            int(longest[0]), int(longest[1]), self.row_length["query"], self.row_length["doc"],
        )  # fmt: skip

    def _packed(self, plan: GlobalBatchPlan, tok: TokenizedSlice) -> dict[str, np.ndarray]:
        return materialize_packed(
            plan,
            tok,
            query_length=self.row_length["query"],
            doc_length=self.row_length["doc"],
            pad_id=self.pad_id,
            num_negatives=len(plan.negatives[0]),
            row_multiple=self.pack_row_multiple,
            layout=self.layout,
            agree_rows=self.agree_lengths,
            chunks=self.pack_chunks,
            row_floor=self.row_floor,
        )

    def __next__(self) -> dict[str, np.ndarray]:
        return self.finish(self.prepare())

    def get_state(self) -> dict[str, Any]:
        """The state right after the last batch handed out by :meth:`finish` (with a prefetch
        thread, the sampler itself may have drawn further)."""
        return {
            "sampler": self._sampler_state(),
            "row_floor": dict(self.row_floor),
            "row_length": dict(self.row_length),
        }

    def close(self) -> None:
        """Nothing to release (a :class:`~gte_jax.data.prefetch.Prefetcher` stops its thread)."""

    def _sampler_state(self) -> dict[str, Any]:
        if self._consumed_sampler_state is not None:
            return copy.deepcopy(self._consumed_sampler_state)
        return self.sampler.get_state()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.sampler.set_state(state["sampler"])
        self._consumed_sampler_state = None
        # A state saved before row floors existed: keep the primed ones.
        self.row_floor = {**self.row_floor, **dict(state.get("row_floor") or {})}
        if state.get("row_length"):
            self.row_length = {k: int(v) for k, v in state["row_length"].items()}
        elif state.get("row_floor"):  # saved before row lengths were fitted: the max lengths
            self.row_length = self._max_row_length()

    def stats(self, sampler_state: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """Per source: size, read / used / skipped (+ reasons), drawn batches and examples
        (``sampler_state``: as of that state, default the iterator's)."""
        st = (sampler_state or self._sampler_state())["sources"]
        self._merge_found_bad()
        return {
            name: {
                **src.stats(),
                "drawn_batches": st[name]["drawn_batches"],
                "drawn_examples": st[name]["drawn_examples"],
                "epoch": st[name]["epoch"],
            }
            for name, src in self.sources.items()
        }

    def _merge_found_bad(self) -> None:
        """With own rows only, each process met the bad records of its own rows (a TFDS source
        checks records when read); their union is what one process reading every row meets, so
        each process adds the others' (one exchange: every process calls :meth:`stats`)."""
        if not self.reads_own_rows or self._stats_gather is None:
            return
        local = {name: src.found_bad() for name, src in sorted(self.sources.items())}
        for payload in self._stats_gather(json.dumps(local).encode("utf-8")):
            for name, found in json.loads(payload).items():
                self.sources[name].merge_found_bad({int(i): r for i, r in found.items()})
