"""TFDS builders: build from fixture files in the original formats, read back via as_data_source."""

from __future__ import annotations

import json
import pathlib

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from data_pipelines import LocalPairs, LocalPairsConfig, build_dataset  # noqa: E402
from data_pipelines.catalog import catalog_source  # noqa: E402
from data_pipelines.squad import sentence_at  # noqa: E402
from gte_jax.data.sources import FieldMap  # noqa: E402

FIX = pathlib.Path(__file__).parent / "fixtures"


def _records(name, data_dir, split="train"):
    ds = tfds.builder(name, data_dir=str(data_dir)).as_data_source(split=split)
    out = []
    for i in range(len(ds)):
        ex = ds[i]
        out.append(
            (
                ex["query"].decode(),
                ex["positive"].decode(),
                tuple(n.decode() for n in ex["negatives"]),
            )
        )
    return sorted(out)


def test_msmarco_triples(tmp_path):
    build_dataset("msmarco_triples", data_dir=tmp_path, manual_dir=FIX / "data_pipelines/msmarco")
    expected = []
    for line in (FIX / "data_pipelines/msmarco/triples.train.small.tsv").read_text().splitlines():
        cols = line.split("\t")
        if len(cols) == 3 and all(c.strip() for c in cols):
            expected.append((cols[0], cols[1], (cols[2],)))
    assert _records("msmarco_triples", tmp_path) == sorted(expected)
    # The same prepared data as a pair source, by TFDS name, with its field mapping.
    src = catalog_source(
        "msmarco_triples", data_dir=str(tmp_path), fields=FieldMap("query", "positive", "negatives")
    )
    assert len(src) == len(expected) and src.num_negatives == 1
    assert sorted(
        (src[i].query, src[i].positive, src[i].negatives) for i in range(len(src))
    ) == sorted(expected)


@pytest.mark.parametrize("config", ["sentence", "paragraph"])
def test_squad_pairs(tmp_path, config):
    build_dataset(
        f"squad_pairs/{config}", data_dir=tmp_path, manual_dir=FIX / "data_pipelines/squad"
    )
    for split, filename in [("train", "train-v1.1.json"), ("validation", "dev-v1.1.json")]:
        expected = []
        for article in json.loads((FIX / "data_pipelines/squad" / filename).read_text())["data"]:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    if not qa["question"].strip() or not qa["answers"]:
                        continue
                    ans = qa["answers"][0]
                    assert para["context"][ans["answer_start"] :].startswith(ans["text"])
                    pos = para["context"]
                    if config == "sentence":
                        pos = sentence_at(pos, ans["answer_start"])
                        assert ans["text"] in pos and pos in para["context"]
                    expected.append((qa["question"], pos.strip(), ()))
        assert _records(f"squad_pairs/{config}", tmp_path, split) == sorted(expected)


def test_nli_triplets(tmp_path):
    build_dataset("nli_triplets/snli", data_dir=tmp_path, manual_dir=FIX / "data_pipelines/snli")
    rows = []
    for line in (FIX / "data_pipelines/snli/snli_1.0_train.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    got = _records("nli_triplets/snli", tmp_path)
    assert got
    label = {(r["sentence1"], r["sentence2"]): r["gold_label"] for r in rows}
    premises_with_both = {
        p
        for p, _ in label
        if {"entailment", "contradiction"} <= {label[k] for k in label if k[0] == p}
    }
    assert {q for q, _, _ in got} == premises_with_both
    for premise, pos, negs in got:
        assert label[(premise, pos)] == "entailment"
        assert [label[(premise, n)] for n in negs] == ["contradiction"]


def test_local_pairs_builder_skips_bad_lines(tmp_path):
    cfg = LocalPairsConfig(
        name="broken",
        files={"train": [str(FIX / "broken_pairs.jsonl")]},
        max_text_chars=1000,
        instruction="query: ",
    )
    LocalPairs(
        config=cfg, data_dir=str(tmp_path), file_format="array_record"
    ).download_and_prepare()
    ds = LocalPairs(config=cfg, data_dir=str(tmp_path)).as_data_source(split="train")
    from gte_jax.data.sources import from_files

    direct = from_files("broken", FIX / "broken_pairs.jsonl", max_text_chars=1000)
    assert len(ds) == len(direct)
    assert sorted(ds[i]["query"].decode() for i in range(len(ds))) == sorted(
        direct[i].query for i in range(len(direct))
    )
    assert {ds[i]["instruction"] for i in range(len(ds))} == {b"query: "}
    # The build's bad-input counts travel with the data, into the run's source stats.
    from gte_jax.data.sources import COUNTS_FILE, from_tfds

    built = tmp_path / "local_pairs" / "broken" / "1.0.0"
    counts = json.loads((built / COUNTS_FILE).read_text())["splits"]["train"]["build"]
    assert counts == {k: direct.stats()[k] for k in ("read", "used", "skipped", "reasons")}
    assert counts["skipped"] > 0
    src = from_tfds("broken", "local_pairs/broken", data_dir=str(tmp_path), max_text_chars=1000)
    assert src.stats()["skipped_at_build"] == counts["skipped"]


def _short_and_long_rows() -> list[dict]:
    """60 records; every 9th has no negatives, every 7th a positive too long for max 40 chars."""
    rows = []
    for i in range(60):
        row = {"query": f"query {i}", "positive": f"positive {i}", "negatives": [f"neg {i}"]}
        if i % 9 == 4:
            row["negatives"] = []
        if i % 7 == 3:
            row["positive"] = "a long positive " * 5  # valid when built, too long when read
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def shortneg_dir(tmp_path_factory):
    from data_pipelines import LocalPairs, LocalPairsConfig

    tmp = tmp_path_factory.mktemp("shortneg")
    (tmp / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _short_and_long_rows()))
    cfg = LocalPairsConfig(name="shortneg", files={"train": [str(tmp / "x.jsonl")]})
    LocalPairs(config=cfg, data_dir=str(tmp), file_format="array_record").download_and_prepare()
    return tmp


