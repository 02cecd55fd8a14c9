"""Hard-negative mining: the rules against a NumPy re-implementation, the guards, the CLI."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections import Counter

import numpy as np
import pytest

from gte_jax import cli, mining
from gte_jax.commands import mine as mine_command
from gte_jax.encode import Embedder
from gte_jax.ranges import MINE_RANGES

DEMO = pathlib.Path(mining.__file__).parent / "resources" / "demo"
MAX_LENGTH = 32  # short texts keep the test fast; both sides use the same embedder settings


@pytest.fixture(scope="module")
def embedder(minilm_dir) -> Embedder:
    return Embedder.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def data():
    rows = [json.loads(x) for x in (DEMO / "bible_kjv_web_ot.jsonl").read_text().splitlines()]
    pairs = [(r["query"], r["positive"]) for r in rows[:10]]
    # The corpus holds the pairs' own positives and queries (rules must drop them) + distractors.
    corpus = [r["positive"] for r in rows[:40]] + [q for q, _ in pairs[:3]]
    return pairs, corpus


def _reference(embedder, pairs, corpus, k, skip_top, max_similarity):
    """The module docstring's rules on a full NumPy similarity matrix."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    enc = lambda t: unit(embedder.encode(t, batch_size=64, max_length=MAX_LENGTH))  # noqa: E731
    q, p, c = enc([a for a, _ in pairs]), enc([b for _, b in pairs]), enc(corpus)
    sims = q.astype(np.float64) @ c.T.astype(np.float64)
    out = []
    for i, (query, positive) in enumerate(pairs):
        order = np.argsort(-sims[i], kind="stable")
        ranked = [j for j in order if corpus[j] not in (query, positive)]
        limit = max_similarity * float(q[i] @ p[i])
        out.append([corpus[j] for j in ranked[skip_top:] if sims[i, j] <= limit][:k])
    return out, sims


def _mine(embedder, pairs, corpus, **settings):
    config = mining.MiningConfig(**settings)
    return mining.mine_hard_negatives(
        embedder, pairs, corpus, config, max_length=MAX_LENGTH, batch_size=64
    )


def test_rules_match_numpy_reference(embedder, data):
    pairs, corpus = data
    no_guard = float("inf")
    top5 = _mine(embedder, pairs, corpus, num_negatives=5, perc_pos=None)
    ref5, _ = _reference(embedder, pairs, corpus, 5, 0, no_guard)
    assert top5 == ref5
    for (query, positive), negs in zip(pairs, top5, strict=True):
        assert len(negs) == 5 and positive not in negs and query not in negs
        assert len(set(negs)) == 5
    # skip-top: the same ranking, shifted by R.
    skipped = _mine(embedder, pairs, corpus, num_negatives=3, skip_top=2, perc_pos=None)
    assert skipped == [negs[2:5] for negs in top5]


def test_false_negative_guard(embedder, data):
    pairs, corpus = data
    x = 0.5  # paraphrase pairs: sim(q, pos) ~ 0.9, so the guard drops the closest verses
    guarded = _mine(embedder, pairs, corpus, num_negatives=4, perc_pos=x)
    ref, sims = _reference(embedder, pairs, corpus, 4, 0, x)
    assert guarded == ref
    position = {t: j for j, t in enumerate(corpus)}
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    q = unit(embedder.encode([a for a, _ in pairs], max_length=MAX_LENGTH))
    p = unit(embedder.encode([b for _, b in pairs], max_length=MAX_LENGTH))
    dropped_any = False
    for i, negs in enumerate(guarded):
        limit = x * float(q[i] @ p[i])
        assert all(sims[i, position[t]] <= limit + 1e-6 for t in negs)
        others = [j for j, t in enumerate(corpus) if t not in pairs[i]]
        dropped_any |= bool((sims[i, others] > limit).any())
    assert dropped_any, "the guard never fired: the test data no longer exercises it"


def test_all_positives_of_a_query_are_excluded(embedder):
    # The same query twice with two positives: neither positive is a negative of either pair.
    pairs = [
        ("the lord is my shepherd", "a shepherd cares for sheep"),
        ("the lord is my shepherd", "the lord guides me"),
    ]
    corpus = ["a shepherd cares for sheep", "the lord guides me", "stock prices fell", "rain"]
    negs = _mine(embedder, pairs, corpus, num_negatives=4, perc_pos=None)
    assert [sorted(n) for n in negs] == [["rain", "stock prices fell"]] * 2


