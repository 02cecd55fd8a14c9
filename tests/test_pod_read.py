"""Each host reads only its own rows (gte_jax/data/batching.py, docs/pod_input.md).

Simulated hosts (threads, each with its own sources and tokenizer) with v4-32's scattered layout
(4 hosts, 16 data blocks, host p holds blocks p, p + 4, p + 8, p + 12) are checked against one
process that reads every row of the same global batches:

- the records each host reads (counted in its source) are exactly those of its own rows;
- its batches (every key, text ids included) are the one-process batch's rows at their places,
  padded, packed and through the prefetch thread;
- text ids from exchanged hashes equal those :func:`assign_text_ids` gives the texts;
- the bad records found when read (a TFDS source checks each record when drawn) are counted in
  every host's summary as one process counts them;
- a read that fails on one host stops every host (no host waits at the next exchange).
"""

from __future__ import annotations

import collections
import copy
import random
import time

import numpy as np
import pytest
from simulated import process_tokenizer, run_processes

from gte_jax.data.batching import (
    NEG_PLACEHOLDER,
    PairBatchIterator,
    assign_text_ids,
    ids_from_hashes,
    text_hashes,
)
from gte_jax.data.layout import BatchLayout
from gte_jax.data.prefetch import with_prefetch
from gte_jax.data.sources import (
    BadInputAccounting,
    InputError,
    LazyChecked,
    PairRecord,
    RecordParser,
    Source,
    SourceOptions,
)

HOSTS, BLOCKS, BATCH = 4, 16, 32
LAYOUTS = [BatchLayout(tuple(range(p, BLOCKS, HOSTS)), BLOCKS) for p in range(HOSTS)]
ONE_PROCESS = BatchLayout(tuple(range(BLOCKS)), BLOCKS)


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from gte_jax import hf

    return hf.load_tokenizer(minilm_dir)


def _faq_records(n: int = 40) -> list[PairRecord]:
    """Duplicates within and across roles: queries repeat, some documents are other records'
    queries, negatives are other records' documents, and every third record has one negative
    of two (a placeholder in its row)."""
    records = []
    for i in range(n):
        query = f"what about topic {i % 13}?"
        doc = f"what about topic {(i + 5) % 13}?" if i % 4 == 0 else f"topic {i % 11} is this"
        negatives = tuple(f"topic {(i + j) % 11} is this" for j in (1, 2))
        records.append(PairRecord(query, doc, negatives[: 1 if i % 3 == 0 else 2]))
    return records


def _plain_records(n: int = 24) -> list[PairRecord]:
    return [PairRecord(f"short question {i % 9}", f"an answer, number {i % 7}") for i in range(n)]


def _counted(name: str, records: list[PairRecord], log: list, **options) -> Source:
    """An in-memory source that logs every record it reads: (source, index)."""

    def many(ids):
        log.extend((name, int(i)) for i in ids)
        return [records[int(i)] for i in ids]

    return Source(
        name, len(records), lambda i: many([i])[0], get_many=many,
        options=SourceOptions(**options),
        negatives_histogram=collections.Counter(len(r.negatives) for r in records),
        record_instructions=frozenset({("", "")}),
    )  # fmt: skip


def _sources(log: list) -> list[Source]:
    return [
        _counted("faq", _faq_records(), log, num_negatives=2),
        _counted("plain", _plain_records(), log, query_prefix="query: ", doc_prefix="passage: "),
    ]


def _iterator(tokenizer, sources, layout, **kw) -> PairBatchIterator:
    args = dict(global_batch_size=BATCH, seed=5, alpha=0.0, query_max_length=24)
    args.update(doc_max_length=32, include_prompt=False, layout=layout)
    return PairBatchIterator(sources, tokenizer, **{**args, **kw})


def _rebuilt(per_host: list[dict], key: str, like: np.ndarray) -> np.ndarray:
    """The hosts' local arrays of ``key`` put back at their blocks' places."""
    per = like.shape[0] // BLOCKS
    out = np.empty_like(like)
    for p, layout in enumerate(LAYOUTS):
        local = per_host[p][key]
        for i, b in enumerate(layout.blocks):
            out[b * per : (b + 1) * per] = local[i * per : (i + 1) * per]
    return out


def _assert_hosts_build(want: list[dict], got: list[list[dict]]) -> None:
    for step, batch in enumerate(want):
        for p in range(HOSTS):
            assert got[p][step].keys() == batch.keys(), step
        for key, value in batch.items():
            hosts = [got[p][step] for p in range(HOSTS)]
            assert all(h[key].dtype == value.dtype for h in hosts), key
            np.testing.assert_array_equal(_rebuilt(hosts, key, value), value, f"{key} {step}")


