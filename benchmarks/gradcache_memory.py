"""GradCache vs plain autodiff: compiled peak memory and time per example as the batch grows.

    python3 benchmarks/gradcache_memory.py [--batches 256,512,1024,2048,4096] [--chunk_size 128]
        [--length 32] [--width 64] [--hidden 256] [--layers 2] [--no_time]

A small pure-JAX encoder (embedding + residual MLP blocks with dropout + masked mean pool + L2
norm) and the GTE loss with the whole batch in one partition function. Memory is XLA's own
account of the compiled train gradient (``compiled.memory_analysis()``): ``temp`` is the scratch
the program needs at its peak (activations live for the backward pass, loss logits), independent
of the device. Time is one warm step (forward + backward), per example. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="256,512,1024,2048,4096")
    p.add_argument("--chunk_size", type=int, default=128)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--no_time", action="store_true", help="memory only (compile, do not run)")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from gte_jax import gradcache

    def init(key):
        keys = jax.random.split(key, 1 + 2 * args.layers)
        params = {"embed": jax.random.normal(keys[0], (args.vocab, args.width)) * 0.02}
        for i in range(args.layers):
            params[f"up{i}"] = jax.random.normal(keys[1 + 2 * i], (args.width, args.hidden)) * 0.05
            params[f"down{i}"] = (
                jax.random.normal(keys[2 + 2 * i], (args.hidden, args.width)) * 0.05
            )
        return params

    def encode(params, inputs, rng):
        x = params["embed"][inputs["input_ids"]]  # [b, L, W]
        for i in range(args.layers):
            h = jax.nn.gelu(x @ params[f"up{i}"])  # [b, L, H]
            if rng is not None:
                keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 0.9, h.shape)
                h = jnp.where(keep, h / 0.9, 0.0)
            x = x + h @ params[f"down{i}"]  # [b, L, W]
        mask = inputs["attention_mask"].astype(jnp.float32)  # [b, L]
        pooled = jnp.einsum("blw,bl->bw", x, mask) / mask.sum(axis=1, keepdims=True)
        return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)  # [b, W]

    def make_batch(n):
        rs = np.random.RandomState(0)
        ids = lambda: rs.randint(1, args.vocab, size=(n, args.length)).astype(np.int32)  # noqa: E731
        mask = np.ones((n, args.length), np.int32)
        return {
            "query_input_ids": ids(),
            "query_attention_mask": mask,
            "doc_input_ids": ids(),
            "doc_attention_mask": mask,
        }

    loss_fn = gradcache.make_loss_fn("gte")
    params = init(jax.random.key(0))
    rng = jax.random.key(1, impl="rbg")
    results = []
    for n in [int(b) for b in args.batches.split(",")]:
        batch = make_batch(n)
        row = {"batch": n}
        for name in ("plain", "gradcache"):
            num_chunks = max(1, n // args.chunk_size)
            fn = gradcache.cached_value_and_grad if name == "gradcache" else None
            if fn is None:
                # The plain path: one chunk, so every activation of the batch is kept for backward.
                def fn(e, lf, p, b, r, c):
                    return gradcache.plain_value_and_grad(e, lf, p, b, r, 1)

            step = jax.jit(fn, static_argnums=(0, 1, 5))
            t0 = time.perf_counter()
            compiled = step.lower(encode, loss_fn, params, batch, rng, num_chunks).compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            entry = {
                "temp_mib": round(mem.temp_size_in_bytes / 2**20, 1),
                "args_out_mib": round(
                    (mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**20, 1
                ),
                "compile_s": round(compile_s, 2),
            }
            if name == "gradcache":
                entry["num_chunks"] = num_chunks
            if not args.no_time:
                jax.block_until_ready(compiled(params, batch, rng))
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(params, batch, rng))
                entry["ms_per_example"] = round(1e3 * (time.perf_counter() - t0) / n, 4)
            row[name] = entry
        results.append(row)

    print(
        json.dumps(
            {
                "benchmark": "gradcache_memory",
                "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
                "num_devices": 1,
                "host": platform.machine(),
                "jax": jax.__version__,
                "encoder": {
                    "length": args.length,
                    "width": args.width,
                    "hidden": args.hidden,
                    "layers": args.layers,
                    "dropout": 0.1,
                },
                "loss": "gte (joint partition, no hard negatives)",
                "chunk_size": args.chunk_size,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
