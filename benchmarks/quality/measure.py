"""``run.py --measure``: the base model against three recipes on the same in-domain pairs, each a
separate process as a user runs it, every seed in ``--seeds``:

- ``st_mnrl``: sentence-transformers' MultipleNegativesRankingLoss fine-tune (the peer,
  ``benchmarks/st_finetune.py``);
- ``gte_1stage``: ``gte-jax train --config configs/finetune.py`` on the same pairs;
- ``gte_2stage``: stage 1 on weak pairs from another source (``wiki_lead`` train: lead sentence
  -> rest of a Wikipedia paragraph), then ``gte-jax mine`` one hard negative per in-domain pair
  with the stage-1 model, then stage 2 = ``configs/finetune.py`` on the pairs + negatives.

All: batch 64, 1 epoch, learning rate 2e-5, warmup 10 %, τ = 0.05 (MNRL's scale 20), max length
128. In-domain = ``bible_ot``; the other tasks are out-of-domain (never trained on, except
``wiki_lead``'s own *train* split by the two-stage recipe's stage 1, reported as such). Each
finished run is appended to ``<suite>/measure/runs.jsonl`` as it ends.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

from benchmarks.quality import run as suite_run
from benchmarks.quality import tasks

IN_DOMAIN = "bible_ot"
STAGE1_SOURCE = "wiki_lead"
COMMON = {"batch_size": 64, "learning_rate": 2e-5, "max_length": 128, "temperature": 0.05}
RECIPES = ("st_mnrl", "gte_1stage", "gte_2stage")


def _first_lines(src: pathlib.Path, dst: pathlib.Path, n: int) -> pathlib.Path:
    with open(src, encoding="utf-8") as f:
        lines = [x for x in f if x.strip()][:n]
    dst.write_text("".join(lines), encoding="utf-8")
    return dst


def log_of(directory: pathlib.Path) -> pathlib.Path:
    """A run directory's log beside it: ``<name>.log`` (not ``with_suffix``, which would cut
    ``tau_0.01_s0`` to ``tau_0.log``, the same file as ``tau_0.02_s0``'s)."""
    return directory.parent / f"{directory.name}.log"


def _finished_json(log: pathlib.Path) -> bool:
    """Whether ``log`` ends in the JSON summary a finished gte-jax command prints last."""
    if not log.exists():
        return False
    lines = [x for x in log.read_text(encoding="utf-8", errors="replace").splitlines() if x]
    try:
        return bool(lines) and isinstance(json.loads(lines[-1]), dict)
    except json.JSONDecodeError:
        return False


