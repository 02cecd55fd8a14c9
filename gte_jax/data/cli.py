"""`gte-jax data inspect|build`: look at the data mixture without a model, prepare TFDS datasets.

    gte-jax data inspect --config configs/demo_data.py [--config.data.alpha=1.0] [--steps 100]
    gte-jax data build --builder msmarco_triples --data_dir DIR [--manual_dir DIR]
    gte-jax data build --config CONFIG      # every data.sources entry with `tfds` set
    gte-jax data build --files a.jsonl[,b.jsonl] --name NAME --data_dir DIR   # -> local_pairs/NAME

``inspect`` prints one JSON object on stdout:
``{"steps", "alpha", "skipped_records", "sources": {name: {size, expected_share, observed_share,
skipped}}}`` where the shares are of drawn batches (of examples with ``mixed_batches``), and a few
decoded batches on stderr. Exit codes: 0 ok, 2 bad usage / config / input.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

import numpy as np

from gte_jax.config import ConfigError, load_config
from gte_jax.textio import InputError

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gte-jax data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="draw batches without a model and report the mixture")
    ins.add_argument("--config", required=True, help="config file (get_config() -> ConfigDict)")
    ins.add_argument("--steps", type=int, default=100, help="global batches to draw")
    ins.add_argument("--stage", default=None, help="stage of a multi-stage config (default: first)")
    ins.add_argument("--show", type=int, default=2, help="decoded example batches on stderr")
    b = sub.add_parser("build", help="prepare TFDS builders (array_record) into a data dir")
    b.add_argument("--config", help="build every data.sources entry that names a tfds dataset")
    b.add_argument(
        "--builder", help="builder name, e.g. msmarco_triples, squad_pairs, nli_triplets"
    )
    b.add_argument("--data_dir", help="TFDS data dir (default: data.data_dir of the config)")
    b.add_argument("--manual_dir", help="directory holding already downloaded source files")
    b.add_argument(
        "--files",
        help="comma-separated local pair files (JSONL/TSV/Parquet) built into local_pairs/NAME "
        "(train split), read back as a source with tfds='local_pairs/NAME'",
    )
    b.add_argument("--name", help="with --files: the dataset's name (default: the first stem)")
    return p


def _example_ids(batch, role: str, i: int) -> list:
    """Token ids of example i's texts of one role (one, or K for ``neg``), packed or not."""
    ids = batch[f"{role}_input_ids"]
    if f"{role}_slot_index" not in batch:
        return list(ids[i].reshape(-1, ids.shape[-1]))
    length, segments = ids.shape[1], batch[f"{role}_segment_ids"]
    rows_slots = [divmod(int(s), length) for s in np.atleast_1d(batch[f"{role}_slot_index"][i])]
    return [ids[r][segments[r] == s + 1] for r, s in rows_slots]


def _decode_rows(tokenizer, batch, rows: int = 3) -> list[dict[str, str]]:
    out = []
    for i in range(min(rows, batch["valid"].shape[0])):
        query, doc = (_example_ids(batch, role, i)[0] for role in ("query", "doc"))
        row = {
            "query": tokenizer.decode(query, skip_special_tokens=True),
            "doc": tokenizer.decode(doc, skip_special_tokens=True),
        }
        if "neg_input_ids" in batch:
            negs = _example_ids(batch, "neg", i)
            real = batch["neg_valid"][i] if "neg_valid" in batch else [1] * len(negs)
            row["negatives"] = [  # placeholders of a record short of K are not shown
                tokenizer.decode(n, skip_special_tokens=True)
                for n, ok in zip(negs, real, strict=True)
                if ok
            ]
        out.append(row)
    return out


