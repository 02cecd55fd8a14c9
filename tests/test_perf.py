"""What the [perf] issue promises, checked on a tiny model (timings themselves are measured in
benchmarks/, not here): a 1-epoch packed fine-tune compiles one train-step program, and the summary
says where the time went."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from conftest import child_env

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / "gte_jax" / "resources" / "demo" / "bible_finetune.jsonl"


def _train(tiny_model_dir, workdir, *extra) -> dict:

    env = {**child_env(1), "GTE_JAX_COMPILATION_CACHE": ""}  # no cache: programs are counted
    cmd = [
        sys.executable, "-m", "gte_jax.cli", "train", "--config",
        str(REPO / "configs" / "finetune.py"), "--workdir", str(workdir),
        f"--config.model.init_from={tiny_model_dir}", f"--config.data.train_files={DATA}",
        "--config.data.max_length=64", "--config.train.batch_size=16", "--config.train.epochs=1",
        "--config.train.progress_bar=false", "--config.export.enabled=false",
        "--config.checkpoint.async_save=false", "--log_level=WARNING",
        "--config.model.dropout=0",  # programs, not dropout: its random bits are ~1/3 of a compile
        *extra,
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((pathlib.Path(workdir) / "summary.json").read_text())


def test_a_packed_epoch_compiles_one_train_step_program(tiny_model_dir, tmp_path):
    summary = _train(tiny_model_dir, tmp_path / "fixed", "--config.data.max_length=128")
    assert summary["steps"] == 20  # 320 pairs / 16: more steps than the 16 batches primed
    timing = summary["timing"]
    assert timing["train_step_programs"] == 1
    assert timing["compiles"] >= 1 and timing["compile_seconds"] > 0
    assert 0 < timing["host_seconds"] < summary["train_seconds"]
    assert 1.0 <= timing["processed_per_real_token"] < 2.0  # packed rows (4-row multiples)
    # The 20 batches are the whole run and all primed: rows as long as its longest texts (read
    # here with the tokenizer itself, truncated at max_length), rounded up to a multiple of 8.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]

    def longest(texts):
        n = max(len(x) for x in tok(texts, truncation=True, max_length=128)["input_ids"])
        return -(-n // 8) * 8

    want = {
        "query": longest([r["query"] for r in records]),
        "doc": longest(
            [r["positive"] for r in records] + [n for r in records for n in r["negatives"]]
        ),
    }
    assert timing["packed_row_length"] == want and want["query"] < 128  # shorter than max_length
    # Rows per batch (the old behaviour) compile a program per new row count.
    per_batch = _train(
        tiny_model_dir,
        tmp_path / "per_batch",
        "--config.data.packing_estimate_batches=0",
        "--config.train.epochs=0",
        "--config.train.num_steps=2",  # the first 2 batches already need two row counts
    )
    assert per_batch["timing"]["train_step_programs"] > 1


def test_the_startup_heap_is_frozen_while_the_step_compiles(tiny_model_dir, tmp_path, monkeypatch):
    """The training loop freezes what is alive at its start (modules, model, tokenizer) for the
    cyclic collector, so the full collections that tracing the step sets off do not walk it (~1 s
    of a MiniLM step's trace), and unfreezes it when the loop ends: nothing stays frozen."""
    import gc

    from gte_jax import train
    from gte_jax.config import load_config
    from gte_jax.training import loop

    config = load_config(str(REPO / "configs" / "finetune.py"))
    config.model.init_from = str(tiny_model_dir)
    config.data.train_files = str(DATA)
    config.data.max_length, config.train.batch_size, config.train.num_steps = 64, 16, 2
    config.train.progress_bar, config.export.enabled = False, False
    config.checkpoint.async_save = False
    config.model.dropout = 0.0  # the heap, not dropout: its random bits are ~1/3 of a compile
    frozen: list[int] = []
    track = train.hooks_lib.track_finite

    def counting(tracker, metrics):
        frozen.append(gc.get_freeze_count())
        return track(tracker, metrics)

    monkeypatch.setattr(train.hooks_lib, "track_finite", counting)
    assert gc.get_freeze_count() == 0
    summary = loop.train_stage(config, tmp_path / "run")
    assert summary["steps"] == 2 and len(frozen) == 2
    assert all(n > 10_000 for n in frozen), frozen  # the modules and the model, at least
    assert gc.get_freeze_count() == 0


def test_a_callers_frozen_heap_stays_frozen():
    """The loop's freeze must not thaw what a caller froze itself (gc.unfreeze() is global): with
    a frozen heap on entry, frozen_heap() changes nothing; on a thawed one it freezes and thaws.
    Asked of the caller's own objects, not of the freeze count: another thread (pytest-xdist's,
    an executor's) may free frozen objects meanwhile, and the count drops by those."""
    import gc

    from gte_jax.training.loop import frozen_heap

    def collectable(objects):  # in a GC generation, i.e. not frozen
        ids = {id(o) for o in gc.get_objects()}
        return [id(o) in ids for o in objects]

    assert gc.get_freeze_count() == 0
    before = [[] for _ in range(100)]
    with frozen_heap():
        inside = gc.get_freeze_count()
        assert not any(collectable(before))
    assert inside > 10_000 and gc.get_freeze_count() == 0
    assert all(collectable(before))
    mine = [[] for _ in range(100)]
    gc.freeze()
    try:
        with frozen_heap():
            assert not any(collectable(mine))
            assert gc.get_freeze_count() > 10_000
        assert not any(collectable(mine))  # still frozen: the caller's
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
    assert all(collectable(mine))
