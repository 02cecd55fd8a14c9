"""Model FLOPs utilisation of the gte-jax train step: BERT-base, seq 128, bf16 (the issue's GPU goal
is >= 45%). Prints one JSON line.

    python benchmarks/mfu.py                          # accelerator defaults: batch 256, bf16
    python benchmarks/mfu.py --batch 16 --dtype float32 --layers 2   # a CPU smoke run

Model FLOPs are counted analytically (the PaLM convention: 6 x params x tokens for the matmuls
with a parameter, plus 12 x layers x seq x hidden per token for attention scores and values, both
directions, query and document towers), not from XLA's cost analysis, so rematerialisation does not
inflate them. Peak FLOP/s: the datasheet's dense bf16 number for known accelerators; on CPU the
measured float32 matmul peak of this machine.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gte_jax import sharding as shd
from gte_jax import train
from gte_jax.models.bert import EncoderConfig
from gte_jax.models.encoder import BiEncoder

# Dense bf16 peak per chip (datasheets).
PEAK_BF16 = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def device_peak(dtype: str) -> tuple[float, str]:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        n = 2048
        a = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(5):
            f(a).block_until_ready()
        per = (time.perf_counter() - t0) / 5
        return 2 * n**3 / per, "measured float32 matmul on this CPU"
    kind = dev.device_kind
    for name, peak in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return peak, f"datasheet dense bf16 for {kind}"
    raise SystemExit(f"unknown accelerator {kind!r}: add its peak FLOP/s to PEAK_BF16")


def analytic_flops(params, layers: int, hidden: int, batch: int, seq: int) -> int:
    """Model FLOPs of one step on ``batch`` (query, document) pairs of ``seq`` tokens each (the
    module doc's formula; `gte-jax plan` must agree: tests/test_plan.py)."""
    non_embedding = sum(
        int(np.prod(x.shape))
        for path, x in jax.tree_util.tree_leaves_with_path(params)
        if "embeddings" not in jax.tree_util.keystr(path)
    )
    tokens = 2 * batch * seq  # query and document towers
    return tokens * (6 * non_embedding + 12 * layers * seq * hidden)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256, help="global pairs per step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--attention_dropout", type=float, default=0.0)
    args = p.parse_args()

    config = EncoderConfig(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=args.layers,
        num_attention_heads=12,
        intermediate_size=3072,
        attention_probs_dropout_prob=args.attention_dropout,
        dtype=jnp.dtype(args.dtype),
    )
    model = BiEncoder(config, rngs=nnx.Rngs(0))
    model_fn, params = train.ModelFn.from_module(model)
    tx = optax.adamw(1e-5)
    mesh = shd.make_mesh()
    state = shd.shard_params(
        train.init_train_state(params, tx, seed=0),
        mesh,
    )
    step = jax.jit(
        train.make_train_step(model_fn, tx, loss_name="gte", loss_kwargs={"temperature": 0.01}),
        donate_argnums=(0,),
    )
    rs = np.random.RandomState(0)
    b, n = args.batch, args.seq
    batch = {
        "query_input_ids": rs.randint(1000, 30000, (b, n)).astype(np.int32),
        "query_attention_mask": np.ones((b, n), np.int32),
        "doc_input_ids": rs.randint(1000, 30000, (b, n)).astype(np.int32),
        "doc_attention_mask": np.ones((b, n), np.int32),
        "query_text_id": np.arange(b, dtype=np.int32),
        "doc_text_id": np.arange(b, 2 * b, dtype=np.int32),
        "valid": np.ones(b, np.int32),
    }
    batch = shd.global_batch(batch, mesh)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / args.steps

    flops = analytic_flops(params, args.layers, config.hidden_size, b, n)
    peak, peak_source = device_peak(args.dtype)
    peak_total = peak * len(jax.devices())
    print(
        json.dumps(
            {
                "benchmark": "mfu",
                "device": jax.devices()[0].device_kind,
                "devices": len(jax.devices()),
                "layers": args.layers,
                "batch": b,
                "seq": n,
                "dtype": args.dtype,
                "step_seconds": round(step_s, 4),
                "compile_seconds": round(compile_s, 1),
                "pairs_per_second": round(b / step_s, 1),
                "model_tflops_per_step": round(flops / 1e12, 3),
                "achieved_tflops": round(flops / step_s / 1e12, 3),
                "peak_tflops": round(peak_total / 1e12, 1),
                "peak_source": peak_source,
                "mfu": round(flops / step_s / peak_total, 4),
                "loss": float(m["loss"]),
            }
        )
    )


if __name__ == "__main__":
    main()
