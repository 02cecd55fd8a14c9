"""Hard-negative mining: the rules against a NumPy re-implementation, the guards, the CLI."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from gte_jax import cli, mining
from gte_jax.encode import Embedder

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
    """Issue 9 item 17: a guard that rejects every candidate used to drop every pair."""
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