def training_data_config(config, stage: str | None, path: str):
    """The ``data`` group a training run would use: the named (or first) stage of a multi-stage
    config, ``train.batch_size`` as the global batch and the model's tokenizer when
    ``data.tokenizer`` is unset."""
    root = config
    if "stages" in config:
        stage = stage or config.stages[0]
        if stage not in config.stages:
            raise ConfigError(f"--stage {stage!r}: the config's stages are {list(config.stages)}")
        config = config[stage]
    if "data" not in config:
        raise ConfigError(f"{path}: the config has no `data` group")
    data = config.data.copy_and_resolve_references()
    if "stages" in root:  # as train.run does: the replayed stage's sources
        from gte_jax.data.pipeline import resolve_replay

        resolve_replay(data, root)
    if "train" in config and config.train.get("batch_size"):
        data.batch_size = int(config.train.batch_size)
    if not data.get("tokenizer") and "model" in config:
        from gte_jax.workdir import is_workdir, resolve_model_path

        model = str(config.model.init_from)
        seen = set()
        while model.startswith("stage:") and model not in seen:  # same tokenizer as that stage
            seen.add(model)
            model = str(root[model.split(":", 1)[1]].model.init_from)
        path = resolve_model_path(model)
        data.tokenizer = str(path / "base_model" if is_workdir(path) else path)
    if data.get("max_length", 0):
        data.query_max_length = data.doc_max_length = int(data.max_length)
    return data


def inspect_main(args, overrides: list[str]) -> int:
    from gte_jax.data.pipeline import build_iterator
    from gte_jax.data.sources import skipped_records

    config = load_config(args.config, overrides)
    data = training_data_config(config, args.stage, args.config)
    it = build_iterator(data)
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    for step in range(args.steps):
        plan = it.next_plan()
        batch = it.materialize(plan)
        if step < args.show:
            shapes = {k: list(v.shape) for k, v in batch.items()}
            print(
                json.dumps(
                    {
                        "step": step,
                        "source": plan.sources[0],
                        "shapes": shapes,
                        "examples": _decode_rows(it.tokenizer, batch),
                    },
                    ensure_ascii=False,
                ),
                file=sys.stderr,
            )
    stats = it.stats()
    sampler = it.sampler
    unit = "drawn_examples" if sampler.mixed else "drawn_batches"
    total = sum(s[unit] for s in stats.values())
    expected = sampler.expected_shares()
    report = {
        "steps": args.steps,
        "alpha": sampler.alpha,
        # Every bad record, those of a file that no source holds (MEDI) included.
        "skipped_records": skipped_records(stats),
        "sources": {
            name: {
                "size": s["size"],
                "expected_share": round(expected[name], 6),
                "observed_share": round(s[unit] / total, 6),
                "skipped": s["skipped"],
            }
            for name, s in stats.items()
        },
    }
    print(json.dumps(report))
    return 0


def build_main(args, overrides: list[str]) -> int:
    from data_pipelines import build_dataset

    targets: list[tuple[str, str | None]] = []
    data_dir = args.data_dir
    if args.config:
        config = load_config(args.config, overrides)
        data_dir = data_dir or config.data.get("data_dir") or None
        targets += [(s["tfds"], None) for s in config.data.get("sources", []) if s.get("tfds")]
    if args.builder:
        targets.append((args.builder, None))
    kwargs: dict = {}
    if args.files:
        from data_pipelines import LocalPairsConfig

        files = [f for f in args.files.split(",") if f]
        name = args.name or pathlib.Path(files[0]).stem
        kwargs["config"] = LocalPairsConfig(name=name, files={"train": files})
        targets = [(f"local_pairs/{name}", None)]
    if not targets:
        raise ConfigError(
            "nothing to build: pass --builder NAME, --files, or a --config with tfds sources"
        )
    if not data_dir:
        raise ConfigError("no data dir: pass --data_dir or set data.data_dir in the config")
    for name, _ in targets:
        builder = "local_pairs" if kwargs else name
        path = build_dataset(builder, data_dir=data_dir, manual_dir=args.manual_dir, **kwargs)
        print(json.dumps({"built": name, "path": str(path)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from gte_jax.commands.common import setup_logging

    setup_logging("INFO")
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.print_usage(sys.stderr)
        print(
            f"gte-jax data: unrecognised arguments {bad} (overrides are --config.a.b=v)",
            file=sys.stderr,
        )
        return 2
    try:
        if args.command == "inspect":
            return inspect_main(args, rest)
        return build_main(args, rest)
    except (ConfigError, InputError, FileNotFoundError, ValueError) as e:
        print(f"gte-jax data {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