def _counts_path(data_dir) -> pathlib.Path:
    from gte_jax.data.sources import COUNTS_FILE

    return pathlib.Path(data_dir) / "local_pairs" / "shortneg" / "1.0.0" / COUNTS_FILE


def _stored(data_dir) -> list[dict]:
    ds = tfds.builder("local_pairs/shortneg", data_dir=str(data_dir)).as_data_source("train")
    return [
        {"query": ds[i]["query"].decode(), "positive": ds[i]["positive"].decode(),
         "negatives": [n.decode() for n in ds[i]["negatives"]]}
        for i in range(len(ds))
    ]  # fmt: skip


def test_builder_writes_the_counts_of_what_it_stored(shortneg_dir):
    """The counts beside the data are those of the stored records, and of the input rows."""
    from collections import Counter

    counts = json.loads(_counts_path(shortneg_dir).read_text())["splits"]
    stored = Counter(len(r["negatives"]) for r in _stored(shortneg_dir))
    rows = Counter(len(r["negatives"]) for r in _short_and_long_rows())
    assert stored == rows
    assert counts == {
        "train": {
            "num_records": 60,
            "negatives_histogram": {str(k): v for k, v in sorted(rows.items())},
            "build": {"read": 60, "used": 60, "skipped": 0, "reasons": {}},
        }
    }


def test_tfds_source_opens_from_counts_without_reading_records(shortneg_dir, monkeypatch):
    from gte_jax.data import sources

    def no_read(*args, **kwargs):
        raise AssertionError("opening read the records")

    monkeypatch.setattr(sources, "_scan", no_read)
    src = sources.from_tfds("sn", "local_pairs/shortneg", data_dir=str(shortneg_dir))
    short = sum(not r["negatives"] for r in _short_and_long_rows())
    assert (len(src), src.num_negatives, src.stats()["records_short_of_negatives"]) == (
        60, 1, short,
    )  # fmt: skip
    st = src.stats()
    assert (st["read"], st["used"], st["skipped"]) == (60, 60, 0)
    with pytest.raises(ValueError, match=r"no feature\(s\) \['question'\]"):
        sources.from_tfds(
            "sn", "local_pairs/shortneg", data_dir=str(shortneg_dir),
            fields=FieldMap("question", "positive"),
        )  # fmt: skip


def test_tfds_source_skips_records_bad_at_read_time(shortneg_dir):
    """Opened from counts, a record too long for this run's max_text_chars is found when read:
    skipped and counted once, and its index stands for the next valid stored record
    (cyclically), whatever was read before: the mixture stays a pure function of the index."""
    from gte_jax.data.sources import from_tfds

    stored = _stored(shortneg_dir)
    ok = [len(r["positive"]) <= 40 for r in stored]
    expected = []
    for i in range(len(stored)):
        j = i
        while not ok[j]:
            j = (j + 1) % len(stored)
        expected.append(stored[j]["query"])
    src = from_tfds("sn", "local_pairs/shortneg", data_dir=str(shortneg_dir), max_text_chars=40)
    assert len(src) == 60  # the α size is the stored count: nothing is read at opening
    # Read as a batch does (one read of a list of records), the skips found on the way.
    assert [r.query for r in src.many([*range(0, 60, 2), *range(1, 60, 2)])] == [
        *expected[0::2], *expected[1::2],
    ]  # fmt: skip
    assert src.stats()["skipped"] == 60 - sum(ok)
    src = from_tfds("sn", "local_pairs/shortneg", data_dir=str(shortneg_dir), max_text_chars=40)
    assert [src[i].query for i in reversed(range(60))] == expected[::-1]
    assert [src[i].query for i in range(60)] == expected
    st = src.stats()
    assert (st["read"], st["used"], st["skipped"]) == (60, sum(ok), 60 - sum(ok)) != (60, 60, 0)
    with pytest.raises(Exception, match=r"local_pairs/shortneg\[train\]:\d+: .*max_text_chars"):
        src = from_tfds(
            "sn", "local_pairs/shortneg", data_dir=str(shortneg_dir), max_text_chars=40,
            on_bad_input="error",
        )  # fmt: skip
        [src[i] for i in range(60)]


