"""Text sources (single texts for the simcse / mntp stage kinds): JSONL / TXT / Parquet / TFDS
readers, bad-input accounting with file:line, the α mixture over them, and the stage-kind checks
that refuse data which do not fit the stage."""

from __future__ import annotations

import json
import logging
import re
import types

import numpy as np
import pytest

from gte_jax.data.batching import PairBatchIterator
from gte_jax.data.pipeline import build_iterator, build_sources, default_data_config
from gte_jax.data.sources import from_files, from_texts
from gte_jax.textio import InputError

MAX_CHARS = 40


def _jsonl_lines(field: str = "text") -> list[bytes]:
    """Good and bad lines of a JSONL text file; each bad one says why in ``BAD``."""
    return [
        json.dumps({field: "the first text"}).encode(),
        b"",  # blank: layout, not a record
        b'{"' + field.encode() + b'": "unterminated',  # malformed JSON
        json.dumps({"other": "no text field"}).encode(),
        json.dumps({field: "   "}).encode(),  # empty after stripping
        json.dumps({field: 7}).encode(),  # not a string
        b'{"' + field.encode() + b'": "caf\xe9"}',  # Latin-1 byte: not UTF-8
        json.dumps({field: "x" * (MAX_CHARS + 1)}).encode(),  # over-long
        json.dumps({field: "  the second text  "}).encode(),
    ]


GOOD_JSONL = ["the first text", "the second text"]
BAD_JSONL_LINES = [3, 4, 5, 6, 7, 8]


def _write(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("field", ["text", "body"])
def test_jsonl_text_source_skips_and_counts_bad_lines(tmp_path, caplog, field):
    path = _write(tmp_path / "texts.jsonl", _jsonl_lines(field))
    with caplog.at_level(logging.WARNING, logger="gte_jax.data.sources"):
        src = from_files("t", path, text_field=field, max_text_chars=MAX_CHARS)
    assert src.kind == "text"
    assert [src[i].query for i in range(len(src))] == GOOD_JSONL
    for i in range(len(src)):  # a text record: one string for both views
        assert src[i].positive is src[i].query and src[i].negatives == ()
    st = src.stats()
    assert (st["read"], st["used"], st["skipped"]) == (8, 2, 6)
    assert st["read"] == st["used"] + st["skipped"]
    logged = {int(m) for m in re.findall(rf"{re.escape(str(path))}:(\d+):", caplog.text)}
    assert logged == set(BAD_JSONL_LINES[:5])  # the first MAX_REPORTED bad records, by line
    assert "not valid UTF-8" in caplog.text and "malformed JSON" in caplog.text


def test_error_policy_names_file_and_line(tmp_path):
    path = _write(tmp_path / "texts.jsonl", _jsonl_lines())
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}:3: malformed JSON"):
        from_files("t", path, text_field="text", on_bad_input="error")
    txt = _write(tmp_path / "lines.txt", [b"fine", b"caf\xe9"])
    with pytest.raises(InputError, match=rf"{re.escape(str(txt))}:2: not valid UTF-8"):
        from_files("t", txt, text_field="text", on_bad_input="error")


def test_txt_source_one_text_per_line(tmp_path):
    lines = [b"first line", b"", b"   ", b"caf\xe9 au lait", b"y" * 50, b"  last line\r"]
    path = _write(tmp_path / "corpus.txt", lines)
    src = from_files("corpus", path, text_field="text", max_text_chars=MAX_CHARS)
    assert [src[i].query for i in range(len(src))] == ["first line", "last line"]
    st = src.stats()
    # Blank and whitespace-only lines are layout (not read); the bad UTF-8 and over-long lines are
    # read and skipped.
    assert (st["read"], st["used"], st["skipped"]) == (4, 2, 2)
    assert st["reasons"] == {"not valid UTF-8": 1, "line has 50 characters": 1}
    with pytest.raises(ValueError, match="TXT file holds single texts"):
        from_files("corpus", path)  # a TXT file is never read as pairs


def test_parquet_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["one", "", None, "two"]}), path)
    src = from_files("p", path, text_field="body")
    assert [src[i].query for i in range(len(src))] == ["one", "two"]
    assert src.stats()["skipped"] == 2


