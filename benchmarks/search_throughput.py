"""Exact top-k search (``gte_jax.evaluation.search``): queries/s on a random corpus, JAX chunked
scan vs a NumPy full sort (``argpartition`` + sort of the top k), same float32 embeddings.

    python3 benchmarks/search_throughput.py [--docs 200000] [--dim 384] [--queries 1024] [--k 100]
        [--chunk_size 65536]

The first JAX call (compile included) is reported apart from a warm call. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--chunk_size", type=int, default=65536)
    args = p.parse_args()

    import jax
    import numpy as np

    from gte_jax.evaluation import search

    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(args.docs, args.dim)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = rng.normal(size=(args.queries, args.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    corpus_dev = jax.device_put(corpus)

    def run():
        return search(queries, corpus_dev, k=args.k, chunk_size=args.chunk_size)

    t0 = time.perf_counter()
    run()
    t1 = time.perf_counter()
    _, idx = run()
    t2 = time.perf_counter()
    scores = queries @ corpus.T  # [Q, N]
    part = np.argpartition(-scores, args.k, axis=1)[:, : args.k]
    ref = np.take_along_axis(part, np.argsort(-np.take_along_axis(scores, part, 1), 1), 1)
    t3 = time.perf_counter()
    print(
        json.dumps(
            {
                "benchmark": "search_throughput",
                "docs": args.docs,
                "dim": args.dim,
                "queries": args.queries,
                "k": args.k,
                "chunk_size": args.chunk_size,
                "jax_first_call_seconds": round(t1 - t0, 3),
                "jax_warm_seconds": round(t2 - t1, 3),
                "jax_queries_per_second": round(args.queries / (t2 - t1), 1),
                "numpy_full_sort_seconds": round(t3 - t2, 3),
                "same_top1": float((idx[:, 0] == ref[:, 0]).mean()),
                "backend": jax.default_backend(),
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