def _write(path: pathlib.Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_cli_mine(tmp_path, minilm_dir, data, capsys):
    pairs, corpus = data
    _write(tmp_path / "pairs.jsonl", [{"query": q, "positive": p} for q, p in pairs])
    _write(tmp_path / "corpus.jsonl", [{"_id": str(i), "text": t} for i, t in enumerate(corpus)])
    out = tmp_path / "mined.jsonl"
    rc = cli.main(
        ["mine", "--model", str(minilm_dir), "--pairs", str(tmp_path / "pairs.jsonl")]
        + ["--corpus", str(tmp_path / "corpus.jsonl"), "--output", str(out)]
        + ["--num-negatives", "3", "--skip-top", "1", "--max-similarity", "0.95"]
        + ["--max-length", str(MAX_LENGTH), "--candidates", "6"]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert summary["pairs_read"] == summary["pairs_written"] == len(records) == len(pairs)
    assert [(r["query"], r["positive"]) for r in records] == pairs
    assert summary["pairs_with_fewer_than_k"] == sum(len(r["negatives"]) < 3 for r in records)
    by_source = {s: 0 for s in mining.NEGATIVE_SOURCES}
    for r in records:
        assert set(r) == {"query", "positive", "negatives", "negatives_source"}
        assert len(r["negatives"]) == len(r["negatives_source"]) <= 3
        assert r["positive"] not in r["negatives"] and r["query"] not in r["negatives"]
        assert set(r["negatives"]) <= set(corpus) and len(set(r["negatives"])) == len(
            r["negatives"]
        )
        for s in r["negatives_source"]:
            by_source[s] += 1
    assert summary["negatives_by_source"] == by_source


def test_cli_mine_never_drops_a_pair_whatever_the_filter_does(tmp_path, minilm_dir, data, capsys):
    """A guard that rejects every candidate used to drop every pair."""
    pairs, corpus = data
    _write(tmp_path / "pairs.jsonl", [{"query": q, "positive": p} for q, p in pairs])
    _write(tmp_path / "corpus.jsonl", [{"text": t} for t in corpus])
    out = tmp_path / "mined.jsonl"
    base = ["mine", "--model", str(minilm_dir), "--pairs", str(tmp_path / "pairs.jsonl")]
    base += ["--corpus", str(tmp_path / "corpus.jsonl"), "--output", str(out)]
    base += ["--num-negatives", "2", "--max-length", str(MAX_LENGTH), "--margin-pos", "2"]
    # Depth beyond the corpus: nothing passes, nothing is left to draw at random: kept, empty.
    assert cli.main(base) == 0
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["query"], r["positive"]) for r in records] == pairs
    assert summary["pairs_written"] == summary["pairs_without_negatives"] == len(pairs)
    # A shallow search: random corpus texts beyond the searched ranks fill every pair.
    assert cli.main(base + ["--candidates", "4", "--fallback-depth", "8"]) == 0
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["query"], r["positive"]) for r in records] == pairs
    assert all(r["negatives_source"] == ["random", "random"] for r in records)
    assert summary["negatives_by_source"] == {"mined": 0, "deeper": 0, "random": 2 * len(pairs)}
    assert summary["pairs_with_fewer_than_k"] == 0


