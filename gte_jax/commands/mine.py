"""`gte-jax mine`: hard negatives for (query, positive) pairs from a corpus (``gte_jax.mining``);
writes JSONL and a JSON summary on stderr. The flags are ``mining.MiningConfig``'s fields."""

from __future__ import annotations

import argparse
import dataclasses
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
    FILTERS,
    NEGATIVE_SOURCES,
    SAMPLINGS,
    MinedNegatives,
    MiningConfig,
    mine_negatives,
    read_corpus_texts,
    read_pairs,
    setting_problems,
)


def _optional_float(text: str) -> float | None:
    """argparse type of a filter threshold: a number, or ``none`` (the filter off)."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gte-jax mine",
        description="Mine hard negatives for (query, positive) pairs from a corpus; writes JSONL "
        '{"query", "positive", "negatives", "negatives_source"} and a JSON summary on stderr. '
        "Rules and sources: docs/mining.md.",
    )
    d = MiningConfig()
    parser.add_argument("--model", required=True, help="HF / sentence-transformers dir or workdir")
    parser.add_argument("--pairs", required=True, help='JSONL with "query" and "positive"')
    parser.add_argument("--corpus", required=True, help='JSONL with "text" (optional _id, title)')
    parser.add_argument("--output", required=True, help="JSONL to write")
    parser.add_argument("--num-negatives", type=int, required=True, help="negatives per pair (K)")
    parser.add_argument(
        "--skip-top",
        type=int,
        default=d.skip_top,
        help="the rank window [skip_top, candidates) "
        "skips the R best candidates (default %(default)s)",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        default=d.candidates,
        help="the rank window's end: ranks searched for mined negatives (default %(default)s)",
    )
    parser.add_argument(
        "--fallback-depth",
        type=int,
        default=d.fallback_depth,
        help="pairs still short of K search ranks candidates .. this next, then take random "
        "corpus texts beyond it (default %(default)s)",
    )
    parser.add_argument(
        "--sampling",
        choices=SAMPLINGS,
        default=d.sampling,
        help="the window's negatives: the best K, or K drawn at random (default %(default)s)",
    )
    parser.add_argument(
        "--perc-pos",
        "--max-similarity",
        dest="perc_pos",
        type=_optional_float,
        default=d.perc_pos,
        help="TopK-PercPos: drop sim(q, c) > x * sim(q, positive); none: off (default %(default)s)",
    )
    parser.add_argument(
        "--margin-pos",
        type=_optional_float,
        default=d.margin_pos,
        help="TopK-MarginPos: drop sim(q, c) > sim(q, positive) - x (default %(default)s: off)",
    )
    parser.add_argument(
        "--max-positive-similarity",
        type=_optional_float,
        default=d.max_positive_similarity,
        help="drop near-duplicates of a positive: cos(c, positive) > x (default %(default)s: off)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the random draws")
    parser.add_argument(
        "--teacher-scores",
        action="store_true",
        help='also write the model\'s cosine with the positive ("pos_score") and with each '
        'negative ("neg_scores"): teacher scores for loss.distill_weight',
    )
    add_encoding_arguments(parser, batch_size=64, prefixes=True)
    return parser


def _config(args: argparse.Namespace) -> MiningConfig:
    return MiningConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MiningConfig)})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def fail(message: Any) -> int:
        return error("gte-jax mine", message)

    config = _config(args)
    problems = setting_problems(config)
    if args.batch_size < 1:
        problems.append(f"--batch-size={args.batch_size}: must be >= 1")
    if problems:
        return fail("; ".join(problems))
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
        config,
        query_prefix=query_prefix,
        doc_prefix=doc_prefix,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    _write(output, pairs, mined, teacher_scores=args.teacher_scores)
    summary = {
        "pairs_read": len(pairs),
        "pairs_written": len(mined),  # every pair: none is dropped
        **_counts(mined, config.num_negatives),
        "candidates": config.candidates,
        "fallback_depth": config.fallback_depth,
        "corpus_texts": len(corpus),
        "settings": dataclasses.asdict(config),
        "output": str(output),
    }
    print(json.dumps(summary), file=sys.stderr)
    return 0


def _write(
    output: pathlib.Path, pairs, mined: list[MinedNegatives], *, teacher_scores: bool
) -> None:
    with output.open("w", encoding="utf-8") as f:
        for (query, positive), m in zip(pairs, mined, strict=True):
            record = {
                "query": query,
                "positive": positive,
                "negatives": m.negatives,
                "negatives_source": m.sources,
            }
            if teacher_scores:
                record["pos_score"] = m.pos_score
                record["neg_scores"] = m.neg_scores
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _counts(mined: list[MinedNegatives], k: int) -> dict[str, Any]:
    """The summary's counts: negatives by source, candidates by the filter that dropped them
    (``unused``: passed every filter, not taken), pairs short of K."""
    by_source = dict.fromkeys(NEGATIVE_SOURCES, 0)
    dropped = dict.fromkeys(FILTERS, 0)
    unused = 0
    for m in mined:
        for s in m.sources:
            by_source[s] += 1
        for name, count in m.dropped.items():
            dropped[name] += count
        unused += m.unused
    searched = by_source["mined"] + by_source["deeper"]
    return {
        "negatives_by_source": by_source,
        "pairs_with_fallback_negatives": sum(any(s != "mined" for s in m.sources) for m in mined),
        "pairs_with_fewer_than_k": sum(len(m.negatives) < k for m in mined),
        "pairs_without_negatives": sum(not m.negatives for m in mined),
        "candidates_examined": sum(dropped.values()) + searched + unused,
        "candidates_dropped_by": dropped,
        "candidates_passed_unused": unused,
    }
