"""The lever table: base, the sentence-transformers peer, gte-jax one stage, gte-jax two stages,
and each lever on top of the two-stage recipe switched on or off, every seed, on the quality suite.

    python -m benchmarks.quality.levers --seeds 0,1,2 --train_pairs 11783 --split dev,test

Where the time goes (one seed measured first): each training is its own process (JAX start-up
and compile, then the steps) and each model's evaluation encodes the three test corpora once. The
base model is evaluated once for all seeds (not once per seed); stage 1 and its mined negatives
are made once per seed and shared by every stage-2 variant; the interpolation levers are an export
of the finished two-stage workdir (no training). Every finished row is appended to ``--out`` (JSONL)
as it ends, with its training and evaluation seconds, so a partial table survives; rows already
in ``--out`` are skipped on a rerun. ``--summary`` prints the table of what ``--out`` holds.

Order: the recipes the goal is about (peer, 2-stage, 1-stage) for every seed first, then every
lever at the first seed, then the levers at the other seeds. ``--levers stage1_sentences,no_mining``
runs only those levers, in that order (the table still shows every row ``--out`` holds).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(REPO))

from benchmarks.quality import build, measure, tasks  # noqa: E402
from benchmarks.quality import run as suite_run  # noqa: E402

MAIN = ("st_mnrl", "gte_2stage", "gte_1stage")
# the levers on top of the two-stage recipe (mined negatives, τ 0.05), one thing changed each;
# interp_<w>: its export interpolated with the base model; the others: stage 2 retrained
LEVERS = ("interp_0.3", "interp_0.5", "mine_window", "no_mining", "tau_0.02", "tau_learned",
          "matryoshka", "replay_0.2", "stage1_sentences", "distill", "tau_0.01", "mine_top",
          "stage1_bible", "loss_gte", "loss_symmetric")  # fmt: skip
# a larger stage 1 (``stage1_<source>``): the recipe's weak pairs + the source's pairs, as
# (the task whose train groups alone are read, the pairs' builder). sentences: every two adjacent
# sentences of a Wikipedia paragraph (another source than the Bible); bible: two verses >= 2
# apart in one Old Testament chapter, KJV (in-domain raw text, never the task's verse -> next)
WEAK_MORE = {
    "sentences": (measure.STAGE1_SOURCE, tasks.wiki_sentence_pairs),
    "bible": (measure.IN_DOMAIN, tasks.bible_chapter_pairs),
}
# how the two-stage recipe's negatives are mined (``gte-jax mine`` flags); "default" is the recipe's
# own (TopK-PercPos 0.95, the best of the top 100); the others retrain stage 2 on their own file
MINING = {
    "default": (),
    # BGE's practice: a negative drawn at random from ranks 10..100, no positive-aware filter
    "mine_window": ("--skip-top", "10", "--sampling", "random", "--perc-pos", "none"),
    "mine_top": ("--perc-pos", "none"),  # the best-scoring candidate, no filter (naive top-k)
    # the recipe's negatives + the miner's (stage 1's) cosines with the positive and negative
    "distill": ("--teacher-scores",),
}
# every row is also scored at these prefixes of MiniLM's 384 dims (Matryoshka quality per dim)
DIMS = (256, 128, 64)
VARIANTS = {
    "no_mining": None,  # the in-domain pairs without negatives
    "mine_window": (),
    "mine_top": (),
    "matryoshka": ("--config.loss.matryoshka_dims=(384,256,128,64)",),  # weights 1 each (ST's)
    # KL to the stage-1 miner's score distribution over (positive, negative), added at weight 1
    "distill": ("--config.loss.distill_weight=1.0",),
    "replay_0.2": ("--config.data.replay.share=0.2",),  # + data.replay.train_files (stage 1's)
    "tau_0.01": ("--config.loss.temperature=0.01",),
    "tau_0.02": ("--config.loss.temperature=0.02",),
    "tau_learned": ("--config.loss.learn_temperature=true",),  # starts at 0.05
    # GTE's improved contrastive loss (§3: one partition over q->d, q->q, d->q, d->d) at the
    # recipe's τ 0.05, in place of the peer's MNRL (q->d only)
    "loss_gte": ("--config.loss.name=gte",),
    "loss_symmetric": ("--config.loss.symmetric=true",),  # MNRL + the d->q direction, averaged
}


def _rows(out: pathlib.Path, split: str | None = None) -> list[dict]:
    """The rows of ``out`` evaluated on this suite version (of one evaluation split when ``split``
    is given; a row without a ``split`` field is a test-split row). A row of an older suite (no
    ``suite_version``: before version 4, whose bible_ot and chat_qa ranked a query's own text) is
    neither tabled nor counted as done: a rerun measures it again."""
    if not out.exists():
        return []
    rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("suite_version") == build.VERSION]
    return [r for r in rows if split is None or r.get("split", "test") == split]


def _done(out: pathlib.Path) -> set[tuple[str, int, str]]:
    return {(r["recipe"], r.get("seed", -1), r.get("split", "test")) for r in _rows(out)}


def _append(out: pathlib.Path, row: dict) -> None:
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


class Runner:
    """One seed's shared pieces (stage 1, mined pairs) built on first use."""

    def __init__(self, args, suite: pathlib.Path, work: pathlib.Path):
        self.args, self.suite, self.work = args, suite, work
        self.base = suite_run.default_model()
        self.pairs = measure._first_lines(
            suite / measure.IN_DOMAIN / "train.jsonl", work / "pairs.jsonl", args.train_pairs
        )
        self.weak = measure._first_lines(
            suite / measure.STAGE1_SOURCE / "train.jsonl", work / "weak.jsonl", args.weak_pairs
        )
        self.cache: dict = {}

    def _once(self, key, make):
        if key not in self.cache:
            t0 = time.perf_counter()
            self.cache[key] = make()
            self.cache[key + "_s"] = round(time.perf_counter() - t0, 1)
        return self.cache[key]

    def stage1(self, seed: int, source: str = "lead") -> pathlib.Path:
        """Stage 1 on the recipe's weak pairs (``lead``: wiki_lead's train split, lead sentence ->
        the rest) or, for a ``stage1_<source>`` lever, those plus the source's pairs
        (:meth:`weak_more`)."""
        # not "stage1_<source>": that is the stage-2 directory of the lever of the same name
        stem = "stage1" if source == "lead" else f"weak_{source}_stage1"
        data = self.weak if source == "lead" else self.weak_more(source)
        return self._once(f"{stem}_{seed}", lambda: measure.gte_train(
            self.base, data, self.work / f"{stem}_s{seed}", seed))  # fmt: skip

    def mined(self, seed: int, how: str = "default", source: str = "lead") -> pathlib.Path:
        stem = "mined" + ("" if how == "default" else f"_{how}")
        stem += "" if source == "lead" else f"_{source}"
        return self._once(f"{stem}_{seed}", lambda: measure.mine(
            self.stage1(seed, source), self.pairs, self.work / f"{stem}_s{seed}.jsonl", seed,
            MINING[how]))  # fmt: skip

    def weak_more(self, source: str) -> pathlib.Path:
        """The recipe's weak pairs + a larger stage 1's (:data:`WEAK_MORE`): pairs of the
        source's task's train groups only, none sharing a text with that task's dev / test files
        or the reserved texts (written once)."""
        out = self.work / f"weak_{source}.jsonl"
        if not out.exists():
            task, make = WEAK_MORE[source]
            held = tasks.reserved_texts()
            for split in ("dev", "test"):
                for name in ("corpus.jsonl", "queries.jsonl"):
                    with open(self.suite / task / split / name, encoding="utf-8") as f:
                        held |= {tasks.norm(json.loads(x)["text"]) for x in f if x.strip()}
            pairs = [p for p in make() if tasks.split_of(task, p.group) == "train"
                     and not {tasks.norm(p.query), tasks.norm(p.positive)} & held]  # fmt: skip
            lines = [json.dumps({"query": p.query, "positive": p.positive}) + "\n" for p in pairs]
            tmp = out.with_suffix(".partial")
            tmp.write_text(self.weak.read_text(encoding="utf-8") + "".join(lines), encoding="utf-8")
            tmp.rename(out)
        return out

    def train(self, name: str, seed: int) -> pathlib.Path:
        """The model directory of one row (training it, or exporting for interpolation)."""
        w = self.work
        if name == "st_mnrl":
            return measure.st_train(self.base, self.pairs, w / f"st_mnrl_s{seed}", seed)
        if name == "gte_1stage":
            return measure.gte_train(self.base, self.pairs, w / f"gte_1stage_s{seed}", seed)
        if name == "gte_2stage":
            return self.two_stage(seed)
        if name.startswith("interp_"):
            return self.interpolate(seed, float(name.split("_")[1]))
        if name.startswith("stage1_"):  # a larger stage 1, then the recipe's stage 2
            source = name.removeprefix("stage1_")
            init, data = self.stage1(seed, source), self.mined(seed, source=source)
            return measure.gte_train(str(init), data, w / f"{name}_s{seed}", seed)
        flags = VARIANTS[name]
        data = (
            self.pairs if flags is None else self.mined(seed, name if name in MINING else "default")
        )
        extra = tuple(flags or ())
        if name.startswith("replay"):
            extra += (f"--config.data.replay.train_files={self.weak}",)
        return measure.gte_train(str(self.stage1(seed)), data, w / f"{name}_s{seed}", seed, extra)

    def two_stage(self, seed: int) -> pathlib.Path:
        return self._once(f"2stage_{seed}", lambda: measure.gte_train(
            str(self.stage1(seed)), self.mined(seed), self.work / f"gte_2stage_s{seed}", seed))  # fmt: skip

    def interpolate(self, seed: int, weight: float) -> pathlib.Path:
        """WiSE-FT: (1 - w) · the two-stage model + w · the base model, at export."""
        self.two_stage(seed)
        workdir = self.work / f"gte_2stage_s{seed}"
        out = self.work / f"interp_{weight}_s{seed}"
        cmd = [sys.executable, "-m", "gte_jax.cli", "export", "--workdir", str(workdir),
               "--output", str(out), "--interpolate", f"{self.base}={weight}"]  # fmt: skip
        measure._call(cmd, measure.log_of(out))
        return out


def run_rows(runner: Runner, name: str, seed: int, splits: list[str]) -> list[dict]:
    """One model trained once, evaluated on each of ``splits``: a row per split."""
    t0 = time.perf_counter()
    model = runner.train(name, seed)
    train_s = round(time.perf_counter() - t0, 1)
    rows = []
    for split in splits:
        t1 = time.perf_counter()
        result = suite_run.evaluate_model(model, runner.suite, split=split, dims=DIMS)
        rows.append({"recipe": name, "seed": seed, "split": split, "train_s": train_s,
                     "eval_s": round(time.perf_counter() - t1, 1), "result": result,
                     "suite_version": build.VERSION})  # fmt: skip
    return rows


def grid_order(seeds: list[int], chosen=LEVERS) -> list[tuple[str, int]]:
    """(recipe, seed) in the order the grid runs them: the recipes for every seed, then the
    chosen levers at the first seed, then at the others."""
    order = [(n, s) for s in seeds for n in MAIN] + [(n, seeds[0]) for n in chosen]
    return order + [(n, s) for s in seeds[1:] for n in chosen]


def measure_all(args) -> None:
    suite = build.build_suite(pathlib.Path(args.workdir).expanduser())
    measure.COMMON["learning_rate"] = args.learning_rate
    work = suite / "levers"
    work.mkdir(exist_ok=True)
    out = pathlib.Path(args.out)
    done = _done(out)
    runner = Runner(args, suite, work)
    splits = args.split.split(",")
    for split in splits:
        if ("base", -1, split) not in done:
            t0 = time.perf_counter()
            result = suite_run.evaluate_model(runner.base, suite, split=split)
            _append(out, {"recipe": "base", "split": split, "result": result,
                          "eval_s": round(time.perf_counter() - t0, 1),
                          "settings": settings(args), "suite_version": build.VERSION})  # fmt: skip
    seeds = [int(s) for s in args.seeds.split(",")]
    for name, seed in grid_order(seeds, args.levers.split(",") if args.levers else LEVERS):
        todo = [s for s in splits if (name, seed, s) not in done]
        if not todo:
            continue
        for row in run_rows(runner, name, seed, todo):
            row["shared_s"] = {k: v for k, v in runner.cache.items() if k.endswith("_s")}
            _append(out, row)


def settings(args) -> dict:
    return {**measure.COMMON, "train_pairs": args.train_pairs, "weak_pairs": args.weak_pairs,
            "epochs": 1}  # fmt: skip


def _ordered(rows) -> list[dict]:
    """Rows in the table's order: the recipes, then the levers as :data:`LEVERS` lists them (a
    stable sort: a later row of the same recipe and seed still comes later)."""
    rank = {n: i for i, n in enumerate(("base", *MAIN, *LEVERS))}
    return sorted(rows, key=lambda r: rank.get(r["recipe"], len(rank)))


def _diffs(per_seed: dict, other: dict, task: str) -> list[float]:
    """MRR@10 on ``task`` minus ``other``'s of the same seed, for the seeds both have."""
    return [per_seed[s][task]["mrr@10"] - other[s][task]["mrr@10"] for s in per_seed if s in other]


def summary(out: pathlib.Path, split: str = "test") -> dict:
    """Mean ± spread per row and task, and the MRR@10 deltas to the base, to the peer and (a
    lever's on/off effect) to the two-stage recipe of the same seed, on one evaluation split."""
    rows = _rows(out, split)
    bases = [r["result"] for r in rows if r["recipe"] == "base"]
    if not bases:
        raise SystemExit(f"{out}: no {split} rows of suite version {build.VERSION} (older rows "
                         "are not tabled): run the grid without --summary to measure them")  # fmt: skip
    base = bases[-1]  # a re-scored row wins
    by: dict[str, dict[int, dict]] = {}
    for r in _ordered(rows):
        if r["recipe"] != "base":
            by.setdefault(r["recipe"], {})[r["seed"]] = r["result"]
    peer, recipe = by.get("st_mnrl", {}), by.get("gte_2stage", {})
    table = {"base": {t: {"mrr@10": base[t]["mrr@10"]} for t in tasks.TASKS}}
    for name, per_seed in by.items():
        table[name] = {}
        for t in tasks.TASKS:
            vals = [per_seed[s][t]["mrr@10"] for s in per_seed]
            vs_peer, vs_recipe = _diffs(per_seed, peer, t), _diffs(per_seed, recipe, t)
            vs_recipe = vs_recipe if name in LEVERS else []
            table[name][t] = {
                "mrr@10": suite_run.mean_spread(vals),
                "vs_base": suite_run.mean_spread([v - base[t]["mrr@10"] for v in vals]),
                "vs_peer": suite_run.mean_spread(vs_peer) if vs_peer else None,
                "vs_recipe": suite_run.mean_spread(vs_recipe) if vs_recipe else None,
            }
    return table


def summary_dims(out: pathlib.Path, split: str = "test") -> dict:
    """Matryoshka quality per dimension: {row: {task: {dim: mean ± spread of MRR@10}}} over the
    rows scored at :data:`DIMS` (the full dim is the row's own MRR@10); a task a row was not
    scored per dimension on is left out of it."""
    latest = {(r["recipe"], r.get("seed")): r for r in _rows(out, split)}  # a re-scored row wins
    table: dict[str, dict] = {}
    for r in _ordered(latest.values()):
        if r["recipe"] == "base":
            continue
        for t, res in r["result"].items():
            if "by_dim" not in res:
                continue
            per_dim = {"full": res["mrr@10"]} | {d: v["mrr@10"] for d, v in res["by_dim"].items()}
            for d, v in per_dim.items():
                table.setdefault(r["recipe"], {}).setdefault(t, {}).setdefault(d, []).append(v)
    return {name: {t: {d: suite_run.mean_spread(v) for d, v in per.items()}
                   for t, per in by_task.items()} for name, by_task in table.items()}  # fmt: skip


def markdown_dims(table: dict) -> str:
    if not table:
        return ""
    dims = ["full", *(str(d) for d in DIMS)]
    names = list(tasks.TASKS)
    head = "| row | n | " + " | ".join(f"{t} @{d}" for t in names for d in dims) + " |"
    lines = [head, "|---|---:|" + "---:|" * (len(dims) * len(names))]
    for name, per_task in table.items():
        n = max(c["n"] for per in per_task.values() for c in per.values())
        cells = [f"{per_task[t][d]['mean']:.4f}" if d in per_task.get(t, {}) else "–"
                 for t in names for d in dims]  # fmt: skip
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(table: dict) -> str:
    names = list(tasks.TASKS)
    head = "| row | n | " + " | ".join(f"{t} MRR@10 (Δ base, Δ peer, Δ off)" for t in names) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(names)]
    for name, per_task in table.items():
        n = per_task[names[0]]["mrr@10"]["n"] if name != "base" else 1
        lines.append(f"| {name} | {n} | " + " | ".join(_cell(per_task[t]) for t in names) + " |")
    return "\n".join(lines)