class _FixedEmbedder:
    """Embeddings given by hand: text -> vector (the prefix and lengths are ignored)."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors

    def encode(self, texts, batch_size=64, max_length=None, prefix=""):
        return np.stack([self.vectors[t] for t in texts]).astype(np.float32)


def _fan(cosines: np.ndarray) -> np.ndarray:
    """Unit vectors in the plane whose cosine with (1, 0) is each of ``cosines``."""
    return np.stack([cosines, np.sqrt(1 - cosines**2)], axis=1)


def test_filter_removing_all_top_candidates_falls_back_to_deeper_ranks():
    """A query the model ranks badly: sim(q, pos) = 0.5, so the guard (0.95 x 0.5) rejects the
    30 candidates above cosine 0.475, all of the top 10 searched for "mined" negatives; the
    next ranks pass it and are taken, best first, marked "deeper"; then random corpus texts
    beyond the deeper ranks, marked "random". The pair is never dropped."""
    cos = np.round(0.99 - 0.02 * np.arange(40), 2)  # ranks 1..40: 0.99, 0.97, ..., 0.21
    corpus = [f"doc {j}" for j in range(40)]
    vectors = dict(zip(corpus, _fan(cos), strict=True))
    vectors["q"] = np.array([1.0, 0.0])
    vectors["pos"] = np.array([0.5, -np.sqrt(0.75)])
    passing = [j for j in range(40) if cos[j] <= 0.95 * 0.5]
    assert passing[0] == 26  # ranks 27.. pass the guard
    emb = _FixedEmbedder(vectors)

    def mine(**settings):
        config = mining.MiningConfig(num_negatives=3, **settings)
        return mining.mine_negatives(emb, [("q", "pos")], corpus, config)

    (deeper,) = mine(candidates=10, fallback_depth=30)
    assert deeper.negatives == ["doc 26", "doc 27", "doc 28"]
    assert deeper.sources == ["deeper"] * 3
    # Ranks 27..28 only are searched deeper: the third negative is drawn from ranks 29..40.
    (mixed,) = mine(candidates=10, fallback_depth=28)
    assert mixed.negatives[:2] == ["doc 26", "doc 27"]
    assert mixed.sources == ["deeper", "deeper", "random"]
    assert mixed.negatives[2] in corpus[28:]
    # The old behaviour (no fallback) loses the pair: now it keeps what there is.
    (none,) = mine(candidates=10, fallback_depth=10)
    assert none.sources == ["random"] * 3 and set(none.negatives) <= set(corpus[10:])
    (kept,) = mine(candidates=40, margin_pos=2.0)
    assert kept.negatives == [] and kept.sources == []


@pytest.mark.parametrize(
    "pairs_lines, corpus_lines, where",
    [
        (['{"query": "a", "positive": "b"}', "", "{oops"], ['{"text": "x"}'], "pairs.jsonl:3"),
        (['{"query": "a"}'], ['{"text": "x"}'], 'pairs.jsonl:1: missing field "positive"'),
        (['{"query": "a", "positive": "b"}'], ['{"text": "x"}', '{"_id": "1"}'], "corpus.jsonl:2"),
    ],
)
def test_cli_mine_bad_input(tmp_path, minilm_dir, capsys, pairs_lines, corpus_lines, where):
    (tmp_path / "pairs.jsonl").write_text("\n".join(pairs_lines) + "\n")
    (tmp_path / "corpus.jsonl").write_text("\n".join(corpus_lines) + "\n")
    rc = cli.main(
        ["mine", "--model", str(minilm_dir), "--pairs", str(tmp_path / "pairs.jsonl")]
        + ["--corpus", str(tmp_path / "corpus.jsonl"), "--output", str(tmp_path / "o.jsonl")]
        + ["--num-negatives", "2"]
    )
    assert rc == 2
    assert where in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


# ------------------------------------------- every filter against a NumPy float64 reference
#
# Vectors in {-1, +1}^16: their norm is 4, so unit vectors are exact in float32 and every cosine
# is a multiple of 1/8, computed exactly by the search and by NumPy alike: many exact ties (broken
# by corpus index), and thresholds chosen off that grid (0.95 x, -0.1, 0.7) so no score sits on a
# limit. The reference re-derives the rules from the module docstring on the full matrix.

DIM = 16


def _ref_normalise(text: str) -> str:
    """ASCII texts: case, punctuation and whitespace ignored (textio.normalise's rule)."""
    return " ".join(re.sub(r"[^a-z0-9]", " ", text.lower()).split())


def _flipped(rng, v: np.ndarray, flips: int) -> np.ndarray:
    out = v.copy()
    out[rng.choice(DIM, flips, replace=False)] *= -1
    return out


def _tied_data(seed: int = 0):
    """4 queries (one with two positives), a corpus of perturbed copies of the queries (exact
    vector duplicates under other names: ties), the positives, and case / spacing / punctuation
    variants of a query and of a positive (duplicates under the normalisation)."""
    rng = np.random.default_rng(seed)
    vectors, pairs = {}, []
    for i in range(4):
        q = f"query {i}"
        vectors[q] = rng.choice([-1.0, 1.0], DIM)
        for j in range(2 if i == 0 else 1):
            p = f"positive {i}.{j}"
            vectors[p] = _flipped(rng, vectors[q], int(rng.integers(1, 5)))
            pairs.append((q, p))
    corpus = [p for _, p in pairs]
    for d in range(60):
        text = f"doc {d}"
        vectors[text] = _flipped(rng, vectors[f"query {d % 4}"], int(rng.integers(0, 9)))
        corpus.append(text)
        if d % 7 == 0:  # the same vector again: a tie
            vectors[f"twin of doc {d}"] = vectors[text]
            corpus.append(f"twin of doc {d}")
    variants = {"  QUERY 1!": "query 1", "Positive   0.1": "positive 0.1", "DOC 3.": "doc 3"}
    for text, like in variants.items():
        vectors[text] = _flipped(rng, vectors[like], 1)
        corpus.insert(int(rng.integers(len(corpus))), text)
    return pairs, corpus, _FixedEmbedder(vectors), vectors


def _ref_stage_reasons(vectors, pairs, corpus, p, cfg):
    """[(corpus index, reason or None, stage)] in rank order for pair ``p``."""
    unit = lambda t: vectors[t] / np.linalg.norm(vectors[t])  # noqa: E731
    query, positive = pairs[p]
    excluded = {_ref_normalise(t) for pair in pairs if pair[0] == query for t in pair}
    positives = [unit(b) for a, b in pairs if a == query]
    sims = np.array([unit(query) @ unit(t) for t in corpus], np.float64)
    pos = float(unit(query) @ unit(positive))
    out, rank = [], 0
    for j in np.argsort(-sims, kind="stable"):
        stage = "mined" if rank < cfg.candidates else "deeper"
        if _ref_normalise(corpus[j]) in excluded:
            out.append((j, "duplicate", stage))
            continue
        near = max(float(unit(corpus[j]) @ b) for b in positives)
        if rank < cfg.skip_top:
            reason = "rank_window"
        elif cfg.max_positive_similarity is not None and near > cfg.max_positive_similarity:
            reason = "near_duplicate"
        elif cfg.perc_pos is not None and sims[j] > cfg.perc_pos * pos:
            reason = "perc_pos"
        elif cfg.margin_pos is not None and sims[j] > pos - cfg.margin_pos:
            reason = "margin_pos"
        else:
            reason = None
        out.append((j, reason, stage))
        rank += 1
    return out


def _reference_mine(vectors, pairs, corpus, cfg):
    """(negatives, sources, dropped, unused, examined) per pair: "top" sampling, the whole corpus
    searched (fallback_depth >= its size), so no random fallback."""
    seen, unique = set(), []
    for t in corpus:
        if _ref_normalise(t) not in seen:
            seen.add(_ref_normalise(t))
            unique.append(t)
    out = []
    for p in range(len(pairs)):
        entries = _ref_stage_reasons(vectors, pairs, unique, p, cfg)
        negs, sources, dropped, unused, examined = [], [], Counter(), 0, 0
        for stage in ("mined", "deeper"):
            if len(negs) == cfg.num_negatives:
                break
            part = [(j, r) for j, r, s in entries if s == stage]
            passed = [unique[j] for j, r in part if r is None]
            take = passed[: cfg.num_negatives - len(negs)]
            negs, sources = negs + take, sources + [stage] * len(take)
            dropped.update(r for _, r in part if r is not None)
            unused += len(passed) - len(take)
            examined += len(part)
        out.append((negs, sources, dict(dropped), unused, examined))
    return out


FILTER_SETTINGS = {
    "none": dict(perc_pos=None),
    "perc_pos": dict(perc_pos=0.95),
    "margin_pos": dict(perc_pos=None, margin_pos=0.1),
    "rank_window": dict(perc_pos=None, skip_top=3),
    "near_duplicate": dict(perc_pos=None, max_positive_similarity=0.7),
    "all": dict(skip_top=2, perc_pos=0.95, margin_pos=0.05, max_positive_similarity=0.7),
}


@pytest.mark.parametrize("name", sorted(FILTER_SETTINGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_each_filter_matches_the_numpy_reference_with_ties(name, seed):
    pairs, corpus, emb, vectors = _tied_data(seed)
    cfg = mining.MiningConfig(
        num_negatives=5, candidates=12, fallback_depth=10_000, **FILTER_SETTINGS[name]
    )
    got = mining.mine_negatives(emb, pairs, corpus, cfg)
    want = _reference_mine(vectors, pairs, corpus, cfg)
    fired = Counter()
    for m, (negs, sources, dropped, unused, examined) in zip(got, want, strict=True):
        assert (m.negatives, m.sources) == (negs, sources)
        assert {k: v for k, v in m.dropped.items() if v} == dropped
        assert m.unused == unused
        # The counts sum up: every examined candidate is dropped once, taken or unused.
        assert sum(m.dropped.values()) + len(m.negatives) + m.unused == examined
        fired.update(m.dropped)
    assert fired["duplicate"] > 0  # the corpus holds the positives and variants of the texts
    if name in mining.FILTERS:
        assert fired[name] > 0, f"{name} never fired: the data no longer exercises it"
    if name in ("perc_pos", "margin_pos", "all"):  # strict enough to reach deeper ranks
        assert any("deeper" in m.sources for m in got)


def test_duplicates_are_found_after_normalisation():
    pairs, corpus, emb, _ = _tied_data(0)
    assert mining.unique_texts(["A  b.", "a b", "c", "C!"]) == ["A  b.", "c"]
    cfg = mining.MiningConfig(num_negatives=100, candidates=100, perc_pos=None)
    for (query, _), m in zip(pairs, mining.mine_negatives(emb, pairs, corpus, cfg), strict=True):
        keys = {_ref_normalise(t) for t in m.negatives}
        own = {_ref_normalise(t) for a, b in pairs if a == query for t in (a, b)}
        assert not keys & own and len(keys) == len(m.negatives)
    assert "DOC 3." not in mining.unique_texts(corpus)  # "doc 3" comes first


def test_random_sampling_in_the_window_is_seeded_uniform_and_within_the_filters():
    pairs, corpus, emb, vectors = _tied_data(0)
    settings = dict(num_negatives=3, skip_top=2, candidates=20, fallback_depth=10_000)
    top_cfg = mining.MiningConfig(**settings)
    top = mining.mine_negatives(emb, pairs, corpus, top_cfg)
    unique = mining.unique_texts(corpus)
    windows = [
        [unique[j] for j, r, s in _ref_stage_reasons(vectors, pairs, unique, p, top_cfg)
         if r is None and s == "mined"]
        for p in range(len(pairs))
    ]  # fmt: skip
    draws = Counter()
    runs = 300
    for seed in range(runs):
        cfg = mining.MiningConfig(sampling="random", seed=seed, **settings)
        got = mining.mine_negatives(emb, pairs, corpus, cfg)
        for p, (m, t) in enumerate(zip(got, top, strict=True)):
            assert m.dropped == t.dropped  # sampling comes after the filters
            mined = [x for x, s in zip(m.negatives, m.sources, strict=True) if s == "mined"]
            assert set(mined) <= set(windows[p])
            assert mined == sorted(mined, key=windows[p].index)  # written best first
            if len(windows[p]) >= 3:
                assert len(mined) == 3 and m.unused == len(windows[p]) - 3
            draws.update((p, x) for x in mined)
        if seed == 0:
            again = mining.mine_negatives(emb, pairs, corpus, cfg)
            assert [m.negatives for m in again] == [m.negatives for m in got]
    # Uniform: each of the window's n candidates is drawn with probability 3/n; the counts are
    # Binomial(runs, 3/n), so 5 standard deviations bound them (a best-first pick fails this).
    for p, window in enumerate(windows):
        if len(window) <= 3:
            continue
        prob = 3 / len(window)
        sd = np.sqrt(runs * prob * (1 - prob))
        for x in window:
            assert abs(draws[(p, x)] - runs * prob) < 5 * sd, (p, x, draws[(p, x)])
    assert sum(len(w) > 3 for w in windows) >= 3  # the test exercises sampling


def test_every_numeric_mining_setting_has_a_range_that_admits_its_default():
    defaults = mining.MiningConfig()
    numeric = [
        f.name for f in dataclasses.fields(defaults)
        if f.type in ("int", "float | None") or isinstance(getattr(defaults, f.name), int)
    ]  # fmt: skip
    assert set(numeric) == set(MINE_RANGES), "a MiningConfig number without a range, or stale"
    for name in numeric:
        value = getattr(defaults, name)
        assert value is None or MINE_RANGES[name].admits(value), name
    assert mining.setting_problems(defaults) == []


@pytest.mark.parametrize(
    "settings, flag",
    [
        (dict(num_negatives=0), "--num-negatives=0: must be >= 1"),
        (dict(perc_pos=0.0), "--perc-pos=0.0: must be > 0"),
        (dict(margin_pos=2.5), "--margin-pos=2.5: must be in [-2, 2]"),
        (dict(max_positive_similarity=1.5), "--max-positive-similarity=1.5: must be in [-1, 1]"),
        (dict(sampling="best"), "--sampling='best'"),
        (dict(skip_top=10, candidates=10), "need --skip-top < --candidates"),
    ],
)
def test_settings_that_cannot_work_are_refused(settings, flag, tmp_path, capsys):
    problems = mining.setting_problems(mining.MiningConfig(**settings))
    assert len(problems) == 1 and problems[0].startswith(flag)
    with pytest.raises(ValueError, match=re.escape(flag)):
        mining.mine_negatives(None, [("q", "p")], ["x"], mining.MiningConfig(**settings))
    if "sampling" in settings:
        return  # argparse's choices refuse it
    argv = ["mine", "--model", "/never/read", "--pairs", "p", "--corpus", "c"]
    argv += ["--output", str(tmp_path / "o.jsonl"), "--num-negatives", "3"]
    for key, value in settings.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and flag in err


def test_cli_summary_counts_each_filter(tmp_path, capsys):
    """The summary's counts are the per-pair counts summed, and add up to what was examined."""
    pairs, corpus, emb, vectors = _tied_data(1)
    settings = FILTER_SETTINGS["all"] | dict(num_negatives=5, candidates=12, fallback_depth=10_000)
    want = _reference_mine(vectors, pairs, corpus, mining.MiningConfig(**settings))
    mined = mining.mine_negatives(emb, pairs, corpus, mining.MiningConfig(**settings))
    counts = mine_command._counts(mined, 5)
    dropped = Counter()
    for w in want:
        dropped.update(w[2])
    assert counts["candidates_dropped_by"] == {f: dropped[f] for f in mining.FILTERS}
    assert counts["candidates_examined"] == sum(w[4] for w in want)
    assert counts["candidates_passed_unused"] == sum(w[3] for w in want)
    assert counts["pairs_with_fewer_than_k"] == sum(len(w[0]) < 5 for w in want)


def test_a_workdir_mines_as_its_export_and_stage_names_are_explained(
    tmp_path, minilm_dir, data, capsys
):
    """The miner may be a stage-1 workdir (workdir.py's one rule): the same negatives as its
    exported model. ``stage:NAME`` only means something inside a multi-stage config."""
    pairs, corpus = data
    _write(tmp_path / "pairs.jsonl", [{"query": q, "positive": p} for q, p in pairs[:4]])
    _write(tmp_path / "corpus.jsonl", [{"text": t} for t in corpus])
    workdir = tmp_path / "run" / "stage1"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "base_model").mkdir()
    (workdir / "export").symlink_to(minilm_dir, target_is_directory=True)
    base = ["mine", "--pairs", str(tmp_path / "pairs.jsonl"), "--corpus"]
    base += [str(tmp_path / "corpus.jsonl"), "--num-negatives", "3", "--max-length", "32"]
    outputs = []
    for model in (minilm_dir, workdir):
        out = tmp_path / f"{len(outputs)}.jsonl"
        assert cli.main(base + ["--model", str(model), "--output", str(out)]) == 0
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1] and outputs[0]
    capsys.readouterr()
    assert cli.main(base + ["--model", "stage:stage1", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "stage:" in err and "workdir" in err