def _drawn(it: PairBatchIterator, steps: int) -> list[list[tuple[str, int]]]:
    sampler = copy.deepcopy(it.sampler)
    return [sampler.next() for _ in range(steps)]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_pod_layout_hosts_read_only_their_rows_and_build_the_one_process_batch(tokenizer, packing):
    steps, primed = 4, 2
    kw = dict(packing=packing, pack_row_length=0 if packing else None)
    one_log: list = []
    single = _iterator(tokenizer, _sources(one_log), ONE_PROCESS, **kw)
    single.prime_row_floor(primed)
    drawn = _drawn(single, steps)
    want = [next(single) for _ in range(steps)]
    assert not single.reads_own_rows
    # Duplicates within and across roles are in these batches, so the ids are not trivial.
    assert {src for b in drawn for src, _ in b} == {"faq", "plain"}  # K = 2 and K = 0
    faq = next(b for b in want if "neg_text_id" in b)
    ids = np.concatenate([faq["query_text_id"], faq["doc_text_id"], faq["neg_text_id"].ravel()])
    assert len(np.unique(ids)) < len(ids) // 2
    assert set(faq["query_text_id"]) & set(faq["doc_text_id"])
    assert (faq["neg_valid"] == 0).any()

    logs: list[list] = [[] for _ in range(HOSTS)]

    def host(p, agree, gather):
        it = _iterator(
            process_tokenizer(tokenizer), _sources(logs[p]), LAYOUTS[p], process_index=p,
            process_count=HOSTS, agree_lengths=agree, host_gather=gather, **kw,
        )  # fmt: skip
        assert it.reads_own_rows
        it.prime_row_floor(primed)
        return [next(it) for _ in range(steps)]

    got = run_processes(host, n=HOSTS, gather=True)
    _assert_hosts_build(want, got)
    batches = (drawn[:primed] if packing else []) + drawn  # priming reads them once more
    assert collections.Counter(one_log) == collections.Counter(d for b in batches for d in b)
    for p in range(HOSTS):
        rows = LAYOUTS[p].rows(BATCH)
        own = collections.Counter(b[j] for b in batches for j in rows)
        assert collections.Counter(logs[p]) == own, p  # its own rows' records, nothing else
        assert len(logs[p]) == len(one_log) // HOSTS


def test_pod_layout_hosts_read_only_their_rows_through_the_prefetch_thread(tokenizer):
    """Prefetch threads exchange the hashes ahead of the loop; the hosts' loops take their
    batches at different paces and then stop, and every ``close`` returns (each thread stops
    after the same batch, so none waits at an exchange the others never reach)."""
    steps = 5
    single = _iterator(tokenizer, _sources([]), ONE_PROCESS, packing=True)
    want = [next(single) for _ in range(steps)]

    def host(p, agree, gather):
        it = _iterator(
            process_tokenizer(tokenizer), _sources([]), LAYOUTS[p], process_index=p,
            process_count=HOSTS, agree_lengths=agree, host_gather=gather, packing=True,
        )  # fmt: skip
        fetched = with_prefetch(it, 2)
        pace = random.Random(p)
        out = []
        for _ in range(steps):
            time.sleep(pace.uniform(0, 0.05))
            out.append(next(fetched))
        fetched.close()
        return out, fetched.get_state()

    got = run_processes(host, n=HOSTS, timeout=120, gather=True)
    _assert_hosts_build(want, [batches for batches, _ in got])
    for _, state in got:  # resumes where the loop stopped, not where the thread did
        assert state["sampler"] == single.get_state()["sampler"]


def test_pod_layout_hosts_read_only_their_rows_ids_from_hashes_equal_ids_from_texts():
    rng = np.random.default_rng(0)
    pool = [f"text {i}" for i in range(30)] + ["", "ünïcode ✓", "text 1 "]
    b, k = 64, 3
    q = [pool[i] for i in rng.integers(0, len(pool), b)]
    d = [pool[i] for i in rng.integers(0, len(pool), b)]
    n = [[pool[i] for i in rng.integers(0, len(pool), k)] for _ in range(b)]
    n[0][2] = NEG_PLACEHOLDER
    want = assign_text_ids(q, d, n)
    hashes = [text_hashes(q), text_hashes(d), text_hashes([t for r in n for t in r])]
    got = ids_from_hashes(hashes[0], hashes[1], hashes[2].reshape(b, k))
    for w, g in zip(want, got, strict=True):
        assert g.dtype == np.int32
        np.testing.assert_array_equal(g, w)
    assert len(set(q) & set(d)) > 3 and len(np.unique(want[0])) < b  # within and across roles
    assert len(set(hashes[0].tolist()) | set(hashes[1].tolist())) == len(set(q) | set(d))