def _cell(c: dict) -> str:
    m = c["mrr@10"]
    if not isinstance(m, dict):
        return f"{m:.4f}"
    f = lambda d: f"{d['mean']:+.4f}" if d else "–"  # noqa: E731
    deltas = ", ".join(f(c.get(k)) for k in ("vs_base", "vs_peer", "vs_recipe"))
    return f"{m['mean']:.4f} ± {m['spread'] / 2:.4f} ({deltas})"


def _splits(text: str) -> str:
    """``--split``: refused at start-up (exit 2) unless each name is dev or test, once."""
    names = text.split(",")
    if set(names) - {"dev", "test"} or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: dev, test or dev,test")
    return text


def _seeds(text: str) -> str:
    """``--seeds``: refused at start-up (exit 2) unless comma-separated distinct integers."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: distinct integers, e.g. 0,1,2")
    return text


def _levers(text: str) -> str:
    """``--levers``: refused at start-up (exit 2) unless each name is a lever of :data:`LEVERS`."""
    names = text.split(",")
    unknown = [n for n in names if n not in LEVERS]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: names from {', '.join(LEVERS)}, each once")
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=str(suite_run.DEFAULT_WORKDIR))
    p.add_argument("--out", default="levers.jsonl", help="JSONL of finished rows (appended)")
    p.add_argument("--seeds", default="0,1,2", type=_seeds)
    p.add_argument("--train_pairs", type=int, default=2000, help="in-domain (bible_ot) pairs")
    p.add_argument("--weak_pairs", type=int, default=1723, help="stage-1 (wiki_lead) pairs")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--split", default="test", type=_splits,
                   help="dev, test, or dev,test: each model evaluated on each (a row per split); "
                   "--summary: the split tabled (the first)")  # fmt: skip
    p.add_argument("--levers", default=None, type=_levers,
                   help="only these levers, in this order (comma-separated; default: all, "
                   "table order); the recipes are always run first")  # fmt: skip
    p.add_argument("--summary", action="store_true", help="only print the table of --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if not args.summary:
        measure_all(args)
    table = summary(pathlib.Path(args.out), args.split.split(",")[0])
    print(json.dumps(table))
    print()
    print(markdown(table))
    dims = markdown_dims(summary_dims(pathlib.Path(args.out), args.split.split(",")[0]))
    if dims:
        print("\nMRR@10 per embedding dimension (Matryoshka):\n" + dims)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
