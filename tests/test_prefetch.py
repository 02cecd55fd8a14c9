"""Prefetch (gte_jax/data/prefetch.py): the same batches and states as without it, the consumer's
state for resume, the producer's errors raised in the consumer, no agreement off the loop thread."""

from __future__ import annotations

import json
import threading
import time
import traceback

import numpy as np
import pytest

from gte_jax.data.batching import PairBatchIterator
from gte_jax.data.pipeline import DEMO_DIR
from gte_jax.data.prefetch import Prefetcher, with_prefetch
from gte_jax.data.sources import PairRecord, Source, SourceOptions, from_files, from_records


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


def _iterator(tokenizer, sources=None, **kw):
    triplets = [
        PairRecord(f"question {i} " * (1 + i % 7), f"answer {i % 5}", (f"wrong {i % 3}",))
        for i in range(10)
    ]
    sources = sources or [
        from_files("bible", DEMO_DIR / "bible_kjv_web_ot.jsonl"),
        from_files("chat", DEMO_DIR / "chat_qa.jsonl", options=SourceOptions("query: ", "")),
        from_records("tri", triplets, options=SourceOptions(batch_size=4, num_negatives=2)),
    ]
    args = dict(global_batch_size=8, seed=1, alpha=0.0, query_max_length=32, doc_max_length=64)
    return PairBatchIterator(sources, tokenizer, **{**args, **kw})


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], key)


def _filled(it: Prefetcher) -> None:
    """Waits until the thread has drawn ahead (its queue full), so a state taken now would be
    the producer's if the wrapper returned that."""
    for _ in range(200):
        if it._queue is not None and it._queue.full():
            return
        time.sleep(0.01)
    raise AssertionError("the prefetch thread did not fill its queue")


@pytest.mark.parametrize(
    "kw",
    [
        {},
        # Packed rows fitted to 2 primed batches: later longer texts raise the row length in
        # the middle of the run (state the consumer changes).
        {"packing": True, "pack_row_length": 0, "prime": 2},
    ],
    ids=["padded", "packed"],
)
def test_prefetch_gives_the_same_batches_and_states_as_without(tokenizer, kw):
    kw = dict(kw)
    prime = kw.pop("prime", 0)
    plain, fetched = _iterator(tokenizer, **kw), _iterator(tokenizer, **kw)
    plain.prime_row_floor(prime)
    fetched = with_prefetch(fetched, 2)
    fetched.prime_row_floor(prime)
    states = []
    for step in range(12):
        expected, got = next(plain), next(fetched)
        _same(expected, got)
        _filled(fetched)
        state = json.loads(json.dumps(fetched.get_state()))
        assert state == plain.get_state(), step
        states.append(state)
    assert fetched.stats() == plain.stats()
    if kw.get("packing"):  # the consumer raised the row length mid-run (state of finish)
        assert states[0]["row_length"] != states[-1]["row_length"]

    # Resume from a mid-run state into a prefetching iterator that had run ahead elsewhere.
    resumed = with_prefetch(_iterator(tokenizer, **kw), 2)
    resumed.prime_row_floor(prime)
    for _ in range(3):
        next(resumed)
    _filled(resumed)
    resumed.set_state(states[4])
    reference = _iterator(tokenizer, **kw)
    reference.set_state(states[4])
    for _ in range(8):
        _same(next(reference), next(resumed))
        assert resumed.get_state() == reference.get_state()
    resumed.close()
    fetched.close()


def test_lengths_are_agreed_in_the_thread_in_batch_order_without_jax(tokenizer, monkeypatch):
    """The agreement across processes runs ahead in the prefetch thread (so the step never waits
    for it), once per batch in batch order, and makes no JAX call (a device collective from a
    thread could interleave differently with the step's on different hosts)."""
    import jax

    threads, seen = [], []

    def agree(x):
        threads.append(threading.current_thread().name)
        seen.append(np.asarray(x).copy())
        return x

    def no_jax(*args, **kwargs):
        raise AssertionError("the prefetch thread called JAX")

    it = with_prefetch(_iterator(tokenizer, agree_lengths=agree), 3)
    monkeypatch.setattr(jax, "device_put", no_jax)
    monkeypatch.setattr(jax, "jit", no_jax)
    got = [next(it) for _ in range(6)]
    _filled(it)
    it.close()
    assert threads and set(threads) == {"gte-jax-prefetch"}
    ref_seen = []

    def ref_agree(x):
        ref_seen.append(np.asarray(x).copy())
        return x

    ref = _iterator(tokenizer, agree_lengths=ref_agree)
    want = [next(ref) for _ in range(6)]
    for a, b in zip(want, got, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for a, b in zip(ref_seen, seen, strict=False):  # the same exchanges, in the same order
        np.testing.assert_array_equal(a, b)


def test_an_error_in_the_thread_is_raised_in_the_consumer(tokenizer):
    good = from_records("ok", [PairRecord(f"q {i}", f"d {i}") for i in range(16)])

    def broken_record(index: int) -> PairRecord:
        raise RuntimeError(f"record {index} cannot be read")

    broken = Source("broken", 16, broken_record)
    it = with_prefetch(_iterator(tokenizer, sources=[good, broken], alpha=0.0), 2)
    with pytest.raises(RuntimeError, match=r"record \d+ cannot be read") as info:
        for _ in range(50):
            next(it)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "broken_record" in frames and "prepare" in frames  # the thread's own traceback
    assert it._thread is None  # stopped


def test_prefetch_zero_is_the_iterator_itself(tokenizer):
    it = _iterator(tokenizer)
    assert with_prefetch(it, 0) is it
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(it, 0)
