"""`gte-jax eval`: a model on a BEIR-format retrieval set or an STS JSONL file; one JSON line."""

from __future__ import annotations

import argparse
import json

from gte_jax.commands.common import (
    USER_ERRORS,
    add_encoding_arguments,
    apply_dim,
    error,
    side_prefixes,
)
from gte_jax.evaluation import evaluate, load_embedder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gte-jax eval",
        description="Evaluate a model on a BEIR-format retrieval set or an STS JSONL file; "
        "prints one JSON object.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="HF / sentence-transformers directory, gte-jax workdir, or all-MiniLM-L6-v2",
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
        embedder = load_embedder(args.model)
        apply_dim(args, embedder)
        query_prefix, doc_prefix = side_prefixes(args, embedder)
        result = evaluate(
            embedder,
            beir_dir=args.beir,
            sts_file=args.sts,
            prefix_query=query_prefix,
            prefix_doc=doc_prefix,
            split=args.split,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    except USER_ERRORS as e:
        return error("gte-jax eval", e)
    line = {"model": str(args.model), **(result.get("beir") or result.get("sts"))}
    line["task"] = str(args.beir or args.sts)
    print(json.dumps(line))
    return 0
