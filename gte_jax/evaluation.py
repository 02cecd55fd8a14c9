"""Evaluation: exact retrieval search in JAX, BEIR-style retrieval metrics, STS correlations, the
``gte-jax eval`` command and ``EvalSuite``, the hook the training loop calls.

Retrieval follows BEIR (Thakur et al., 2021) as computed by ``pytrec_eval``: nDCG@k with linear
gains (the qrels grade) and a log2(rank + 1) discount, the ideal ranking from the qrels; MRR@k and
Recall@k count a document as relevant when its grade is > 0. Each metric is the mean over queries
with at least one relevant document; other queries are skipped and counted. Like BEIR's
``EvaluateRetrieval`` a document whose id equals the query id is not ranked (``ignore_identical_ids``,
for sets such as Quora or ArguAna where queries are also in the corpus).

STS: Spearman and Pearson correlation between the cosine of the two sentences' embeddings and the
gold score (MTEB's ``cosine_spearman`` / ``cosine_pearson``, here on a -1..1 scale).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import pathlib
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax import lax

from gte_jax.cli import add_encoding_arguments
from gte_jax.encode import Embedder, InputError

logger = logging.getLogger(__name__)

SIMILARITIES = ("cosine", "dot")
DEFAULT_CUTOFFS = {"ndcg": (10,), "mrr": (10,), "recall": (1, 10, 100)}


# ----------------------------------------------------------------------------- exact search


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


@functools.partial(jax.jit, static_argnames=("k", "chunk_size", "cosine"))
def _search_block(
    queries: jax.Array,  # [Qb, D]
    corpus: jax.Array,  # [N, D], any float dtype; never copied or padded
    *,
    k: int,
    chunk_size: int,
    cosine: bool,
) -> tuple[jax.Array, jax.Array]:
    n = corpus.shape[0]
    num_chunks = -(-n // chunk_size)
    q = queries.astype(jnp.float32)
    if cosine:
        q = _l2_normalize(q)
    chunk_k = min(k, chunk_size)

    def step(i, carry):
        best_scores, best_ids = carry  # [Qb, k] each
        # The last chunk is shifted back to end at N (no padded copy of the corpus); the columns it
        # shares with the previous chunk are masked so no document is counted twice.
        start = jnp.minimum(i * chunk_size, n - chunk_size)
        chunk = lax.dynamic_slice_in_dim(corpus, start, chunk_size, axis=0).astype(jnp.float32)
        if cosine:
            chunk = _l2_normalize(chunk)  # per chunk: the corpus is never normalised as a whole
        scores = jnp.dot(q, chunk.T, precision=lax.Precision.HIGHEST)  # [Qb, C]
        ids = start + jnp.arange(chunk_size, dtype=jnp.int32)  # [C]
        scores = jnp.where(ids[None, :] >= i * chunk_size, scores, -jnp.inf)
        top_scores, top_pos = lax.top_k(scores, chunk_k)  # [Qb, chunk_k]
        # Running best first: top_k prefers the lower position among equal scores, so ties go to
        # the lower document index, as a stable sort of the full score row would.
        merged_scores = jnp.concatenate([best_scores, top_scores], axis=1)
        merged_ids = jnp.concatenate([best_ids, ids[top_pos]], axis=1)
        best_scores, pos = lax.top_k(merged_scores, k)
        return best_scores, jnp.take_along_axis(merged_ids, pos, axis=1)

    init = (
        jnp.full((q.shape[0], k), -jnp.inf, jnp.float32),
        jnp.full((q.shape[0], k), -1, jnp.int32),
    )
    return lax.fori_loop(0, num_chunks, step, init)


def search(
    query_emb: np.ndarray | jax.Array,
    corpus_emb: np.ndarray | jax.Array,
    k: int = 100,
    chunk_size: int = 65536,
    *,
    similarity: str = "cosine",
    query_block_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` search -> (scores float32 [Q, k'], indices int64 [Q, k']), k' = min(k, N).

    Rows are sorted by descending score; equal scores are ordered by corpus index. The corpus is
    scanned in chunks of ``chunk_size`` rows, keeping a running top-k per query (``lax.top_k`` per
    chunk, then a top-k of the running best and the chunk's best), queries in blocks of
    ``query_block_size`` (the last block padded, so one shape compiles).

    Memory on the accelerator, N docs of dimension D, Qb = query_block_size, C = chunk_size:
    the corpus N·D·bytes (1M x 768: 3.1 GB float32, 1.5 GB bfloat16 — pass bfloat16 to halve it;
    scores are float32 either way) + the scores of one chunk Qb·C·4 (1024 x 65536: 268 MB) + one
    float32 chunk C·D·4 (65536 x 768: 201 MB) + the running top-k Qb·k·8 (< 1 MB). About 3.6 GB for
    a 1M-document float32 corpus: it fits on one 16 GB TPU core or GPU.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; use one of {SIMILARITIES}.")
    if query_emb.ndim != 2 or corpus_emb.ndim != 2 or query_emb.shape[1] != corpus_emb.shape[1]:
        raise ValueError(
            f"expected [Q, D] queries and [N, D] corpus, got {query_emb.shape} and "
            f"{corpus_emb.shape}."
        )
    if k < 1 or chunk_size < 1 or query_block_size < 1:
        raise ValueError("k, chunk_size and query_block_size must be >= 1.")
    num_queries, n = query_emb.shape[0], corpus_emb.shape[0]
    k = min(k, n)
    if num_queries == 0 or n == 0:
        return np.zeros((num_queries, k), np.float32), np.zeros((num_queries, k), np.int64)
    chunk_size = min(chunk_size, n)
    block = min(query_block_size, num_queries)
    corpus = jnp.asarray(corpus_emb)
    query_emb = np.asarray(query_emb, np.float32)
    scores = np.empty((num_queries, k), np.float32)
    indices = np.empty((num_queries, k), np.int64)
    for start in range(0, num_queries, block):
        q = query_emb[start : start + block]
        rows = q.shape[0]
        if rows < block:
            q = np.concatenate([q, np.zeros((block - rows, q.shape[1]), np.float32)])
        s, i = _search_block(
            jnp.asarray(q), corpus, k=k, chunk_size=chunk_size, cosine=similarity == "cosine"
        )
        scores[start : start + rows] = np.asarray(s)[:rows]
        indices[start : start + rows] = np.asarray(i)[:rows]
    return scores, indices


# ----------------------------------------------------------------------------- metrics


def _relevant(judged: Mapping[str, int]) -> dict[str, int]:
    return {doc: int(grade) for doc, grade in judged.items() if grade > 0}


def query_metrics(
    ranked: Sequence[str],
    judged: Mapping[str, int],
    cutoffs: Mapping[str, Sequence[int]] = DEFAULT_CUTOFFS,
) -> dict[str, float]:
    """The metrics of one query: ``ranked`` doc ids best first, ``judged`` doc id -> grade.

    Needs at least one grade > 0 (``retrieval_metrics`` skips queries without)."""
    relevant = _relevant(judged)
    if not relevant:
        raise ValueError("query_metrics needs at least one relevant (grade > 0) document.")
    gains = [relevant.get(doc, 0) for doc in ranked]
    ideal = sorted(relevant.values(), reverse=True)
    out = {}
    for k in cutoffs.get("ndcg", ()):
        dcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(gains[:k]))
        idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal[:k]))
        out[f"ndcg@{k}"] = dcg / idcg
    for k in cutoffs.get("mrr", ()):
        first = next((rank for rank, g in enumerate(gains[:k]) if g > 0), None)
        out[f"mrr@{k}"] = 0.0 if first is None else 1.0 / (first + 1)
    for k in cutoffs.get("recall", ()):
        out[f"recall@{k}"] = sum(g > 0 for g in gains[:k]) / len(relevant)
    return out


def retrieval_metrics(
    ranking: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    cutoffs: Mapping[str, Sequence[int]] = DEFAULT_CUTOFFS,
) -> dict[str, float]:
    """Mean metrics over the queries of ``qrels`` with a relevant document.

    ``ranking``: query id -> doc ids best first (a query absent from it scores 0);
    ``qrels``: query id -> {doc id: grade}. Adds ``num_queries`` (averaged over) and
    ``skipped_queries`` (in qrels, no grade > 0)."""
    per_query = []
    skipped = 0
    for qid, judged in qrels.items():
        if not _relevant(judged):
            skipped += 1
            continue
        per_query.append(query_metrics(ranking.get(qid, ()), judged, cutoffs))
    names = [f"{m}@{k}" for m in ("ndcg", "mrr", "recall") for k in cutoffs.get(m, ())]
    out: dict[str, float] = {
        name: float(np.mean([m[name] for m in per_query])) if per_query else float("nan")
        for name in names
    }
    out["num_queries"] = len(per_query)
    out["skipped_queries"] = skipped
    if skipped:
        logger.info("%d queries have no relevant document and were skipped", skipped)
    return out


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get the mean of their ranks (scipy.stats.rankdata's 'average')."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, groups, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(groups, weights=ranks) / counts)[groups]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation in float64; NaN when either side is constant."""
    x = np.asarray(x, np.float64) - np.mean(x)
    y = np.asarray(y, np.float64) - np.mean(y)
    denominator = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
    return float(np.dot(x, y) / denominator) if denominator > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation: Pearson of the (tie-averaged) ranks."""
    return pearson(rankdata(x), rankdata(y))


# ----------------------------------------------------------------------------- readers


def iter_jsonl(path: pathlib.Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; bad lines -> InputError naming file:line."""
    if not path.is_file():
        raise InputError(f"{path}: no such file.")
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{number}: not valid UTF-8 ({e.reason}).") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number}: invalid JSON ({e.msg}).") from e
            if not isinstance(record, dict):
                raise InputError(f"{path}:{number}: expected a JSON object.")
            yield number, record


