"""Sources: bad-input policies and accounting, TSV / Parquet / JSONL readers."""

from __future__ import annotations

import json
import logging
import pathlib
import re

import pytest

from gte_jax.data.sources import FieldMap, from_files
from gte_jax.textio import InputError

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "broken_pairs.jsonl"
MAX_CHARS = 1000


def _independent_check(path: pathlib.Path) -> tuple[list[int], list[int]]:
    """(good line numbers, bad line numbers) by a plain reading of the rules."""
    good, bad = [], []
    for no, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            texts = [row["query"], row["positive"], *row.get("negatives", [])]
            ok = all(isinstance(t, str) and t.strip() and len(t) <= MAX_CHARS for t in texts)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError):
            ok = False
        (good if ok else bad).append(no)
    return good, bad


def test_skip_policy_counts_and_reports_file_line(caplog):
    good, bad = _independent_check(FIXTURE)
    assert good and bad
    with caplog.at_level(logging.WARNING, logger="gte_jax.data.sources"):
        src = from_files("broken", FIXTURE, max_text_chars=MAX_CHARS)
    st = src.stats()
    assert st["read"] == st["used"] + st["skipped"]
    assert (st["used"], st["skipped"]) == (len(good), len(bad))
    assert len(src) == len(good)
    lines = FIXTURE.read_bytes().split(b"\n")
    for i in range(len(src)):  # the kept records are the good lines, in file order
        assert json.loads(lines[good[i] - 1])["query"] == src[i].query
    # The first few are reported with file:line.
    assert f"{FIXTURE}:{bad[0]}:" in caplog.text


def test_error_policy_raises_with_file_line():
    _, bad = _independent_check(FIXTURE)
    with pytest.raises(InputError, match=rf"{FIXTURE.name}:{bad[0]}:"):
        from_files("broken", FIXTURE, on_bad_input="error", max_text_chars=MAX_CHARS)


def test_truncated_json_line_is_reported_whole(tmp_path, caplog):
    """json's messages stop at "...starting at"; ours name file:line, the column and the cause."""
    path = tmp_path / "cut.jsonl"
    path.write_text('{"query": "q", "positive": "p"}\n{"query": "q", "positive": "cut sho\n')
    with caplog.at_level(logging.WARNING, logger="gte_jax.data.sources"):
        from_files("cut", path)
    want = (
        f"{path}:2: skipped bad record of source 'cut': malformed JSON (unterminated string "
        "starting at column 28; the line ends before the JSON object does)"
    )
    assert want in caplog.text
    with pytest.raises(InputError, match=re.escape(f"{path}:2: malformed JSON (un")):
        from_files("cut", path, on_bad_input="error")


@pytest.mark.parametrize(
    "setting,key",
    [("train_files", "data.train_files"), ("sources", "data.sources[1].path")],
)
def test_missing_file_names_the_setting_the_user_wrote(tmp_path, setting, key):
    from gte_jax.data.pipeline import build_sources, default_data_config

    good, missing = tmp_path / "good.jsonl", tmp_path / "missing.jsonl"
    good.write_text('{"query": "q", "positive": "p"}\n')
    data = default_data_config()
    if setting == "train_files":
        data.train_files = f"{good},{missing}"
    else:
        data.sources = [{"path": str(good)}, {"name": "second", "path": str(missing)}]
    with pytest.raises(FileNotFoundError) as info:
        build_sources(data)
    assert str(info.value) == f"{missing}: no such file; check {key} in the config"


def test_tsv_and_parquet_readers(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [("q one", "p one", "n one"), ("q two", "p two", "n two")]
    tsv = tmp_path / "t.tsv"
    tsv.write_text("".join("\t".join(r) + "\n" for r in rows) + "only one column\n")
    src = from_files("t", tsv, fields=FieldMap("0", "1", "2", None))
    assert [(r.query, r.positive, r.negatives) for r in (src[0], src[1])] == [
        (q, p, (n,)) for q, p, n in rows
    ]
    assert src.stats()["skipped"] == 1 and src.num_negatives == 1

    table = pa.table(
        {"question": [r[0] for r in rows] + [""], "answer": [r[1] for r in rows] + ["x"]}
    )
    pq.write_table(table, tmp_path / "t.parquet")
    src = from_files("p", tmp_path / "t.parquet", fields=FieldMap("question", "answer", None, None))
    assert [(src[i].query, src[i].positive) for i in range(len(src))] == [r[:2] for r in rows]
    st = src.stats()
    assert (st["read"], st["skipped"]) == (3, 1)


def _short_of_negatives_file(path: pathlib.Path) -> list[dict]:
    """10 records: 6 with two negatives, 2 with one, 2 with none."""
    rows = []
    for i in range(10):
        negs = [f"neg {i} a", f"neg {i} b"][: 2 if i < 6 else 1 if i < 8 else 0]
        rows.append({"query": f"query {i}", "positive": f"pos {i}", "negatives": negs})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_auto_k_keeps_and_counts_records_short_of_negatives(tmp_path, caplog):
    """Auto K is decided once (the most common count among records with negatives, logged);
    records with fewer are kept with their missing negatives masked, and counted."""
    from gte_jax.data.batching import make_plan
    from gte_jax.data.sources import SourceOptions

    rows = _short_of_negatives_file(tmp_path / "s.jsonl")
    with caplog.at_level(logging.INFO, logger="gte_jax.data.sources"):
        src = from_files("s", tmp_path / "s.jsonl")
    assert src.num_negatives == 2  # not 0 because some records lack negatives
    assert "num_negatives auto = 2" in caplog.text and "4 of 10 records" in caplog.text
    st = src.stats()
    assert (st["used"], st["num_negatives"], st["records_short_of_negatives"]) == (10, 2, 4)
    plan = make_plan(0, [("s", i) for i in range(10)], {"s": src}, src.num_negatives)
    for i, row in enumerate(rows):
        m = len(row["negatives"])
        assert plan.negatives[i][:m] == row["negatives"]
        assert plan.neg_valid[i].tolist() == [1] * m + [0] * (2 - m)
    # An explicit K keeps every record too (records without negatives used to be skipped).
    src3 = from_files("s", tmp_path / "s.jsonl", options=SourceOptions(num_negatives=3))
    assert len(src3) == 10 and src3.stats()["records_short_of_negatives"] == 10
    plan = make_plan(0, [("s", i) for i in range(10)], {"s": src3}, 3)
    assert plan.neg_valid.sum(axis=1).tolist() == [len(r["negatives"]) for r in rows]