@pytest.mark.parametrize("counts", ["missing", "stale"])
def test_tfds_source_without_counts_reads_every_record(shortneg_dir, tmp_path, counts, caplog):
    """A dataset built before the counts were written (or whose counts do not match it) is read
    through at opening: bad records skipped and counted, not replaced, not in the α sizes."""
    import shutil

    from gte_jax.data.sources import from_tfds

    data_dir = tmp_path / "copy"
    shutil.copytree(shortneg_dir, data_dir)
    if counts == "missing":
        _counts_path(data_dir).unlink()
    else:
        text = _counts_path(data_dir).read_text().replace('"num_records": 60', '"num_records": 61')
        _counts_path(data_dir).write_text(text)
    rows = _short_and_long_rows()
    src = from_tfds("sn", "local_pairs/shortneg", data_dir=str(data_dir), max_text_chars=40)
    assert "reading all 60 records" in caplog.text
    good = [r for r in rows if len(r["positive"]) <= 40]
    assert len(src) == len(good)  # what the α mixture weights see
    st = src.stats()
    assert (st["read"], st["used"], st["skipped"]) == (60, len(good), 60 - len(good))
    got = sorted(src[i].query for i in range(len(src)))
    assert got == sorted(r["query"] for r in good)  # each valid record once: no stand-ins
    assert sorted(src[i].query for i in range(len(src))) == got  # a pure function of the index
    ids = [*range(1, len(src), 2), *range(0, len(src), 2)]
    assert src.many(ids) == [src[i] for i in ids]


def test_tfds_source_keeps_records_short_of_negatives(shortneg_dir):
    """For TFDS too: K is decided once, on the whole dataset; a record without
    negatives (anywhere, not only in the first 16) is kept with a masked negative, counted, and
    never raises mid-run."""
    import types

    from gte_jax.data.batching import PairBatchIterator
    from gte_jax.data.sources import from_tfds

    rows = {r["query"]: r for r in _short_and_long_rows()}
    src = from_tfds("sn", "local_pairs/shortneg", data_dir=str(shortneg_dir))
    assert len(src) == 60 and src.num_negatives == 1
    short = [q for q, r in rows.items() if not r["negatives"]]
    assert src.stats()["records_short_of_negatives"] == len(short) > 0

    it = PairBatchIterator([src], types.SimpleNamespace(pad_token_id=0), global_batch_size=6)
    masked = set()
    for _ in range(20):  # two epochs: every record drawn
        plan = it.next_plan()
        for q, negs, ok in zip(plan.queries, plan.negatives, plan.neg_valid, strict=True):
            assert ok.tolist() == [int(bool(rows[q]["negatives"]))]
            if ok[0]:
                assert negs == rows[q]["negatives"]
            else:
                masked.add(q)
    assert masked == set(short)


def test_pair_records_decoded_from_their_bytes_as_tfds_decodes_them(shortneg_dir, tmp_path):
    """Our builders' records are decoded straight from their Example bytes (faster): the same
    values TFDS's own decoding gives; other feature sets keep TFDS's decoding."""
    from gte_jax.data.sources import _pair_example_reader

    builder = tfds.builder("local_pairs/shortneg", data_dir=str(shortneg_dir))
    ds = builder.as_data_source("train")
    read = _pair_example_reader(ds, builder.info.features)
    ids = [7, 0, 59, 3, 3, 12]
    fast, ref = read(ids), ds.__getitems__(ids)
    assert [sorted(f) for f in fast] == [sorted(r) for r in ref]
    for f, r in zip(fast, ref, strict=True):
        assert [f[k] for k in ("query", "positive", "instruction")] == [
            r[k] for k in ("query", "positive", "instruction")
        ]
        assert f["negatives"] == list(r["negatives"])
    assert any(f["negatives"] for f in fast) and not all(f["negatives"] for f in read(range(60)))
    other = tfds.features.FeaturesDict({"query": tfds.features.Text()})
    assert _pair_example_reader(ds, other) is None


def test_mixture_over_read_time_skips_resumes_exactly(shortneg_dir, minilm_dir):
    """Bad records met while drawing (opened from counts) leave the batches a function of the
    sampler state: a run resumed from a mid-run state (in a fresh process's sources, which have
    met no bad record yet) draws the uninterrupted run's batches, and the counts include them."""
    import numpy as np
    from transformers import AutoTokenizer

    from gte_jax.data.batching import PairBatchIterator
    from gte_jax.data.sources import from_tfds

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)

    def iterator():
        src = from_tfds("sn", "local_pairs/shortneg", data_dir=str(shortneg_dir), max_text_chars=40)
        return PairBatchIterator([src], tokenizer, global_batch_size=8, doc_max_length=32)

    full = iterator()
    batches = [next(full) for _ in range(16)]  # two epochs of 60 records
    assert full.stats()["sn"]["skipped"] == sum(
        len(r["positive"]) > 40 for r in _stored(shortneg_dir)
    )
    first = iterator()
    for _ in range(6):
        next(first)
    resumed = iterator()
    resumed.set_state(json.loads(json.dumps(first.get_state())))
    for expected in batches[6:]:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], key)
