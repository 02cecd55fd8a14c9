"""GradCache vs plain autodiff on the real train step: compiled peak memory and time per example.

    python3 benchmarks/gradcache_memory.py [--batches 256,512,1024,2048,4096] [--chunk_size 128]
        [--length 32] [--layers 6] [--hidden 384] [--heads 12] [--intermediate 1536]
        [--loss_block 1024] [--time_batches 256] [--plain_time_max 256] [--steps 1]
        [--rng_impl rbg]

The gte-jax ``BiEncoder`` (random-init BERT, all-MiniLM-L6-v2 shape by default: 6 layers, hidden
384, 12 heads, intermediate 1536, vocab 30522; dropout 0.1 on) trained by
``train.make_train_step`` (GTE loss, AdamW update included): ``gradcache=True`` with
``batch / chunk_size`` chunks vs ``gradcache=False`` (one chunk: autodiff through the whole
batch). Every query and document is ``--length`` tokens, no hard negatives.

Memory is XLA's own account of the compiled step (``compiled.memory_analysis()``, deterministic):
``temp`` is the scratch the program needs at its peak (activations kept for the backward, loss
logits, gradient accumulators); parameters, optimizer state and the batch are the arguments.
Time is wall time of ``--steps`` calls of the compiled step after compilation (the best one),
divided by the batch: only for the batches in ``--time_batches`` (a 4096 step of a 22M-parameter
model is minutes on a small CPU), and for the plain path only up to ``--plain_time_max``.
``--loss_block`` is the loss's row block (``losses.DEFAULT_BLOCK_SIZE`` by default; 0 = the
whole batch at once, the old behaviour). Prints one JSON line.
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
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--loss_block", type=int, default=None, help="0 = unblocked loss")
    p.add_argument("--time_batches", default="256", help="batches to time ('' = none, 'all')")
    p.add_argument("--plain_time_max", type=int, default=256, help="largest plain batch timed")
    p.add_argument("--plain_mem_max", type=int, default=4096, help="largest plain batch compiled")
    p.add_argument("--steps", type=int, default=1, help="timed calls per entry (best is kept)")
    p.add_argument("--rng_impl", default="rbg", help="dropout key impl (rbg: faster compile)")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from gte_jax import losses, train
    from gte_jax.models.bert import EncoderConfig
    from gte_jax.models.encoder import BiEncoder

    config = EncoderConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=max(512, args.length),
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    model = BiEncoder(config, pooling="mean", normalize=True, rngs=nnx.Rngs(0))
    model_fn, params = train.ModelFn.from_module(model)
    del model
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    tx = optax.adamw(1e-5, weight_decay=0.01, mask=train.weight_decay_mask)
    loss_kwargs = {"temperature": losses.GTE_TEMPERATURE}
    block = losses.DEFAULT_BLOCK_SIZE if args.loss_block is None else (args.loss_block or None)
    loss_kwargs["block_size"] = block

    def make_state():
        return {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key(0, impl=args.rng_impl),
        }

    def make_batch(n):
        rs = np.random.RandomState(n)
        batch = {}
        for role in ("query", "doc"):
            batch[f"{role}_input_ids"] = rs.randint(1000, args.vocab, size=(n, args.length)).astype(
                np.int32
            )
            batch[f"{role}_attention_mask"] = np.ones((n, args.length), np.int32)
        batch["valid"] = np.ones((n,), np.int32)
        return batch

    batches = [int(b) for b in args.batches.split(",")]
    if args.time_batches == "all":
        timed = set(batches)
    else:
        timed = {int(b) for b in args.time_batches.split(",") if b}
    state = make_state()
    results = []
    for n in batches:
        batch = make_batch(n)
        row = {"batch": n}
        for name in ("gradcache", "plain"):
            if name == "plain" and n > args.plain_mem_max:
                row[name] = None
                continue
            num_chunks = max(1, n // args.chunk_size) if name == "gradcache" else 1
            step = train.make_train_step(
                model_fn,
                tx,
                loss_name="gte",
                loss_kwargs=loss_kwargs,
                num_chunks=num_chunks,
                gradcache=name == "gradcache",
                dropout=True,
            )
            t0 = time.perf_counter()
            compiled = jax.jit(step).lower(state, batch).compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            entry = {
                "temp_mib": round(mem.temp_size_in_bytes / 2**20, 1),
                "args_mib": round(mem.argument_size_in_bytes / 2**20, 1),
                "compile_s": round(compile_s, 1),
            }
            if name == "gradcache":
                entry["num_chunks"] = num_chunks
            if n in timed and (name == "gradcache" or n <= args.plain_time_max):
                best = float("inf")
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    _, metrics = compiled(state, batch)
                    jax.block_until_ready(metrics)
                    best = min(best, time.perf_counter() - t0)
                entry["ms_per_example"] = round(1e3 * best / n, 2)
                entry["loss"] = round(float(metrics["loss"]), 4)
            row[name] = entry
            print(f"# batch {n} {name}: {entry}", flush=True)
        results.append(row)

    def get(n, name, key):
        for row in results:
            if row["batch"] == n and row.get(name) and key in row[name]:
                return row[name][key]
        return None

    lo, hi = min(batches), max(batches)
    mem_lo, mem_hi = get(lo, "gradcache", "temp_mib"), get(hi, "gradcache", "temp_mib")
    both = [
        r["batch"]
        for r in results
        if get(r["batch"], "gradcache", "ms_per_example")
        and get(r["batch"], "plain", "ms_per_example")
    ]
    time_ratio = None
    if both:
        nb = max(both)
        time_ratio = {
            "batch": nb,
            "ratio": round(
                get(nb, "gradcache", "ms_per_example") / get(nb, "plain", "ms_per_example"), 3
            ),
        }
    print(
        json.dumps(
            {
                "benchmark": "gradcache_memory",
                "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
                "num_devices": 1,
                "host": platform.machine(),
                "jax": jax.__version__,
                "model": {
                    "layers": args.layers,
                    "hidden": args.hidden,
                    "heads": args.heads,
                    "intermediate": args.intermediate,
                    "vocab": args.vocab,
                    "params": num_params,
                    "length": args.length,
                    "dropout": 0.1,
                    "rng_impl": args.rng_impl,
                },
                "loss": "gte (joint partition, no hard negatives)",
                "loss_block": block,
                "chunk_size": args.chunk_size,
                "steps_timed": args.steps,
                "results": results,
                "goals": {
                    "gradcache_mem_ratio": {
                        "batches": [lo, hi],
                        "ratio": round(mem_hi / mem_lo, 3) if mem_lo and mem_hi else None,
                        "target": 1.3,
                    },
                    "gradcache_time_ratio": dict(time_ratio or {}, target=1.4),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
