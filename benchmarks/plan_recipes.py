"""`gte-jax plan` for the GTE-base recipes: per-chip memory, fit and time on TPU slices, compiled on
this machine (libtpu, no TPU: `pip install -e ".[plan]"`). One JSON line per case, as the CLI
prints it, plus "case" and the wall time of the whole case.

    python benchmarks/plan_recipes.py                          # every case below (hours on 2 cores)
    python benchmarks/plan_recipes.py --cases stage1_v5e64,stage2_v5e8
    python benchmarks/plan_recipes.py --cases largest_plain,largest_gradcache --max_batch 65536

Cases:
  stage1_v5e64, stage1_v4_32  configs/gte_base_pretrain.py (batch 16384, GradCache chunks of 1024,
                              seq 128, bf16, remat) on v5litepod-64 and v4-32
  stage2_v5e8, stage2_v5e64   configs/gte_base_finetune.py (batch 128, 1 hard negative, seq 512)
  largest_plain               the largest power-of-two batch of stage 1 (seq 128, bf16, remat)
                              that fits one v5e chip without GradCache (doubling until it does not)
  largest_gradcache           the same with GradCache (chunk --chunk)
  e5_mistral_v4_8, _v5p_8     configs/e5_mistral.py (Mistral-7B, LoRA r=16 on every projection,
                              batch 2048 with 1 hard negative, seq 512, GradCache chunks of 64,
                              bf16, remat, FSDP), 879 steps (= 1 epoch of the paper's 1.8M)
  extrapolation_check         --layers 1,2 vs the full compile of a 4-layer decoder (E5 recipe)
  tevatron_v4_8               the same recipe at tevatron's setting (128 queries x 16 passages,
                              64 / 128 tokens, 3132 steps = 1 epoch of MS MARCO) on v4-8
Each GTE-base compile takes minutes of CPU; the doubling searches compile once per batch size.
The 7B cases' full (unrolled, 32-layer) compile needs more than 23 GB of host memory: run them
with --layers 1,2 (compile 1 and 2 layers, ~13 and ~34 min here, and extrapolate the memory).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax

from gte_jax import plan
from gte_jax.config import load_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
STAGE1 = str(CONFIGS / "gte_base_pretrain.py")
STAGE2 = str(CONFIGS / "gte_base_finetune.py")

E5_MISTRAL = str(CONFIGS / "e5_mistral.py")
# E5-mistral §4.2: ~1.8M examples, 1 epoch at batch 2048.
E5_STEPS = ["--config.train.num_steps=879"]
# tevatron's Mistral-7B LoRA + GradCache run (its README: 128 queries x 16 passages, query 64 /
# passage 128 tokens, 1 epoch of MS MARCO's 400,782 training queries, "about 35 hours on a v4-8").
TEVATRON = [
    "--config.train.batch_size=128",
    "--config.train.gradcache_chunk_size=8",
    "--config.data.query_max_length=64",
    "--config.data.doc_max_length=128",
    '--config.data.sources=[{"path": "msmarco.jsonl", "num_negatives": 15}]',
    "--config.train.num_steps=3132",
]

FIXED = {
    "stage1_v5e64": (STAGE1, "v5litepod-64", [], "bert-base"),
    "stage1_v4_32": (STAGE1, "v4-32", [], "bert-base"),
    "stage2_v5e8": (STAGE2, "v5litepod-8", [], "bert-base"),
    "stage2_v5e64": (STAGE2, "v5litepod-64", [], "bert-base"),
    "e5_mistral_v4_8": (E5_MISTRAL, "v4-8", E5_STEPS, "mistral-7b"),
    "e5_mistral_v5p_8": (E5_MISTRAL, "v5p-8", E5_STEPS, "mistral-7b"),
    "tevatron_v4_8": (E5_MISTRAL, "v4-8", TEVATRON, "mistral-7b"),
}


def run_case(
    case: str,
    config_path: str,
    topology: str,
    overrides: list[str],
    model: str,
    mfu: float,
    layers: list[int] | None = None,
):
    config = load_config(config_path, overrides)
    t0 = time.perf_counter()
    report = plan.plan(config, topology, model_config=model, mfu=mfu, layers=layers)
    line = {"case": case, "overrides": overrides, **report}
    line["case_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(line), flush=True)
    return report


def extrapolation_check(mfu: float) -> None:
    """``--layers`` against a full compile: a 4-layer Mistral-shaped decoder (hidden 512) in the
    E5-mistral recipe (LoRA, bf16, remat, GradCache, FSDP) on v4-8, compiled whole and at 1 and 2
    layers; prints both reports and the relative error of each extrapolated figure."""
    import tempfile

    from transformers import MistralConfig

    hf = MistralConfig(
        vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
        sliding_window=None,
    ).to_dict()  # fmt: skip
    overrides = ["--config.train.num_steps=10", "--config.train.batch_size=64",
                 "--config.train.gradcache_chunk_size=16", "--config.data.query_max_length=64",
                 "--config.data.doc_max_length=128"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "config.json"
        path.write_text(json.dumps(hf))
        full = run_case("check_full", E5_MISTRAL, "v4-8", overrides, str(path), mfu)
        fit = run_case("check_layers_1_2", E5_MISTRAL, "v4-8", overrides, str(path), mfu, [1, 2])
    keys = ("argument_gib_per_chip", "temp_gib_per_chip", "peak_gib_per_chip")
    error = {k: round(fit[k] / full[k] - 1, 4) for k in keys}
    print(json.dumps({"case": "extrapolation_check", "relative_error": error}), flush=True)


def largest(case: str, gradcache: bool, start: int, max_batch: int, chunk: int, mfu: float):
    """Doubles the stage-1 batch on one v5e chip until it does not fit (or max_batch)."""
    batch, best = start, None
    while batch <= max_batch:
        overrides = [f"--config.train.batch_size={batch}", "--config.train.num_steps=50000"]
        if gradcache:
            overrides += ["--config.train.gradcache=true",
                          f"--config.train.gradcache_chunk_size={min(chunk, batch)}"]  # fmt: skip
        else:
            overrides += ["--config.train.gradcache=false"]
        report = run_case(case, STAGE1, "v5litepod-1", overrides, "bert-base", mfu)
        if not report["fits"]:
            break
        best = batch
        batch *= 2
    print(json.dumps({"case": case, "largest_batch_that_fits": best}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join([*FIXED, "largest_plain", "largest_gradcache"]))
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--start_plain", type=int, default=256)
    p.add_argument("--start_gradcache", type=int, default=16384)
    p.add_argument("--max_batch", type=int, default=1 << 20)
    p.add_argument("--chunk", type=int, default=1024, help="GradCache chunk of largest_gradcache")
    p.add_argument("--layers", default="", help="e.g. 1,2: compile the cases at these depths "
                   "and extrapolate the memory linearly to the model's (gte-jax plan --layers)")  # fmt: skip
    args = p.parse_args()
    jax.config.update("jax_platforms", "cpu")  # nothing runs here; no TPU backend is probed
    for case in args.cases.split(","):
        if case in FIXED and args.layers:
            run_case(case, *FIXED[case], args.mfu, [int(n) for n in args.layers.split(",")])
        elif case in FIXED:
            run_case(case, *FIXED[case], args.mfu)
        elif case == "extrapolation_check":
            extrapolation_check(args.mfu)
        elif case == "largest_plain":
            largest(case, False, args.start_plain, args.max_batch, args.chunk, args.mfu)
        elif case == "largest_gradcache":
            largest(case, True, args.start_gradcache, args.max_batch, args.chunk, args.mfu)
        else:
            sys.exit(f"unknown case {case!r}; known: {', '.join(FIXED)}, extrapolation_check, largest_plain, "
                     "largest_gradcache")  # fmt: skip


if __name__ == "__main__":
    main()