def test_tfds_text_source_reads_one_feature_and_skips_bad_records(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")  # noqa: F841
    from data_pipelines import LocalPairs, LocalPairsConfig
    from gte_jax.data.sources import from_tfds

    rows = [
        {"query": f"q{i}", "positive": ("long " * 20 if i % 4 == 1 else f"p{i}")} for i in range(12)
    ]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = LocalPairsConfig(name="txt", files={"train": [str(tmp_path / "x.jsonl")]})
    LocalPairs(
        config=cfg, data_dir=str(tmp_path), file_format="array_record"
    ).download_and_prepare()
    src = from_tfds(
        "t", "local_pairs/txt", data_dir=str(tmp_path), text_field="positive", max_text_chars=30
    )
    good = [r["positive"] for r in rows if len(r["positive"]) <= 30]
    # Opened from the build's counts: the stored 12; a too-long text found when read is skipped
    # and counted, and its index stands for the next valid record (gte_jax/data/sources.py).
    assert src.kind == "text" and len(src) == len(rows)
    assert set(src[i].query for i in range(len(src))) == set(good)
    assert all(src[i].positive == src[i].query for i in range(len(src)))
    st = src.stats()
    assert (st["read"], st["used"], st["skipped"]) == (12, len(good), 12 - len(good))


def test_text_sources_from_config_mix_by_alpha(tmp_path, minilm_dir):
    """data.text_files and data.sources[kind=text] build text sources; the α-sampler draws both;
    every example's query and doc are the same text with the same tokens and the same text id."""
    big = tmp_path / "big.txt"
    big.write_text("".join(f"sentence number {i} of the big file\n" for i in range(90)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"query": f"q {i}", "positive": f"answer {i}"}) + "\n" for i in range(10)
        )
    )
    data = default_data_config()
    data.text_files = str(big)
    data.sources = [
        {"name": "answers", "kind": "text", "path": str(pairs), "text_field": "positive",
         "query_prefix": "passage: "},
    ]  # fmt: skip
    data.batch_size = 4
    data.query_max_length = data.doc_max_length = 16
    sources = build_sources(data)
    assert [(s.name, s.kind, len(s)) for s in sources] == [
        ("big", "text", 90),
        ("answers", "text", 10),
    ]
    assert sources[1].options.doc_prefix == "passage: "  # one prefix for both views
    from gte_jax import hf

    tok = hf.load_tokenizer(minilm_dir)
    it = build_iterator(data, tokenizer=tok, sources=sources)
    drawn = []
    for _ in range(40):
        plan = it.next_plan()
        assert plan.queries == plan.docs and plan.query_prefixes == plan.doc_prefixes
        np.testing.assert_array_equal(plan.query_text_id, plan.doc_text_id)
        drawn.append(plan.sources[0])
        batch = it.materialize(plan)
        np.testing.assert_array_equal(batch["query_input_ids"], batch["doc_input_ids"])
        assert "neg_input_ids" not in batch
    # p ∝ n^0.5: 90 and 10 records -> 0.75 / 0.25; 40 draws see both.
    assert set(drawn) == {"big", "answers"}
    assert it.sampler.probs == pytest.approx([0.75, 0.25])


def test_text_source_config_errors(tmp_path):
    from gte_jax.errors import ConfigError

    data = default_data_config()
    data.sources = [{"kind": "sentences", "path": "x.txt"}]
    with pytest.raises(ConfigError, match="kind='sentences'"):
        build_sources(data)
    data.sources = [{"kind": "text", "path": "x.txt", "doc_prefix": "passage: "}]
    with pytest.raises(ConfigError, match="one prefix"):
        build_sources(data)


def test_duplicate_texts_share_an_id_and_only_with_each_other():
    src = from_texts("t", ["a", "b", "a", "c"])
    it = PairBatchIterator([src], types.SimpleNamespace(pad_token_id=0), global_batch_size=4)
    plan = it.next_plan()
    ids = {t: i for t, i in zip(plan.queries, plan.query_text_id, strict=True)}
    assert len(set(ids.values())) == 3
    np.testing.assert_array_equal(plan.query_text_id, plan.doc_text_id)
    np.testing.assert_array_equal(plan.query_text_id, [ids[t] for t in plan.docs])


# ------------------------------------------------------------------- stage kinds vs. their data


def _stage(kind: str, **data_fields):
    from gte_jax.defaults import stage_config

    config = stage_config()
    config.kind = kind
    for key, value in data_fields.items():
        setattr(config.data, key, value)
    return config


def _problems(config):
    from gte_jax.train import stage_kind_problems

    return "\n".join(stage_kind_problems(config))


def test_stage_kinds_refuse_data_that_do_not_fit():
    pairs, texts = {"train_files": "p.jsonl"}, {"text_files": "t.txt"}
    assert _problems(_stage("contrastive", **pairs)) == ""
    assert _problems(_stage("simcse", max_length=32, **texts)) == ""
    assert "['t'] are text sources" in _problems(_stage("contrastive", **texts))
    assert "['p'] are pair sources" in _problems(_stage("simcse", max_length=32, **pairs))
    assert "kind='mlm'" in _problems(_stage("mlm", **pairs))
    assert "['p'] are pair sources" in _problems(_stage("mntp", **pairs))
    assert _problems(_stage("mntp", **texts)) == ""  # its step: tests/test_llm2vec.py
    chunked_packed = _stage("mntp", packing=True, **texts)
    chunked_packed.train.gradcache, chunked_packed.train.gradcache_chunk_size = True, 8
    assert "one-chunk packed rows" in _problems(chunked_packed)
    chunked_packed.data.packing = False
    assert _problems(chunked_packed) == ""
    unequal = _stage("simcse", query_max_length=32, doc_max_length=64, **texts)
    assert "both views must be the same tokens" in _problems(unequal)
    no_dropout = _stage("simcse", max_length=32, **texts)
    no_dropout.model.dropout = 0.0
    assert "differ only by dropout" in _problems(no_dropout)
    no_dropout.model.dropout = -1.0
    no_dropout.model.train_dropout = False
    assert "differ only by dropout" in _problems(no_dropout)


def test_cli_refuses_simcse_on_pairs_with_exit_2(tmp_path, capsys):
    import pathlib

    from gte_jax.cli import main

    repo = pathlib.Path(__file__).resolve().parents[1]
    rc = main(
        ["train", "--config", str(repo / "configs" / "finetune.py"), "--workdir", str(tmp_path),
         "--config.kind=simcse", "--config.data.train_files=x.jsonl", "--config.data.max_length=32"]
    )  # fmt: skip
    assert rc == 2
    assert "are pair sources" in capsys.readouterr().err
    assert not (tmp_path / "config.json").exists()  # refused before anything was written
