"""Ranking and correlation metrics, as BEIR computes them with ``pytrec_eval`` (nDCG@k with linear
gains and a log2(rank + 1) discount, the ideal ranking from the qrels; MRR@k and Recall@k count a
document as relevant when its grade is > 0) and as MTEB computes STS (Spearman, Pearson)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_CUTOFFS = {"ndcg": (10,), "mrr": (10,), "recall": (1, 10, 100)}


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
