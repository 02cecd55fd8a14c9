"""Tokenise / bucket / slice: the batch dict of docs/design.md, multi-process slicing, resume."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from simulated import process_tokenizer, run_processes

from gte_jax.data.batching import (
    PairBatchIterator,
    assign_text_ids,
    bucket_lengths,
    pick_bucket,
)
from gte_jax.data.pipeline import DEMO_DIR
from gte_jax.data.sources import PairRecord, SourceOptions, from_files, from_records
from gte_jax.sharding import global_batch


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


def _sources():
    triplets = [
        PairRecord(f"question {i} " * (1 + i % 7), f"answer {i % 5}", (f"wrong {i % 3}",))
        for i in range(10)
    ]
    return [
        from_files("bible", DEMO_DIR / "bible_kjv_web_ot.jsonl"),
        from_files(
            "chat",
            DEMO_DIR / "chat_qa.jsonl",
            options=SourceOptions("query: ", "passage: "),
        ),
        from_records("tri", triplets, options=SourceOptions(batch_size=4, num_negatives=2)),
    ]


def _iterator(tokenizer, **kw):
    args = dict(global_batch_size=8, seed=1, alpha=0.0, query_max_length=32, doc_max_length=64)
    return PairBatchIterator(_sources(), tokenizer, **{**args, **kw})


def test_batch_matches_design_table_and_tokenizer(tokenizer):
    it = _iterator(tokenizer, include_prompt=False)
    for _ in range(12):
        plan = it.next_plan()
        batch = it.materialize(plan)
        assert len(set(plan.sources)) == 1
        src = it.sources[plan.sources[0]]
        b = plan.size
        lq, ld = batch["query_input_ids"].shape[1], batch["doc_input_ids"].shape[1]
        for key, shape in [
            ("query_input_ids", (b, lq)),
            ("query_attention_mask", (b, lq)),
            ("query_pool_mask", (b, lq)),
            ("doc_input_ids", (b, ld)),
            ("doc_attention_mask", (b, ld)),
            ("query_text_id", (b,)),
            ("doc_text_id", (b,)),
            ("valid", (b,)),
        ]:
            assert batch[key].shape == shape and batch[key].dtype == np.int32, key
        # Unpadded ids are exactly the tokenizer's, prefix included.
        full_q = [p + q for p, q in zip(plan.query_prefixes, plan.queries, strict=True)]
        ref = tokenizer(full_q, truncation=True, max_length=32)["input_ids"]
        for i, row in enumerate(ref):
            n = batch["query_attention_mask"][i].sum()
            assert list(batch["query_input_ids"][i, :n]) == row
            assert np.all(batch["query_input_ids"][i, n:] == tokenizer.pad_token_id)
        # Bucket: the smallest of the bucket set that holds the longest text.
        assert lq == pick_bucket(max(map(len, ref)), bucket_lengths(32))
        assert lq in bucket_lengths(32) and ld in bucket_lengths(64)
        if src.num_negatives:
            k = src.num_negatives
            assert batch["neg_input_ids"].shape == (b, k, ld)
            assert batch["neg_attention_mask"].shape == (b, k, ld)
            assert batch["neg_text_id"].shape == (b, k)
        else:
            assert "neg_input_ids" not in batch
        # Pool masks (include_prompt=False): sentence-transformers' rule excludes the prompt's
        # tokens and the leading [CLS] (the prompt tokenised alone, minus its trailing [SEP]),
        # for queries and documents alike; everything else is pooled.
        for role, prefix in (("query", src.options.query_prefix), ("doc", src.options.doc_prefix)):
            expected = len(tokenizer(prefix)["input_ids"]) - 1 if prefix else 0
            excluded = (batch[f"{role}_attention_mask"] - batch[f"{role}_pool_mask"]).sum(axis=1)
            assert np.all(excluded == expected), role
            assert np.all(batch[f"{role}_pool_mask"] <= batch[f"{role}_attention_mask"])
            assert np.all(batch[f"{role}_pool_mask"][:, : max(expected, 1)][..., :expected] == 0)


def test_text_ids_equal_iff_identical_strings():
    q = ["a", "b", "a", "c"]
    d = ["c", "x", "b", "y"]
    n = [["x", "a"], ["z", "z"], ["b", "q"], ["y", "a"]]
    qi, di, ni = assign_text_ids(q, d, n)
    texts = q + d + [t for row in n for t in row]
    ids = np.concatenate([qi, di, ni.reshape(-1)])
    for (ta, ia), (tb, ib) in itertools.combinations(zip(texts, ids, strict=True), 2):
        assert (ta == tb) == (ia == ib)


def test_bucket_lengths_are_tight():
    for max_len in (16, 100, 128, 512):
        buckets = bucket_lengths(max_len)
        assert buckets[-1] == max_len and list(buckets) == sorted(set(buckets))
        for length in range(1, max_len + 1):
            b = pick_bucket(length, buckets)
            assert length <= b and (b == buckets[0] or b < 2 * length)


@pytest.mark.parametrize("multiple", [8, 16, 32])
def test_bucket_multiples_pad_less_than_one_multiple(multiple):
    for max_len in (16, 100, 128, 512):
        buckets = bucket_lengths(max_len, multiple=multiple)
        assert buckets[-1] == max_len and list(buckets) == sorted(set(buckets))
        assert all(b % multiple == 0 for b in buckets[:-1]) and buckets[0] >= min(16, max_len)
        for length in range(1, max_len + 1):
            b = pick_bucket(length, buckets)
            assert length <= b and (b == buckets[0] or b - length < multiple)


def test_bucket_multiple_reaches_the_batch(tokenizer):
    it = _iterator(tokenizer, bucket_multiple=8)
    for _ in range(6):
        batch = next(it)
        for role in ("query", "doc"):
            mask = batch[f"{role}_attention_mask"]
            longest = int(mask.sum(axis=1).max())
            assert mask.shape[1] % 8 == 0 and mask.shape[1] >= longest
            assert mask.shape[1] - longest < 8 or mask.shape[1] == 16  # 16: the smallest bucket


def test_two_processes_split_the_global_batch(tokenizer):
    steps = 10
    single = _iterator(tokenizer)
    ref = []
    for _ in range(steps):
        plan = single.next_plan()
        ref.append((plan.sources[0], single.materialize(plan)))

    def run(p: int, agree):
        it = _iterator(
            process_tokenizer(tokenizer), process_index=p, process_count=2, agree_lengths=agree
        )
        batches = []
        for _ in range(steps):
            plan = it.next_plan()
            batches.append((plan.sources[0], it.materialize(plan)))
        return batches

    out = run_processes(run)
    for step in range(steps):
        (s0, b0), (s1, b1), (sr, br) = out[0][step], out[1][step], ref[step]
        assert s0 == s1 == sr  # same source sequence everywhere
        half = br["valid"].shape[0] // 2
        assert b0["valid"].shape[0] == b1["valid"].shape[0] == half
        assert b0.keys() == b1.keys() == br.keys()
        for key in br:  # disjoint contiguous slices that together are the global batch
            np.testing.assert_array_equal(np.concatenate([b0[key], b1[key]]), br[key], key)


def test_resume_through_json_continues_exactly(tokenizer):
    ref = _iterator(tokenizer)
    full = [next(ref) for _ in range(14)]
    first = _iterator(tokenizer)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    resumed = _iterator(tokenizer)
    resumed.set_state(state)
    for expected in full[5:]:
        got = next(resumed)
        assert got.keys() == expected.keys()
        for key in got:
            np.testing.assert_array_equal(got[key], expected[key])
    stats = resumed.stats()
    assert sum(s["drawn_batches"] for s in stats.values()) == 14
    # The continuation crossed an epoch boundary of the small triplet source.
    assert stats["tri"]["epoch"] > state["sampler"]["sources"]["tri"]["epoch"]


def test_global_batch_shards_batch_axis_over_data(tokenizer):
    import jax

    if jax.device_count() < 8:
        pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
    mesh = jax.make_mesh((8,), ("data",))
    it = _iterator(tokenizer)
    local = next(it)
    glob = global_batch(local, mesh)
    for key, value in local.items():
        assert glob[key].shape == value.shape
        np.testing.assert_array_equal(np.asarray(glob[key]), value)
        assert len(glob[key].sharding.device_set) == 8
        assert glob[key].sharding.spec[0] == "data"


@pytest.mark.parametrize("packing", [False, True])
def test_records_short_of_negatives_carry_a_validity_mask(tokenizer, packing):
    """Records with fewer than K negatives are kept; the batch has K slots
    per example and ``neg_valid`` [B, K] marks the real ones (both layouts)."""
    records = [
        PairRecord(f"question {i}", f"answer {i}", tuple(f"wrong {i} {j}" for j in range(i % 4)))
        for i in range(8)
    ]
    src = from_records("short", records, options=SourceOptions(num_negatives=3))
    assert src.stats()["records_short_of_negatives"] == 6  # 0, 1 or 2 negatives of 3
    it = PairBatchIterator(
        [src], tokenizer, global_batch_size=8, query_max_length=32, doc_max_length=32,
        packing=packing,
    )  # fmt: skip
    plan = it.next_plan()
    batch = it.materialize(plan)
    by_query = {r.query: r for r in records}
    want = [[int(j < len(by_query[q].negatives)) for j in range(3)] for q in plan.queries]
    np.testing.assert_array_equal(batch["neg_valid"], want)
    assert batch["neg_valid"].dtype == np.int32
    key = "neg_slot_index" if packing else "neg_input_ids"
    assert batch[key].shape[:2] == (8, 3)
    for i, q in enumerate(plan.queries):  # the real negatives come first, in record order
        assert plan.negatives[i][: len(by_query[q].negatives)] == list(by_query[q].negatives)