def _call(cmd: list[str], log: pathlib.Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0


def gte_train(
    init: str, pairs: pathlib.Path, workdir: pathlib.Path, seed: int, extra: tuple[str, ...] = ()
) -> pathlib.Path:
    """``gte-jax train`` with configs/finetune.py (+ ``extra`` ``--config.*`` flags) -> the
    exported model directory."""
    cmd = [
        sys.executable, "-m", "gte_jax.cli", "train", "--config",
        str(suite_run.REPO / "configs" / "finetune.py"), "--workdir", str(workdir),
        f"--config.model.init_from={init}", f"--config.data.train_files={pairs}",
        f"--config.train.batch_size={COMMON['batch_size']}", "--config.train.epochs=1",
        f"--config.train.learning_rate={COMMON['learning_rate']}",
        f"--config.data.max_length={COMMON['max_length']}",
        f"--config.loss.temperature={COMMON['temperature']}", f"--config.train.seed={seed}",
        "--config.train.progress_bar=false", "--config.model.dtype=float32", *extra,
    ]  # fmt: skip
    # a finished run (the export is renamed into place last) is reused: a rerun of an interrupted
    # grid does not retrain, nor overwrite the log it was measured with
    if not (workdir / "export" / "model.safetensors").exists():
        _call(cmd, log_of(workdir))
    return workdir / "export"


def st_train(init: str, pairs: pathlib.Path, out: pathlib.Path, seed: int) -> pathlib.Path:
    cmd = [
        sys.executable, str(suite_run.REPO / "benchmarks" / "st_finetune.py"), "--model", init,
        "--train_file", str(pairs), "--out", str(out), "--seed", str(seed),
        "--batch_size", str(COMMON["batch_size"]), "--learning_rate", str(COMMON["learning_rate"]),
        "--max_length", str(COMMON["max_length"]), "--temperature", str(COMMON["temperature"]),
    ]  # fmt: skip
    _call(cmd, log_of(out))
    return out


def mine(
    model: pathlib.Path, pairs: pathlib.Path, out: pathlib.Path, seed: int, extra: tuple = ()
) -> pathlib.Path:
    """One hard negative per pair (GTE §4.1), the pairs' own positives as the corpus; ``extra``:
    more ``gte-jax mine`` flags."""
    corpus = out.with_name(out.stem + "_corpus.jsonl")
    with open(pairs, encoding="utf-8") as f:
        docs = dict.fromkeys(json.loads(x)["positive"] for x in f if x.strip())
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    cmd = [
        sys.executable, "-m", "gte_jax.cli", "mine", "--model", str(model), "--pairs", str(pairs),
        "--corpus", str(corpus), "--output", str(out), "--num-negatives", "1",
        "--seed", str(seed), *extra,
    ]  # fmt: skip
    if not (out.exists() and _finished_json(out.with_suffix(".log"))):  # a finished mine: reused
        _call(cmd, out.with_suffix(".log"))  # mined_s0.jsonl -> mined_s0.log
    return out


def recipe(
    name: str, base: str, pairs: pathlib.Path, weak: pathlib.Path, work: pathlib.Path, seed: int
):
    """Train one recipe for one seed -> its model directory."""
    run_dir = work / f"{name}_s{seed}"
    if name == "st_mnrl":
        return st_train(base, pairs, run_dir, seed)
    if name == "gte_1stage":
        return gte_train(base, pairs, run_dir, seed)
    stage1 = gte_train(base, weak, work / f"stage1_s{seed}", seed)
    mined = mine(stage1, pairs, work / f"mined_s{seed}.jsonl", seed)
    return gte_train(str(stage1), mined, run_dir, seed)


def measure(args, suite: pathlib.Path) -> dict:
    """Base + every recipe x seed on the test split -> the record ``run.py`` prints."""
    unknown = set(args.recipes.split(",")) - set(RECIPES)
    if unknown:
        raise SystemExit(f"--recipes: unknown {sorted(unknown)}; choose from {RECIPES}")
    work = suite / "measure"
    work.mkdir(exist_ok=True)
    base = args.model[0] if args.model else suite_run.default_model()
    pairs = _first_lines(suite / IN_DOMAIN / "train.jsonl", work / "pairs.jsonl", args.train_pairs)
    weak = _first_lines(
        suite / STAGE1_SOURCE / "train.jsonl", work / "weak.jsonl", args.train_pairs
    )
    log = open(work / "runs.jsonl", "a", encoding="utf-8")
    evaluate = lambda m: suite_run.evaluate_model(m, suite, split=args.split)  # noqa: E731
    runs = {"base": [evaluate(base)]}
    log.write(json.dumps({"recipe": "base", "result": runs["base"][0]}) + "\n")
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.recipes.split(","):
            t0 = time.perf_counter()
            result = evaluate(recipe(name, base, pairs, weak, work, seed))
            runs.setdefault(name, []).append(result)
            rec = {"recipe": name, "seed": seed, "seconds": round(time.perf_counter() - t0, 1)}
            log.write(json.dumps({**rec, "result": result}) + "\n")
            log.flush()
    return summarize(runs, args)


def summarize(runs: dict[str, list[dict]], args) -> dict:
    """Mean ± spread per recipe and task, and each recipe's delta to the base model."""
    base = runs["base"][0]
    results, deltas = {}, {}
    for name, per_seed in runs.items():
        results[name] = {
            t: {k: suite_run.mean_spread([r[t][k] for r in per_seed]) for k in suite_run.KEYS}
            for t in tasks.TASKS
        }
        deltas[name] = {
            t: suite_run.mean_spread([r[t]["mrr@10"] - base[t]["mrr@10"] for r in per_seed])
            for t in tasks.TASKS
        }
    return {
        "benchmark": "quality_measure",
        "split": args.split,
        "train_pairs": args.train_pairs,
        "seeds": args.seeds,
        **COMMON,
        "in_domain": IN_DOMAIN,
        "results": results,
        "mrr@10_delta_vs_base": deltas,
    }
