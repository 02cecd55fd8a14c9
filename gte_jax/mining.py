"""Hard-negative mining for stage-2 fine-tuning: the ``gte-jax mine`` command.

For each (query, positive) pair the corpus is searched exactly (``evaluation.search``, cosine) and
the negatives are taken from the ranked candidates by these rules, in this order:

1. drop every candidate whose text is identical to the query or to *any* positive paired with that
   query in the pairs file (a corpus usually contains the positives; they are not negatives);
2. skip the ``skip_top`` best remaining candidates (the ranks most likely to be unlabelled
   positives);
3. false-negative guard: drop a candidate when ``sim(query, cand) > max_similarity * sim(query,
   positive)`` — sentence-transformers' ``mine_hard_negatives(relative_margin=m)`` keeps
   ``sim(q, neg) <= sim(q, pos) * (1 - m)``, so ``max_similarity = 1 - m``; the default 0.95 is
   NV-Retriever's "TopK-PercPos" (Moreira et al., 2024);
4. keep the first ``num_negatives`` of what is left, best first.

Where they are taken from, in this order, until a pair has K (``num_negatives``):

- ``"mined"``: ranks ``skip_top + 1 .. candidates`` (default 100; FlagEmbedding samples its
  negatives from ranks 10–100 by default, 2–200 in its examples);
- ``"deeper"``: ranks ``candidates + 1 .. fallback_depth`` (default 1000), same rules: for a query
  the model still ranks badly, ``sim(q, positive)`` is low and the guard rejects every top
  candidate, yet lower ranks pass it;
- ``"random"``: texts drawn uniformly (seeded per pair) from the corpus beyond ``fallback_depth``
  (never one the guard rejected; the guard is not applied to them), as FlagEmbedding falls back
  to random corpus negatives.

No pair is ever dropped: one that still has fewer than K (a small corpus) is written with the
negatives it has, possibly none; training masks the missing ones (``neg_valid``). Each output record
says where each negative came from (``negatives_source``, parallel to ``negatives``), and the
summary counts them. Identical corpus texts are searched once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from gte_jax.encode import Embedder
from gte_jax.eval_data import doc_text
from gte_jax.models.pooling import l2_normalize
from gte_jax.search import search
from gte_jax.textio import InputError, iter_jsonl, jsonl_field

logger = logging.getLogger(__name__)


def read_pairs(path: str | epath.Path) -> list[tuple[str, str]]:
    """JSONL with ``query`` and ``positive`` (other fields ignored) -> [(query, positive)]."""
    path = epath.Path(path)
    pairs = []
    for where, record in iter_jsonl(path):
        pairs.append((jsonl_field(record, "query", where), jsonl_field(record, "positive", where)))
    if not pairs:
        raise InputError(f"{path}: no pairs found.")
    return pairs


def read_corpus_texts(path: str | epath.Path) -> list[str]:
    """JSONL with ``text`` (optional ``_id``, ``title`` as in BEIR) -> unique texts, file order."""
    path = epath.Path(path)
    texts = {}
    for where, record in iter_jsonl(path):
        texts.setdefault(doc_text(record, where), None)
    if not texts:
        raise InputError(f"{path}: the corpus is empty.")
    return list(texts)


DEFAULT_CANDIDATES = 100  # ranks searched for "mined" negatives
DEFAULT_FALLBACK_DEPTH = 1000  # ranks searched for "deeper" ones
NEGATIVE_SOURCES = ("mined", "deeper", "random")


@dataclasses.dataclass
class MinedNegatives:
    """The negatives of one pair, best first, and where each came from (``NEGATIVE_SOURCES``)."""

    negatives: list[str]
    sources: list[str]
    # The mining model's cosine of the query with its positive and with each negative (parallel
    # to ``negatives``): teacher scores for distillation (gte_jax/objectives/distill.py).
    pos_score: float = float("nan")
    neg_scores: list[float] = dataclasses.field(default_factory=list)


def mine_negatives(
    embedder: Embedder,
    pairs: Sequence[tuple[str, str]],
    corpus: Sequence[str],
    *,
    num_negatives: int,
    skip_top: int = 0,
    max_similarity: float = 0.95,
    candidates: int | None = None,
    fallback_depth: int | None = None,
    seed: int = 0,
    query_prefix: str = "",
    doc_prefix: str = "",
    batch_size: int = 64,
    max_length: int | None = None,
) -> list[MinedNegatives]:
    """The negatives of each pair, one entry per pair (rules in the module docstring)."""
    if num_negatives < 1 or skip_top < 0:
        raise ValueError("num_negatives must be >= 1 and skip_top >= 0.")
    corpus = list(dict.fromkeys(corpus))
    n_corpus = len(corpus)
    depth = min(candidates or DEFAULT_CANDIDATES, n_corpus)
    deep = min(max(fallback_depth or DEFAULT_FALLBACK_DEPTH, depth), n_corpus)
    queries = list(dict.fromkeys(q for q, _ in pairs))
    positives_of: dict[str, set[str]] = {}
    for q, p in pairs:
        positives_of.setdefault(q, set()).add(p)

    def encode(texts, prefix):
        return embedder.encode(texts, batch_size=batch_size, max_length=max_length, prefix=prefix)

    query_emb = encode(queries, query_prefix)
    positive_emb = encode([p for _, p in pairs], doc_prefix)
    corpus_emb = encode(corpus, doc_prefix)
    # Extra depth for the candidates rule 1 removes (at most the query and its positives).
    most_removed = 1 + max(len(v) for v in positives_of.values())
    row_of = {q: i for i, q in enumerate(queries)}

    def ranked_lists(rows: list[int], k: int) -> dict[int, list[tuple[int, float]]]:
        """Query row -> [(corpus index, sim)] best first, rule 1 applied, at most ``k`` long."""
        if not rows:
            return {}
        scores, indices = search(
            query_emb[rows], corpus_emb, k=min(k + most_removed, n_corpus), similarity="cosine"
        )
        out = {}
        for r, idx, sc in zip(rows, indices, scores, strict=True):
            excluded = positives_of[queries[r]] | {queries[r]}
            out[r] = [(int(i), float(x)) for i, x in zip(idx, sc, strict=True)
                      if corpus[i] not in excluded][:k]  # fmt: skip
        return out

    query_unit = l2_normalize(query_emb[[row_of[q] for q, _ in pairs]])  # [num_pairs, D]
    positive_sim = np.sum(query_unit * l2_normalize(positive_emb), axis=-1)  # [num_pairs]
    limits = [max_similarity * float(s) for s in positive_sim]
    top = ranked_lists(list(range(len(queries))), depth)
    out = []
    for (query, _), limit in zip(pairs, limits, strict=True):
        negs = [corpus[i] for i, s in top[row_of[query]][skip_top:] if s <= limit]
        negs = negs[:num_negatives]
        out.append(MinedNegatives(negs, ["mined"] * len(negs)))

    # Deeper ranks, only for the queries of pairs still short of K.
    short = [p for p, m in enumerate(out) if len(m.negatives) < num_negatives]
    deeper = {}
    if deep > depth:
        deeper = ranked_lists(sorted({row_of[pairs[p][0]] for p in short}), deep)
    for p in short:
        ranked = deeper.get(row_of[pairs[p][0]], [])[max(depth, skip_top) :]
        _add(out[p], [corpus[i] for i, s in ranked if s <= limits[p]], num_negatives, "deeper")

    # Random corpus texts beyond the searched ranks.
    for p in short:
        query = pairs[p][0]
        searched = {i for i, _ in (deeper.get(row_of[query]) or top[row_of[query]])}
        _add_random(
            out[p], corpus, searched, positives_of[query] | {query}, num_negatives, [seed, p]
        )
    _set_scores(out, positive_sim, query_unit, l2_normalize(corpus_emb), corpus)
    return out


def _set_scores(out, positive_sim, query_unit, corpus_unit, corpus) -> None:
    """Each pair's cosine with its positive and with each chosen negative (the search's score)."""
    index_of = {text: i for i, text in enumerate(corpus)}
    for m, pos, q in zip(out, positive_sim, query_unit, strict=True):
        m.pos_score = float(pos)
        m.neg_scores = [float(corpus_unit[index_of[t]] @ q) for t in m.negatives]


def _add(m: MinedNegatives, texts: Sequence[str], k: int, source: str) -> None:
    """Tops ``m`` up to ``k`` negatives from ``texts`` (best first), labelled ``source``."""
    more = list(texts[: max(k - len(m.negatives), 0)])
    m.negatives.extend(more)
    m.sources.extend([source] * len(more))


def _add_random(
    m: MinedNegatives, corpus: Sequence[str], searched: set[int], excluded: set[str], k: int, seed
) -> None:
    """Tops ``m`` up to ``k`` negatives with random corpus texts outside ``searched``."""
    need = k - len(m.negatives)
    if need <= 0:
        return
    rng = np.random.default_rng(seed)
    picked = _random_indices(corpus, searched, excluded | set(m.negatives), need, rng)
    m.negatives += [corpus[i] for i in picked]
    m.sources += ["random"] * len(picked)


def _random_indices(
    corpus: Sequence[str], searched: set[int], excluded: set[str], need: int, rng
) -> list[int]:
    """Up to ``need`` random corpus indices outside ``searched`` whose text is not ``excluded``."""
    n_corpus = len(corpus)
    if n_corpus - len(searched) <= 4 * need + 64:  # few left: list them
        pool = [i for i in range(n_corpus) if i not in searched and corpus[i] not in excluded]
        return [int(i) for i in rng.permutation(pool)[:need]] if pool else []
    picked: list[int] = []  # a large corpus: draw and reject
    seen: set[int] = set()
    for _ in range(100 * need):
        i = int(rng.integers(n_corpus))
        if i in searched or i in seen or corpus[i] in excluded:
            continue
        seen.add(i)
        picked.append(i)
        if len(picked) == need:
            break
    return picked


def mine_hard_negatives(embedder: Embedder, pairs, corpus, **kwargs: Any) -> list[list[str]]:
    """The negatives of each pair (:func:`mine_negatives` without where they came from)."""
    return [m.negatives for m in mine_negatives(embedder, pairs, corpus, **kwargs)]
