"""`gte-jax mine`: hard negatives for (query, positive) pairs from a corpus (``gte_jax.mining``);
writes JSONL and a JSON summary on stderr."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

from gte_jax.commands.common import (
    USER_ERRORS,
    add_encoding_arguments,
    apply_dim,
    error,
    side_prefixes,
)
from gte_jax.encode import Embedder
from gte_jax.mining import (
    DEFAULT_CANDIDATES,
    DEFAULT_FALLBACK_DEPTH,
    NEGATIVE_SOURCES,
    mine_negatives,
    read_corpus_texts,
    read_pairs,
)


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
    parser.add_argument(
        "--teacher-scores",
        action="store_true",
        help='also write the model\'s cosine with the positive ("pos_score") and with each '
        'negative ("neg_scores"): teacher scores for loss.distill_weight',
    )
    add_encoding_arguments(parser, batch_size=64, prefixes=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def fail(message: Any) -> int:
        return error("gte-jax mine", message)

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
        embedder = Embedder.from_pretrained(args.model)
        apply_dim(args, embedder)
        query_prefix, doc_prefix = side_prefixes(args, embedder)
    except USER_ERRORS as e:
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
        query_prefix=query_prefix,
        doc_prefix=doc_prefix,
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
            if args.teacher_scores:
                record["pos_score"] = m.pos_score
                record["neg_scores"] = m.neg_scores
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
