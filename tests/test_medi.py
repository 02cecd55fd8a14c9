"""MEDI (INSTRUCTOR's training data): the reader on a fixture in the original release's format
(one JSON list of {"query": [instruction, text], "pos": [...], "neg": [...], "task_name"}), one
source per task, and the α-sampler drawing one task per batch with each record's instructions."""

from __future__ import annotations

import json
import pathlib

import ml_collections
import pytest

from gte_jax.data.batching import PairBatchIterator
from gte_jax.data.pipeline import build_sources
from gte_jax.data.sources import from_medi, read_medi, skipped_records
from gte_jax.textio import InputError

MEDI = pathlib.Path(__file__).parent / "fixtures" / "medi" / "medi-data.json"
# What the fixture holds, counted by hand: valid records per task, and its four bad records.
VALID = {"bible_translation": 16, "chat_answers": 10, "news_lead": 12}
BAD = {  # index in the JSON list -> (task it is counted under, reason)
    5: ("bible_translation", "field 'query' must be [instruction, text]"),
    11: ("news_lead", "field 'pos'[1] (text) is empty"),
    17: ("", "field 'task_name' must be a non-empty string"),
    23: ("chat_answers", "'neg' instruction"),
}


def test_fixture_is_the_original_format():
    records = json.loads(MEDI.read_text())
    assert isinstance(records, list) and len(records) == sum(VALID.values()) + len(BAD)
    good = [r for i, r in enumerate(records) if i not in BAD]
    assert all(set(r) == {"query", "pos", "neg", "task_name"} for r in good)
    sides = [r[k] for r in good for k in ("query", "pos", "neg")]
    assert {len(side) for side in sides} == {2, 3}  # the README's [instruction, text, 0|1] too


def test_reader_counts_exactly_per_task():
    by_task, accounts = read_medi(MEDI)
    assert {t: len(r) for t, r in by_task.items()} == VALID
    skipped = {t: a.stats.skipped for t, a in accounts.items() if a.stats.skipped}
    expected: dict[str, int] = {}
    for task, _ in BAD.values():
        expected[task] = expected.get(task, 0) + 1
    assert skipped == expected
    for task, acct in accounts.items():
        assert acct.stats.read == acct.stats.used + acct.stats.skipped
        assert acct.stats.used == VALID.get(task, 0)
    raw = json.loads(MEDI.read_text())
    first = next(r for r in raw if r.get("task_name") == "news_lead")
    rec = by_task["news_lead"][0]
    assert (rec.instruction, rec.query) == tuple(first["query"][:2])
    assert (rec.doc_instruction, rec.positive) == tuple(first["pos"][:2])
    assert rec.negatives == (first["neg"][1],)


@pytest.mark.parametrize("index", sorted(BAD))
def test_bad_records_are_named_by_file_and_index(index, tmp_path):
    raw = json.loads(MEDI.read_text())
    good = [r for i, r in enumerate(raw) if i not in BAD]
    path = tmp_path / "medi-data.json"
    path.write_text(json.dumps(good[:3] + [raw[index]] + good[3:]))
    with pytest.raises(InputError) as err:
        read_medi(path, on_bad_input="error")
    assert f"{path}[3]" in str(err.value)
    assert BAD[index][1] in str(err.value)


def test_broken_json_is_named_by_file_line_and_column(tmp_path):
    path = tmp_path / "medi-data.json"
    path.write_text('[\n {"query": ["a", "b"],\n  "pos": ["c" "d"]}\n]')
    with pytest.raises(InputError, match=rf"{path}:3:\d+: not valid JSON"):
        read_medi(path)
    path.write_text('{"query": ["a", "b"]}')
    with pytest.raises(InputError, match="one JSON list"):
        read_medi(path)


def test_one_source_per_task_from_the_config():
    data = ml_collections.ConfigDict(
        {
            "train_files": "",
            "sources": [{"name": "medi", "path": str(MEDI), "format": "medi"}],
            "data_dir": "",
            "on_bad_input": "skip",
            "max_text_chars": 100_000,
        }
    )
    sources = build_sources(data)
    assert {s.name: len(s) for s in sources} == {f"medi/{t}": n for t, n in VALID.items()}
    assert all(s.num_negatives == 1 for s in sources)


def test_records_no_source_holds_are_counted(tmp_path):
    """Records without a usable task_name and the records of a task with no valid record make
    no source, yet every record of the file is used or counted as skipped (the run's
    skipped_records), and the log names them."""
    raw = json.loads(MEDI.read_text())
    doomed = {"query": ["Represent the X: ", "q"], "pos": ["Represent the Y: ", ""], "neg": None}
    extra = [
        dict(doomed, task_name="all_bad"),  # an empty positive: its task has no valid record
        dict(doomed, task_name="all_bad", query="not a pair"),
        {"query": ["i", "q"], "pos": ["j", "p"], "neg": ["j", "n"], "task_name": 7},  # no task
    ]
    path = tmp_path / "medi-data.json"
    path.write_text(json.dumps(raw + extra))
    sources = from_medi("medi", path)
    assert {s.name for s in sources} == {f"medi/{t}" for t in VALID}
    stats = {s.name: s.stats() for s in sources}
    used = sum(st["used"] for st in stats.values())
    assert used == sum(VALID.values())
    # Every record either trains or is counted: the file's length, independently of the reader.
    assert used + skipped_records(stats) == len(raw) + len(extra)
    assert skipped_records(stats) == len(BAD) + len(extra)
    unattributed = stats[sources[0].name]["unattributed"]
    assert unattributed["medi/all_bad"]["skipped"] == 2
    assert unattributed["medi (no usable task_name)"]["skipped"] == 2  # index 17 and the last


def test_every_batch_is_one_task_with_its_records_instructions(minilm_dir):
    from gte_jax import hf

    sources = from_medi("medi", MEDI)
    instructions = {
        s.name: {(r.instruction, r.doc_instruction) for r in (s[i] for i in range(len(s)))}
        for s in sources
    }
    it = PairBatchIterator(
        sources, hf.load_tokenizer(minilm_dir), global_batch_size=8, include_prompt=False
    )
    drawn = set()
    for _ in range(12):
        plan = it.next_plan()
        assert len(set(plan.sources)) == 1  # one task per batch
        task = plan.sources[0]
        drawn.add(task)
        pairs = set(zip(plan.query_prefixes, plan.doc_prefixes, strict=True))
        assert pairs <= instructions[task]
        batch = it.materialize(plan)
        assert batch["query_pool_mask"].sum() < batch["query_attention_mask"].sum()
    assert drawn == set(instructions)
