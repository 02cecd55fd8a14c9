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

import dataclasses
import functools
import logging
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gte_jax.encode import Embedder
from gte_jax.eval_data import BeirData, doc_text, read_beir, read_sts  # noqa: F401
from gte_jax.models.pooling import l2_normalize, truncate_embeddings
from gte_jax.prompts import instruction_template, resolve_template, side_prompt
from gte_jax.ranking import (  # noqa: F401
    DEFAULT_CUTOFFS,
    pearson,
    query_metrics,
    rankdata,
    retrieval_metrics,
    spearman,
)
from gte_jax.search import SIMILARITIES, search  # noqa: F401
from gte_jax.textio import InputError, iter_jsonl, jsonl_field  # noqa: F401

logger = logging.getLogger(__name__)
load_embedder = Embedder.from_pretrained  # a model directory, workdir or offline model name


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
    dims: Sequence[int] = (),
) -> dict[str, Any]:
    """Encode corpus and queries, search exactly, score against the qrels. ``dims``: also score
    each embedding prefix (Matryoshka) from the same encoding, truncated by the one rule of
    training, ``encode --dim`` and the export (:func:`truncate_embeddings`) -> ``by_dim``; a dim
    the embeddings do not have is a ValueError before anything is encoded."""
    width = embedder.truncate_dim or embedder.model.embedding_dim
    if any(not 1 <= int(d) <= width for d in dims):
        raise ValueError(f"dims {list(dims)}: each must be in [1, {width}] (the embedding's size)")
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
    score = functools.partial(
        _score, data=data, doc_ids=doc_ids, query_ids=query_ids, similarity=similarity,
        cutoffs=cutoffs, ignore_identical_ids=ignore_identical_ids, chunk_size=chunk_size,
    )  # fmt: skip
    out: dict[str, Any] = score(query_emb, doc_emb)
    t2 = time.perf_counter()
    if dims:
        norm = embedder.model.normalize
        out["by_dim"] = {
            int(d): score(truncate_embeddings(query_emb, d, normalize=norm),
                          truncate_embeddings(doc_emb, d, normalize=norm))
            for d in dims
        }  # fmt: skip
    out.update(num_docs=len(doc_ids), encode_seconds=t1 - t0, search_seconds=t2 - t1)
    return out


def _score(query_emb, doc_emb, *, data, doc_ids, query_ids, similarity, cutoffs,
           ignore_identical_ids, chunk_size) -> dict[str, float]:  # fmt: skip
    """Exact search of the embeddings -> the retrieval metrics against ``data``'s qrels."""
    depth = max(k for ks in cutoffs.values() for k in ks)
    _, indices = search(
        query_emb,
        doc_emb,
        k=depth + int(ignore_identical_ids),
        chunk_size=chunk_size,
        similarity=similarity,
    )
    ranking = {}
    for qid, row in zip(query_ids, indices, strict=True):
        ranked = [doc_ids[i] for i in row]
        if ignore_identical_ids:
            ranked = [d for d in ranked if d != qid]
        ranking[qid] = ranked[:depth]
    return retrieval_metrics(ranking, data.qrels, cutoffs)


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
    e1, e2 = l2_normalize(e1.astype(np.float64)), l2_normalize(e2.astype(np.float64))
    cosine = np.sum(e1 * e2, axis=1)
    return {
        "spearman": spearman(cosine, scores),
        "pearson": pearson(cosine, scores),
        "num_pairs": len(scores),
        "encode_seconds": time.perf_counter() - t0,
    }


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
    query_instruction: str = ""  # tasks, through the model's template (:meth:`prefixes`)
    doc_instruction: str = ""
    instruction_template: str | None = None  # None: the model's (gte_jax.prompts)

    @classmethod
    def from_config(cls, entry: Any) -> EvalSet:
        """From a config dict; ``query_instruction`` / ``doc_instruction`` (tasks) become the
        prefixes as for a training source (:func:`gte_jax.prompts.side_prompt`), through the
        template the model was trained with unless ``instruction_template`` names it."""
        d = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)
        for side in ("query", "doc"):
            if d.get(f"{side}_instruction") and d.get(f"{side}_prefix"):
                raise ValueError(
                    f"eval set {d.get('name', d)!r}: set {side}_prefix or {side}_instruction"
                )
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
        if d.get("instruction_template") is not None:
            instruction_template(d["instruction_template"])  # a bad template fails at start-up
        return cls(**d)

    def prefixes(self, embedder: Embedder) -> tuple[str, str]:
        """(query prefix, document prefix) for ``embedder``'s model: instructions through
        ``Embedder.instruction_template`` (the rule of encode, eval, mine and the MTEB adapter)."""
        template = self.instruction_template
        if self.query_instruction or self.doc_instruction:
            template = embedder.instruction_template(template)
        return (
            side_prompt(self.query_prefix, template or "plain", self.query_instruction),
            side_prompt(self.doc_prefix, template or "plain", self.doc_instruction),
        )


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

    def check_templates(self, instruction_templates: Sequence[str]) -> None:
        """Raises ValueError now (at start-up) for a set whose instructions a model trained with
        ``instruction_templates`` would refuse at its first evaluation."""
        for s in self.sets:
            if s.query_instruction or s.doc_instruction:
                try:
                    resolve_template(instruction_templates, s.instruction_template)
                except ValueError as e:
                    raise ValueError(f"eval set {s.name!r}: {e}") from None

    def __call__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        include_prompt: bool = True,
        instruction_templates: Sequence[str] = (),
        mesh: Any = None,
    ) -> dict[str, float]:
        """``mesh``: the model's parameters are arrays sharded on it (in-training eval), used as
        they are; batches are split over its "data" axis (``Embedder``)."""
        return self.evaluate_embedder(
            Embedder(
                model,
                tokenizer,
                max_length=self.max_length,
                include_prompt=include_prompt,
                instruction_templates=instruction_templates,
                mesh=mesh,
            )
        )

    def evaluate_embedder(self, embedder: Embedder) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for s in self.sets:
            data = self._data[s.name]
            query_prefix, doc_prefix = s.prefixes(embedder)
            if s.kind == "beir":
                result = evaluate_beir(
                    embedder,
                    data,
                    prefix_query=query_prefix,
                    prefix_doc=doc_prefix,
                    batch_size=self.batch_size,
                )
                keys = [k for k in result if "@" in k]
            else:
                result = evaluate_sts(
                    embedder, *data, prefix=query_prefix, batch_size=self.batch_size
                )
                keys = ["spearman", "pearson"]
            metrics.update({f"{s.name}/{k}": float(result[k]) for k in keys})
        return metrics