def jsonl_field(record: Mapping[str, Any], key: str, where: str, kind: type | tuple = str) -> Any:
    if key not in record:
        raise InputError(f'{where}: missing field "{key}".')
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InputError(f'{where}: field "{key}" has type {type(value).__name__}.')
    return value


def doc_text(record: Mapping[str, Any], where: str) -> str:
    """BEIR / sentence-transformers: ``(title + " " + text).strip()`` when there is a title."""
    text = jsonl_field(record, "text", where)
    title = record.get("title") or ""
    if not isinstance(title, str):
        raise InputError(f'{where}: field "title" has type {type(title).__name__}.')
    return (title + " " + text).strip() if title else text


@dataclasses.dataclass
class BeirData:
    """A BEIR-format split: the corpus, the queries that have qrels, and the qrels."""

    corpus: dict[str, str]  # doc id -> title + " " + text
    queries: dict[str, str]  # query id -> text (only queries that appear in qrels)
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: grade}


def read_beir(directory: str | pathlib.Path, split: str = "test") -> BeirData:
    """Read ``corpus.jsonl`` (_id, title, text), ``queries.jsonl`` (_id, text) and
    ``qrels/<split>.tsv`` (tab-separated query-id, corpus-id, score; header line optional)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory; pass a BEIR-format dataset directory.")
    qrels_path = directory / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        found = sorted(p.stem for p in (directory / "qrels").glob("*.tsv"))
        raise InputError(
            f"{qrels_path}: no such file; splits found: {found or 'none'} (choose one with --split)."
        )
    qrels: dict[str, dict[str, int]] = {}
    qrels_line: dict[str, int] = {}
    with qrels_path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{qrels_path}:{number}: not valid UTF-8 ({e.reason}).") from e
            fields = line.rstrip("\r\n").split("\t")
            if number == 1 and fields[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue
            if not line.strip():
                continue
            where = f"{qrels_path}:{number}"
            if len(fields) != 3:
                raise InputError(
                    f"{where}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                    f"got {len(fields)}."
                )
            qid, did, score = (x.strip() for x in fields)
            try:
                grade = int(float(score))
            except ValueError:
                raise InputError(f"{where}: score {score!r} is not a number.") from None
            qrels.setdefault(qid, {})[did] = grade
            qrels_line.setdefault(qid, number)

    corpus_path = directory / "corpus.jsonl"
    corpus: dict[str, str] = {}
    for number, record in iter_jsonl(corpus_path):
        where = f"{corpus_path}:{number}"
        doc_id = str(jsonl_field(record, "_id", where, (str, int)))
        if doc_id in corpus:
            raise InputError(f"{where}: duplicate _id {doc_id!r}.")
        corpus[doc_id] = doc_text(record, where)

    queries_path = directory / "queries.jsonl"
    all_queries: dict[str, str] = {}
    for number, record in iter_jsonl(queries_path):
        where = f"{queries_path}:{number}"
        query_id = str(jsonl_field(record, "_id", where, (str, int)))
        if query_id in all_queries:
            raise InputError(f"{where}: duplicate _id {query_id!r}.")
        all_queries[query_id] = jsonl_field(record, "text", where)

    missing = [qid for qid in qrels if qid not in all_queries]
    if missing:
        raise InputError(
            f"{qrels_path}:{qrels_line[missing[0]]}: query {missing[0]!r} is not in "
            f"{queries_path} ({len(missing)} such queries)."
        )
    unknown_docs = {d for judged in qrels.values() for d in judged if d not in corpus}
    if unknown_docs:
        logger.warning(
            "%s: %d judged documents are not in the corpus (they still count as relevant)",
            qrels_path,
            len(unknown_docs),
        )
    return BeirData(corpus, {qid: all_queries[qid] for qid in qrels}, qrels)


def read_sts(path: str | pathlib.Path) -> tuple[list[str], list[str], np.ndarray]:
    """JSONL with ``sentence1``, ``sentence2``, ``score`` -> (sentences1, sentences2, scores)."""
    path = pathlib.Path(path)
    first, second, scores = [], [], []
    for number, record in iter_jsonl(path):
        where = f"{path}:{number}"
        first.append(jsonl_field(record, "sentence1", where))
        second.append(jsonl_field(record, "sentence2", where))
        scores.append(float(jsonl_field(record, "score", where, (int, float))))
    if len(scores) < 2:
        raise InputError(f"{path}: needs at least 2 sentence pairs, found {len(scores)}.")
    return first, second, np.asarray(scores, np.float64)


# ----------------------------------------------------------------------------- evaluating


def evaluate_beir(
    embedder: Embedder,
    data: BeirData,
    *,
    prefix_query: str = "",
    prefix_doc: str = "",
    batch_size: int = 64,
    max_length: int | None = None,
    similarity: str = "cosine",
    cutoffs: Mapping[str, Sequence[int]] = DEFAULT_CUTOFFS,
    ignore_identical_ids: bool = True,
    chunk_size: int = 65536,
) -> dict[str, float]:
    """Encode corpus and queries, search exactly, score against the qrels."""
    doc_ids = list(data.corpus)
    query_ids = list(data.queries)
    t0 = time.perf_counter()
    doc_emb = embedder.encode(
        [data.corpus[d] for d in doc_ids],
        batch_size=batch_size,
        max_length=max_length,
        prefix=prefix_doc,
    )
    query_emb = embedder.encode(
        [data.queries[q] for q in query_ids],
        batch_size=batch_size,
        max_length=max_length,
        prefix=prefix_query,
    )
    t1 = time.perf_counter()
    depth = max(k for ks in cutoffs.values() for k in ks)
    _, indices = search(
        query_emb,
        doc_emb,
        k=depth + int(ignore_identical_ids),
        chunk_size=chunk_size,
        similarity=similarity,
    )
    t2 = time.perf_counter()
    ranking = {}
    for qid, row in zip(query_ids, indices, strict=True):
        ranked = [doc_ids[i] for i in row]
        if ignore_identical_ids:
            ranked = [d for d in ranked if d != qid]
        ranking[qid] = ranked[:depth]
    out = retrieval_metrics(ranking, data.qrels, cutoffs)
    out.update(num_docs=len(doc_ids), encode_seconds=t1 - t0, search_seconds=t2 - t1)
    return out


def evaluate_sts(
    embedder: Embedder,
    sentences1: Sequence[str],
    sentences2: Sequence[str],
    scores: np.ndarray,
    *,
    prefix: str = "",
    batch_size: int = 64,
    max_length: int | None = None,
) -> dict[str, float]:
    """Spearman / Pearson of cos(e1, e2) against the gold scores."""
    t0 = time.perf_counter()
    e1 = embedder.encode(sentences1, batch_size=batch_size, max_length=max_length, prefix=prefix)
    e2 = embedder.encode(sentences2, batch_size=batch_size, max_length=max_length, prefix=prefix)
    e1 = e1.astype(np.float64) / np.maximum(np.linalg.norm(e1, axis=1, keepdims=True), 1e-12)
    e2 = e2.astype(np.float64) / np.maximum(np.linalg.norm(e2, axis=1, keepdims=True), 1e-12)
    cosine = np.sum(e1 * e2, axis=1)
    return {
        "spearman": spearman(cosine, scores),
        "pearson": pearson(cosine, scores),
        "num_pairs": len(scores),
        "encode_seconds": time.perf_counter() - t0,
    }


def load_embedder(path: str | pathlib.Path) -> Embedder:
    """An ``Embedder`` for an exported HF / sentence-transformers directory or a gte-jax workdir.

    A workdir (checkpoints/ + base_model/) is read from its ``export/`` when a finished stage wrote
    one; otherwise the newest checkpoint's parameters are loaded straight into ``base_model``'s
    architecture (``train.load_model_for_training``), nothing written to disk. Local or gs://."""
    path = epath.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; pass a model directory or a workdir.")
    if (path / "export" / "config.json").is_file():
        return Embedder.from_pretrained(path / "export")
    if (path / "checkpoints").exists() and (path / "base_model").exists():
        import ml_collections

        from gte_jax.train import TrainingError, load_model_for_training

        try:
            model, tokenizer, info = load_model_for_training(
                ml_collections.ConfigDict({"init_from": str(path)})
            )
        except TrainingError as e:
            raise ValueError(f"{path}: cannot load the workdir's checkpoint: {e}") from e
        return Embedder(
            model, tokenizer, max_length=info.max_seq_length, include_prompt=info.include_prompt
        )
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        stages = sorted(p.name for p in path.iterdir() if (p / "checkpoints").exists())
        hint = f" It holds the stage workdirs {stages}: pass one of them." if stages else ""
        raise FileNotFoundError(
            f"{path} is neither a model directory (config.json) nor a gte-jax workdir "
            f"(checkpoints/ + base_model/).{hint}"
        )
    return Embedder.from_pretrained(path)


