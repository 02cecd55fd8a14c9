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

Only the ``candidates`` best corpus texts are considered per query (default ``skip_top + 4 *
num_negatives + 8``), so a pair can end with fewer than ``num_negatives``: it is written with what
it has (the data pipeline cycles a record's negatives up to K), and dropped only when it has none.
Identical corpus texts are searched once.
"""

from __future__ import annotations

import argparse
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


def mine_hard_negatives(
    embedder: Embedder,
    pairs: Sequence[tuple[str, str]],
    corpus: Sequence[str],
    *,
    num_negatives: int,
    skip_top: int = 0,
    max_similarity: float = 0.95,
    candidates: int | None = None,
    query_prefix: str = "",
    doc_prefix: str = "",
    batch_size: int = 64,
    max_length: int | None = None,
) -> list[list[str]]:
    """The negatives of each pair (rules in the module docstring), best first."""
    if num_negatives < 1 or skip_top < 0:
        raise ValueError("num_negatives must be >= 1 and skip_top >= 0.")
    corpus = list(dict.fromkeys(corpus))
    depth = min(candidates or skip_top + 4 * num_negatives + 8, len(corpus))
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
    scores, indices = search(
        query_emb, corpus_emb, k=min(depth + most_removed, len(corpus)), similarity="cosine"
    )
    row_of = {q: i for i, q in enumerate(queries)}

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    positive_sim = np.sum(
        unit(query_emb[[row_of[q] for q, _ in pairs]]) * unit(positive_emb), axis=-1
    )  # [num_pairs]
    out = []
    for (query, _), pos_sim in zip(pairs, positive_sim, strict=True):
        row = row_of[query]
        excluded = positives_of[query] | {query}
        ranked = [
            (corpus[i], s)
            for i, s in zip(indices[row], scores[row], strict=True)
            if corpus[i] not in excluded
        ][:depth]
        limit = max_similarity * float(pos_sim)
        negatives = [text for text, s in ranked[skip_top:] if s <= limit]
        out.append(negatives[:num_negatives])
    return out


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
        help="drop candidates with sim(q, c) > x * sim(q, positive) (default 0.95)",
    )
    parser.add_argument(
        "--candidates", type=int, default=None, help="default: skip_top + 4 * K + 8"
    )
    add_encoding_arguments(parser, batch_size=64, prefixes=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def fail(message: Any) -> int:
        print(f"gte-jax mine: error: {message}", file=sys.stderr)
        return 2

    if args.num_negatives < 1 or args.skip_top < 0 or args.batch_size < 1:
        return fail("--num-negatives and --batch-size must be >= 1, --skip-top >= 0.")
    output = pathlib.Path(args.output)
    if not output.parent.is_dir():
        return fail(f"{output.parent} does not exist.")
    try:
        pairs = read_pairs(args.pairs)
        corpus = read_corpus_texts(args.corpus)
        embedder = load_embedder(args.model)
    except (InputError, FileNotFoundError, ValueError) as e:
        return fail(e)
    negatives = mine_hard_negatives(
        embedder,
        pairs,
        corpus,
        num_negatives=args.num_negatives,
        skip_top=args.skip_top,
        max_similarity=args.max_similarity,
        candidates=args.candidates,
        query_prefix=args.query_prefix,
        doc_prefix=args.doc_prefix,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    written = fewer = 0
    with output.open("w", encoding="utf-8") as f:
        for (query, positive), negs in zip(pairs, negatives, strict=True):
            fewer += len(negs) < args.num_negatives
            if not negs:
                continue
            record = {"query": query, "positive": positive, "negatives": negs}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
    summary = {
        "pairs_read": len(pairs),
        "pairs_written": written,
        "pairs_with_fewer_than_k": fewer,
        "pairs_dropped_no_negatives": len(pairs) - written,
        "corpus_texts": len(corpus),
        "output": str(output),
    }
    print(json.dumps(summary), file=sys.stderr)
    return 0
