"""Teacher scores: `gte-jax mine --teacher-scores` records the mining model's cosines, and the
data side carries them as ``teacher_scores`` [B, 1+K] (only when every record has them)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from gte_jax import cli, mining
from gte_jax.data.batching import PairBatchIterator
from gte_jax.data.sources import PairRecord, SourceOptions, from_files, from_records
from gte_jax.encode import Embedder
from gte_jax.hf import load_tokenizer

DEMO = pathlib.Path(mining.__file__).parent / "resources" / "demo"
MAX_LENGTH = 32


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def mined(tmp_path_factory, minilm_dir):
    rows = [json.loads(x) for x in (DEMO / "bible_kjv_web_ot.jsonl").read_text().splitlines()]
    pairs = [(r["query"], r["positive"]) for r in rows[:6]]
    corpus = [r["positive"] for r in rows[:12]]
    tmp = tmp_path_factory.mktemp("mine")
    _write(tmp / "pairs.jsonl", [{"query": q, "positive": p} for q, p in pairs])
    _write(tmp / "corpus.jsonl", [{"text": t} for t in corpus])
    out = tmp / "mined.jsonl"
    argv = ["mine", "--model", str(minilm_dir), "--pairs", str(tmp / "pairs.jsonl")]
    argv += ["--corpus", str(tmp / "corpus.jsonl"), "--output", str(out), "--num-negatives", "3"]
    argv += ["--max-length", str(MAX_LENGTH), "--candidates", "4", "--teacher-scores"]
    assert cli.main(argv) == 0
    return out, [json.loads(x) for x in out.read_text().splitlines()]


def test_mined_scores_are_the_models_cosines(mined, minilm_dir):
    _, records = mined
    embedder = Embedder.from_pretrained(minilm_dir)

    def unit(texts):
        x = embedder.encode(texts, batch_size=64, max_length=MAX_LENGTH).astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    tol = 384 * np.finfo(np.float32).eps  # a float32 dot product over D = 384
    for r in records:
        q = unit([r["query"]])[0]
        assert abs(r["pos_score"] - float(unit([r["positive"]])[0] @ q)) < tol
        assert len(r["neg_scores"]) == len(r["negatives"]) > 0
        np.testing.assert_allclose(r["neg_scores"], unit(r["negatives"]) @ q, atol=tol)


def test_the_batch_carries_teacher_scores_from_the_mined_file(mined, minilm_dir):
    path, records = mined
    tokenizer = load_tokenizer(minilm_dir)
    src = from_files("mined", path, options=SourceOptions(num_negatives=3))
    it = PairBatchIterator(
        [src], tokenizer, global_batch_size=4, query_max_length=32, doc_max_length=32
    )
    plan = it.next_plan()
    batch = it.materialize(plan)
    by_query = {r["query"]: r for r in records}
    want = []
    for q in plan.queries:
        r = by_query[q]
        row = [r["pos_score"], *r["neg_scores"]][:4]
        want.append(row + [0.0] * (4 - len(row)))
    assert batch["teacher_scores"].shape == (4, 4) and batch["teacher_scores"].dtype == np.float32
    np.testing.assert_allclose(batch["teacher_scores"], np.asarray(want, np.float32))


def test_no_key_without_scores_and_bad_scores_are_skipped(tmp_path, minilm_dir):
    tokenizer = load_tokenizer(minilm_dir)
    src = from_records("plain", [PairRecord(f"q {i}", f"d {i}", ("n",)) for i in range(4)])
    it = PairBatchIterator([src], tokenizer, global_batch_size=4, query_max_length=16,
                           doc_max_length=16)  # fmt: skip
    assert "teacher_scores" not in it.materialize(it.next_plan())
    rows = [
        {"query": "a", "positive": "b", "negatives": ["c"], "pos_score": 0.5, "neg_scores": [0.1]},
        {"query": "a", "positive": "b", "negatives": ["c"], "pos_score": 0.5, "neg_scores": []},
        {"query": "a", "positive": "b", "negatives": ["c"], "pos_score": "x", "neg_scores": [0.1]},
    ]
    _write(tmp_path / "s.jsonl", rows)
    src = from_files("s", tmp_path / "s.jsonl")
    assert len(src) == 1 and src.stats()["skipped"] == 2
    assert src[0].teacher_scores == (0.5, 0.1)