def evaluate(
    model: str | pathlib.Path | Embedder,
    *,
    beir_dir: str | pathlib.Path | None = None,
    sts_file: str | pathlib.Path | None = None,
    prefix_query: str = "",
    prefix_doc: str = "",
    split: str = "test",
    batch_size: int = 64,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Evaluate a model (an ``Embedder``, a model directory or a workdir, see ``load_embedder``)
    -> ``{"beir": {...}, "sts": {...}}`` for the sets given. STS sentences get ``prefix_query``."""
    if beir_dir is None and sts_file is None:
        raise ValueError("nothing to evaluate: pass beir_dir and/or sts_file.")
    beir = read_beir(beir_dir, split) if beir_dir is not None else None
    sts = read_sts(sts_file) if sts_file is not None else None
    embedder = model if isinstance(model, Embedder) else load_embedder(model)
    out: dict[str, Any] = {}
    if beir is not None:
        out["beir"] = evaluate_beir(
            embedder,
            beir,
            prefix_query=prefix_query,
            prefix_doc=prefix_doc,
            batch_size=batch_size,
            max_length=max_length,
        )
    if sts is not None:
        out["sts"] = evaluate_sts(
            embedder, *sts, prefix=prefix_query, batch_size=batch_size, max_length=max_length
        )
    return out


# ----------------------------------------------------------------------------- training hook


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """One evaluation set of a training config."""

    name: str
    kind: str  # "beir" | "sts"
    path: str  # BEIR directory or STS .jsonl
    query_prefix: str = ""  # STS sentences get this one
    doc_prefix: str = ""
    split: str = "test"  # BEIR qrels split

    @classmethod
    def from_config(cls, entry: Any) -> EvalSet:
        d = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(
                f"eval set {d.get('name', d)!r}: unknown keys {unknown}; use {fields}."
            )
        missing = sorted({"name", "kind", "path"} - set(d))
        if missing:
            raise ValueError(f"eval set {d!r}: missing keys {missing}.")
        if d["kind"] not in ("beir", "sts"):
            raise ValueError(f"eval set {d['name']!r}: kind must be 'beir' or 'sts'.")
        return cls(**d)


class EvalSuite:
    """Evaluation sets read once (bad paths fail before training starts), run on a model held in
    memory: ``suite(model, tokenizer) -> {"<name>/ndcg@10": ..., "<name>/spearman": ...}``.

        suite = EvalSuite(config.eval.sets)   # [{"name", "kind", "path", ...}, ...]
        metrics = suite(model_fn.module(state.params), tokenizer)

    Each call builds an ``Embedder`` around the given module (no reload, no export); dropout is off
    because the embedder passes no dropout key. Counts and timings are left out of the result."""

    def __init__(
        self,
        sets: Sequence[Any],
        *,
        batch_size: int = 64,
        max_length: int | None = None,
    ):
        self.sets = [EvalSet.from_config(s) for s in sets]
        names = [s.name for s in self.sets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval set names must be unique, got {names}.")
        self.batch_size = batch_size
        self.max_length = max_length
        self._data = {
            s.name: read_beir(s.path, s.split) if s.kind == "beir" else read_sts(s.path)
            for s in self.sets
        }

    def __call__(
        self, model: Any, tokenizer: Any, *, include_prompt: bool = True
    ) -> dict[str, float]:
        return self.evaluate_embedder(
            Embedder(model, tokenizer, max_length=self.max_length, include_prompt=include_prompt)
        )

    def evaluate_embedder(self, embedder: Embedder) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for s in self.sets:
            data = self._data[s.name]
            if s.kind == "beir":
                result = evaluate_beir(
                    embedder,
                    data,
                    prefix_query=s.query_prefix,
                    prefix_doc=s.doc_prefix,
                    batch_size=self.batch_size,
                )
                keys = [k for k in result if "@" in k]
            else:
                result = evaluate_sts(
                    embedder, *data, prefix=s.query_prefix, batch_size=self.batch_size
                )
                keys = ["spearman", "pearson"]
            metrics.update({f"{s.name}/{k}": float(result[k]) for k in keys})
        return metrics


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gte-jax eval",
        description="Evaluate a model on a BEIR-format retrieval set or an STS JSONL file; "
        "prints one JSON object.",
    )
    parser.add_argument(
        "--model", required=True, help="exported HF / sentence-transformers dir, or a workdir"
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--beir", help="directory with corpus.jsonl, queries.jsonl, qrels/<split>.tsv"
    )
    what.add_argument("--sts", help="JSONL with sentence1, sentence2, score")
    parser.add_argument("--split", default="test", help="qrels split (default: test)")
    add_encoding_arguments(parser, batch_size=64, prefixes=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = evaluate(
            args.model,
            beir_dir=args.beir,
            sts_file=args.sts,
            prefix_query=args.query_prefix,
            prefix_doc=args.doc_prefix,
            split=args.split,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"gte-jax eval: error: {e}", file=sys.stderr)
        return 2
    line = {"model": str(args.model), **(result.get("beir") or result.get("sts"))}
    line["task"] = str(args.beir or args.sts)
    print(json.dumps(line))
    return 0