def _checked(name: str, raw: list[dict], log: list, policy: str = "skip") -> Source:
    """A source that checks each stored record when it is read, as a TFDS dataset opened from
    its counts does (:class:`LazyChecked`)."""
    acct = BadInputAccounting(name, policy)

    def read_many(ids):
        log.extend(int(i) for i in ids)
        return [raw[int(i)] for i in ids]

    get = LazyChecked(lambda i: read_many([i])[0], len(raw), RecordParser(), acct, name)
    return Source(
        name, len(raw), get, accounting=acct, get_many=lambda ids: get.many(ids, read_many),
        negatives_histogram={0: len(raw)}, record_instructions=frozenset({("", "")}),
    )  # fmt: skip


def _raw(n: int = 60) -> list[dict]:
    """Every fifth record has an empty positive, every seventh has no query."""
    raw = []
    for i in range(n):
        row = {"query": f"question {i % 17}", "positive": f"answer {i % 19}"}
        if i % 5 == 2:
            row["positive"] = " "
        if i % 7 == 3:
            del row["query"]
        raw.append(row)
    return raw


def test_pod_layout_hosts_read_only_their_rows_and_summaries_count_as_one_process(tokenizer):
    steps = 4
    single = _iterator(tokenizer, [_checked("web", _raw(), [])], ONE_PROCESS)
    want = [next(single) for _ in range(steps)]
    want_stats = single.stats()
    assert want_stats["web"]["skipped"] > 3 and len(want_stats["web"]["reasons"]) == 2

    def host(p, agree, gather):
        log: list = []
        it = _iterator(
            process_tokenizer(tokenizer), [_checked("web", _raw(), log)], LAYOUTS[p],
            process_index=p, process_count=HOSTS, agree_lengths=agree, host_gather=gather,
        )  # fmt: skip
        batches = [next(it) for _ in range(steps)]
        found_here = len(it.sources["web"].found_bad())
        return batches, found_here, it.stats(), it.stats()  # twice: each bad record once

    got = run_processes(host, n=HOSTS, gather=True)
    _assert_hosts_build(want, [g[0] for g in got])
    assert min(g[1] for g in got) < want_stats["web"]["skipped"]  # no host met them all alone
    for _, _, stats, again in got:
        assert stats == again == want_stats


def test_pod_layout_hosts_read_only_their_rows_a_failed_read_stops_every_host(tokenizer):
    """on_bad_input="error": the host that reads the bad record raises it; the others raise
    at the same batch's exchange instead of waiting for that host."""

    def host(p, agree, gather):
        it = _iterator(
            process_tokenizer(tokenizer), [_checked("web", _raw(), [], "error")], LAYOUTS[p],
            process_index=p, process_count=HOSTS, agree_lengths=agree, host_gather=gather,
        )  # fmt: skip
        try:
            for _ in range(20):
                next(it)
        except (InputError, RuntimeError) as e:
            return type(e).__name__, str(e), it.sampler.step
        return None

    got = run_processes(host, n=HOSTS, timeout=60, gather=True)
    assert all(g is not None for g in got)
    assert len({step for _, _, step in got}) == 1  # every host stopped at the same batch
    kinds = collections.Counter(kind for kind, _, _ in got)
    assert kinds["InputError"] >= 1 and kinds["InputError"] + kinds["RuntimeError"] == HOSTS
    for kind, message, _ in got:
        assert ("could not read its rows" in message) == (kind == "RuntimeError"), message


def test_pod_layout_hosts_read_only_their_rows_one_process_exchanges_nothing(tokenizer):
    def no_exchange(_):
        raise AssertionError("one process exchanged text hashes")

    log: list = []
    it = _iterator(tokenizer, _sources(log), ONE_PROCESS, host_gather=no_exchange)
    drawn = _drawn(it, 3)
    for _ in range(3):
        next(it)
    it.stats()
    assert not it.reads_own_rows
    assert collections.Counter(log) == collections.Counter(d for b in drawn for d in b)
