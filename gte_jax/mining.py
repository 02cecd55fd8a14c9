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

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from gte_jax.cli import add_encoding_arguments
from gte_jax.encode import Embedder, InputError
from gte_jax.evaluation import doc_text, iter_jsonl, jsonl_field, load_embedder, search

logger = logging.getLogger(__name__)


def read_pairs(path: str | pathlib.Path) -> list[tuple[str, str]]:
    """JSONL with ``query`` and ``positive`` (other fields ignored) -> [(query, positive)]."""
    path = pathlib.Path(path)
    pairs = []
    for number, record in iter_jsonl(path):
        where = f"{path}:{number}"
        pairs.append((jsonl_field(record, "query", where), jsonl_field(record, "positive", where)))
    if not pairs:
        raise InputError(f"{path}: no pairs found.")
    return pairs


def read_corpus_texts(path: str | pathlib.Path) -> list[str]:
    """JSONL with ``text`` (optional ``_id``, ``title`` as in BEIR) -> unique texts, file order."""
    path = pathlib.Path(path)
    texts = {}
    for number, record in iter_jsonl(path):
        texts.setdefault(doc_text(record, f"{path}:{number}"), None)
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

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    positive_sim = np.sum(
        unit(query_emb[[row_of[q] for q, _ in pairs]]) * unit(positive_emb), axis=-1
    )  # [num_pairs]
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
        row = row_of[pairs[p][0]]
        m = out[p]
        start = max(depth, skip_top)
        for i, s in deeper.get(row, [])[start:]:
            if len(m.negatives) == num_negatives:
                break
            if s <= limits[p]:
                m.negatives.append(corpus[i])
                m.sources.append("deeper")

    # Random corpus texts beyond the searched ranks.
    for p in short:
        m = out[p]
        need = num_negatives - len(m.negatives)
        if need <= 0:
            continue
        query = pairs[p][0]
        searched = {i for i, _ in (deeper.get(row_of[query]) or top[row_of[query]])}
        excluded = positives_of[query] | {query} | set(m.negatives)
        rng = np.random.default_rng([seed, p])
        picked: list[int] = []
        if n_corpus - len(searched) <= 4 * need + 64:  # few left: list them
            pool = [i for i in range(n_corpus) if i not in searched and corpus[i] not in excluded]
            picked = [int(i) for i in rng.permutation(pool)[:need]] if pool else []
        else:  # a large corpus: draw and reject
            seen: set[int] = set()
            for _ in range(100 * need):
                i = int(rng.integers(n_corpus))
                if i in searched or i in seen or corpus[i] in excluded:
                    continue
                seen.add(i)
                picked.append(i)
                if len(picked) == need:
                    break
        m.negatives += [corpus[i] for i in picked]
        m.sources += ["random"] * len(picked)
    return out


def mine_hard_negatives(embedder: Embedder, pairs, corpus, **kwargs: Any) -> list[list[str]]:
    """The negatives of each pair (:func:`mine_negatives` without where they came from)."""
    return [m.negatives for m in mine_negatives(embedder, pairs, corpus, **kwargs)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gte-jax mine",
        description="Mine hard negatives for (query, positive) pairs from a corpus; writes JSONL "
        '{"query", "positive", "negatives"} and a JSON summary on stderr.',
    )
    parser.add_argument("--model", required=True, help="HF / sentence-transformers dir or workdir")
    parser.add_argument("--pairs", required=True, help='JSONL with "query" and "positive"')
    parser.add_argument("--corpus", required=True, help='JSONL with "text" (optional _id, title)')
    parser.add_argument("--output", required=True, help="JSONL to write")
    parser.add_argument("--num-negatives", type=int, required=True, help="negatives per pair (K)")
    parser.add_argument("--skip-top", type=int, default=0, help="skip the R best candidates")
    parser.add_argument(
        "--max-similarity",
        type=float,
        default=0.95,
        help="drop candidates with sim(q, c) > x * sim(q, positive) (default %(default)s)",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        default=DEFAULT_CANDIDATES,
        help="ranks searched for mined negatives: skip_top+1 .. this (default %(default)s)",
    )
    parser.add_argument(
        "--fallback-depth",
        type=int,
        default=DEFAULT_FALLBACK_DEPTH,
        help="pairs still short of K search ranks candidates+1 .. this next, then take random "
        "corpus texts beyond it (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random fallback")
    add_encoding_arguments(parser, batch_size=64, prefixes=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def fail(message: Any) -> int:
        print(f"gte-jax mine: error: {message}", file=sys.stderr)
        return 2

    if args.num_negatives < 1 or args.skip_top < 0 or args.batch_size < 1:
        return fail("--num-negatives and --batch-size must be >= 1, --skip-top >= 0.")
    if args.candidates <= args.skip_top or args.fallback_depth < args.candidates:
        return fail("need --skip-top < --candidates <= --fallback-depth.")
    output = pathlib.Path(args.output)
    if not output.parent.is_dir():
        return fail(f"{output.parent} does not exist.")
    try:
        pairs = read_pairs(args.pairs)
        corpus = read_corpus_texts(args.corpus)
        embedder = load_embedder(args.model)
    except (InputError, FileNotFoundError, ValueError) as e:
        return fail(e)
    mined = mine_negatives(
        embedder,
        pairs,
        corpus,
        num_negatives=args.num_negatives,
        skip_top=args.skip_top,
        max_similarity=args.max_similarity,
        candidates=args.candidates,
        fallback_depth=args.fallback_depth,
        seed=args.seed,
        query_prefix=args.query_prefix,
        doc_prefix=args.doc_prefix,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    by_source = dict.fromkeys(NEGATIVE_SOURCES, 0)
    fewer = fallback = none = 0
    with output.open("w", encoding="utf-8") as f:
        for (query, positive), m in zip(pairs, mined, strict=True):
            fewer += len(m.negatives) < args.num_negatives
            none += not m.negatives
            fallback += any(s != "mined" for s in m.sources)
            for s in m.sources:
                by_source[s] += 1
            record = {
                "query": query,
                "positive": positive,
                "negatives": m.negatives,
                "negatives_source": m.sources,
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary = {
        "pairs_read": len(pairs),
        "pairs_written": len(mined),  # every pair: none is dropped
        "negatives_by_source": by_source,
        "pairs_with_fallback_negatives": fallback,
        "pairs_with_fewer_than_k": fewer,
        "pairs_without_negatives": none,
        "candidates": args.candidates,
        "fallback_depth": args.fallback_depth,
        "corpus_texts": len(corpus),
        "output": str(output),
    }
    print(json.dumps(summary), file=sys.stderr)
    return 0
