"""Evaluation: metrics against hand calculation and pytrec_eval, chunked search against a NumPy
full sort, STS statistics against scipy, end to end against sentence-transformers, the CLI."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
import scipy.stats

from gte_jax import cli, evaluation
from gte_jax.encode import Embedder
from gte_jax.textio import InputError

BIBLE_EVAL = pathlib.Path(evaluation.__file__).parent / "resources" / "demo" / "bible_eval"


# ----------------------------------------------------------------------------- metrics


def test_metrics_hand_calculation():
    qrels = {
        "q1": {"d1": 2, "d2": 1},
        "q2": {"d5": 1},
        "q3": {"d6": 0},  # no relevant document: skipped
        "q4": {"d7": 1, "d8": 1},
    }
    ranking = {
        "q1": ["d3", "d1", "d4", "d2"],
        "q2": ["d5", "d1"],
        "q3": ["d6"],
        "q4": ["d1", "d2", "d3"],
    }
    # q1: gains [0, 2, 0, 1]; DCG = 2/log2(3) + 1/log2(5) = 1.2618595 + 0.4306766 = 1.6925361,
    #     IDCG = 2/log2(2) + 1/log2(3) = 2.6309298 -> nDCG 0.6433224; first relevant at rank 2 ->
    #     RR 0.5; recall@1 = 0/2, recall@2 = 1/2, recall@10 = 2/2.
    # q2: relevant at rank 1 -> nDCG 1, RR 1, recall 1 at every cutoff.
    # q4: nothing relevant retrieved -> 0 everywhere.
    # Means over q1, q2, q4: nDCG (0.6433224 + 1 + 0)/3 = 0.5477741, MRR 0.5, recall@1 1/3,
    # recall@2 0.5, recall@10 2/3.
    cutoffs = {"ndcg": (10,), "mrr": (10,), "recall": (1, 2, 10)}
    m = evaluation.retrieval_metrics(ranking, qrels, cutoffs)
    assert m["ndcg@10"] == pytest.approx(0.5477741, abs=1e-7)
    assert m["mrr@10"] == pytest.approx(0.5)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(0.5)
    assert m["recall@10"] == pytest.approx(2 / 3)
    assert m["num_queries"] == 3 and m["skipped_queries"] == 1


def test_metric_cutoffs():
    # Relevant at rank 11: outside every @10 metric, inside recall@100.
    ranked = [f"x{i}" for i in range(10)] + ["rel"]
    m = evaluation.query_metrics(ranked, {"rel": 1})
    assert m["ndcg@10"] == m["mrr@10"] == m["recall@10"] == 0.0
    assert m["recall@100"] == 1.0


def test_metrics_against_pytrec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(300)]
    qrels, run = {}, {}
    for q in range(40):
        judged = rng.choice(len(docs), size=rng.integers(1, 8), replace=False)
        qrels[f"q{q}"] = {docs[j]: int(rng.integers(0, 4)) for j in judged}
        ranked = rng.permutation(len(docs))[:150]
        run[f"q{q}"] = {docs[j]: float(150 - r) for r, j in enumerate(ranked)}  # distinct scores
    ranking = {q: sorted(s, key=s.get, reverse=True) for q, s in run.items()}
    evaluator = pytrec_eval.RelevanceEvaluator(
        qrels, {"ndcg_cut.10", "recall.1,10,100", "recip_rank"}
    )
    ref = evaluator.evaluate(run)
    # pytrec_eval's recip_rank has no cutoff: MRR@10 is recip_rank on the run cut at 10.
    run10 = {q: {d: run[q][d] for d in ranking[q][:10]} for q in run}
    ref_rr10 = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run10)
    checked = 0
    for q, judged in qrels.items():
        if not any(g > 0 for g in judged.values()):
            continue
        mine = evaluation.query_metrics(ranking[q], judged)
        assert mine["ndcg@10"] == pytest.approx(ref[q]["ndcg_cut_10"], abs=1e-12)
        for k in (1, 10, 100):
            assert mine[f"recall@{k}"] == pytest.approx(ref[q][f"recall_{k}"], abs=1e-12)
        assert mine["mrr@10"] == pytest.approx(ref_rr10[q]["recip_rank"], abs=1e-12)
        checked += 1
    assert checked > 20


# ----------------------------------------------------------------------------- search


def _reference_topk(q, c, k, similarity):
    q, c = q.astype(np.float64), c.astype(np.float64)
    if similarity == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        c = c / np.linalg.norm(c, axis=1, keepdims=True)
    scores = q @ c.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return scores, order


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize(
    "n, chunk_size, k, block",
    [(1000, 128, 50, 16), (1000, 1000, 7, 64), (300, 4096, 10, 8), (20, 6, 40, 5)],
)
def test_search_equals_full_sort(similarity, n, chunk_size, k, block):
    rng = np.random.default_rng(n + k)
    q = rng.normal(size=(37, 16)).astype(np.float32)
    c = (rng.normal(size=(n, 16)) * rng.uniform(0.5, 2, size=(n, 1))).astype(np.float32)
    scores, idx = evaluation.search(
        q, c, k=k, chunk_size=chunk_size, similarity=similarity, query_block_size=block
    )
    full, ref_idx = _reference_topk(q, c, k, similarity)
    assert idx.shape == scores.shape == (37, min(k, n))
    # Near-ties may swap between float32 and float64; the scores of what was returned must equal
    # the true top-k scores, and the ids must match wherever the ranking is not a near-tie.
    got = np.take_along_axis(full, idx, axis=1)
    want = np.take_along_axis(full, ref_idx, axis=1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(scores, want, atol=1e-5)
    assert (np.sort(idx, axis=1) != np.sort(ref_idx, axis=1)).sum() <= 2
    assert (idx == ref_idx).mean() > 0.99


def test_search_ties_go_to_lower_index():
    # Exact ties: the corpus repeats four vectors; equal scores must come out by corpus index,
    # as a stable full sort orders them, across chunk borders too.
    base = np.eye(4, dtype=np.float32)
    c = np.tile(base, (25, 1))  # [100, 4]; row i is base[i % 4]
    q = np.array([[1, 0.5, 0, 0], [0, 0, 0, 1]], np.float32)
    _, idx = evaluation.search(q, c, k=30, chunk_size=7, similarity="dot")
    _, ref = _reference_topk(q, c, 30, "dot")
    np.testing.assert_array_equal(idx, ref)


def test_search_bfloat16_corpus():
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    q = rng.normal(size=(5, 32)).astype(np.float32)
    c = rng.normal(size=(200, 32)).astype(np.float32)
    c16 = jnp.asarray(c, jnp.bfloat16)
    _, idx = evaluation.search(q, c16, k=10, chunk_size=64)
    _, ref = _reference_topk(q, np.asarray(c16.astype(jnp.float32)), 10, "cosine")
    assert (idx == ref).mean() > 0.95


def test_search_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected"):
        evaluation.search(np.zeros((2, 3)), np.zeros((4, 5)), k=1)
    with pytest.raises(ValueError, match="similarity"):
        evaluation.search(np.zeros((2, 3)), np.zeros((4, 3)), k=1, similarity="l2")


# ----------------------------------------------------------------------------- STS statistics


def test_rank_correlations_match_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 0.5 * x + rng.normal(size=200)
    ties = np.round(rng.uniform(0, 5, size=200))  # gold STS scores are often coarse
    np.testing.assert_allclose(evaluation.rankdata(ties), scipy.stats.rankdata(ties))
    assert evaluation.spearman(x, ties) == pytest.approx(scipy.stats.spearmanr(x, ties)[0])
    assert evaluation.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0])
    assert evaluation.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0])
    assert math.isnan(evaluation.pearson(x, np.ones(200)))


# ----------------------------------------------------------------------------- readers


def _write(path: pathlib.Path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _beir_subset(root: pathlib.Path, num_queries: int = 12, extra_docs: int = 40) -> pathlib.Path:
    """The first queries of the bundled set with their relevant docs and some distractors."""
    qrels = (BIBLE_EVAL / "qrels" / "test.tsv").read_text().splitlines()
    header, rows = qrels[0], qrels[1 : num_queries + 1]
    qids = {r.split("\t")[0] for r in rows}
    wanted = {r.split("\t")[1] for r in rows}
    corpus = [json.loads(x) for x in (BIBLE_EVAL / "corpus.jsonl").read_text().splitlines()]
    kept = [d for d in corpus if d["_id"] in wanted] + [
        d for d in corpus if d["_id"] not in wanted
    ][:extra_docs]
    queries = [json.loads(x) for x in (BIBLE_EVAL / "queries.jsonl").read_text().splitlines()]
    _write(root / "corpus.jsonl", [json.dumps(d) for d in kept])
    _write(root / "queries.jsonl", [json.dumps(q) for q in queries if q["_id"] in qids])
    _write(root / "qrels" / "test.tsv", [header, *rows])
    return root


def test_read_beir_bundled_set():
    data = evaluation.read_beir(BIBLE_EVAL)
    corpus_lines = (BIBLE_EVAL / "corpus.jsonl").read_text().splitlines()
    qrels_lines = (BIBLE_EVAL / "qrels" / "test.tsv").read_text().splitlines()[1:]
    assert len(data.corpus) == len(corpus_lines)
    assert set(data.queries) == set(data.qrels) == {x.split("\t")[0] for x in qrels_lines}


def test_read_beir_title_joined(tmp_path):
    _write(tmp_path / "corpus.jsonl", ['{"_id": "a", "title": "T", "text": "body"}'])
    _write(tmp_path / "queries.jsonl", ['{"_id": "q", "text": "x"}'])
    _write(tmp_path / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "q\ta\t1"])
    assert evaluation.read_beir(tmp_path).corpus == {"a": "T body"}


@pytest.mark.parametrize(
    "file, lines, where",
    [
        ("corpus.jsonl", ['{"_id": "a", "text": "x"}', "{not json"], "corpus.jsonl:2"),
        ("corpus.jsonl", ['{"_id": "a"}'], "corpus.jsonl:1"),
        ("corpus.jsonl", ['{"_id": "a", "text": "x"}'] * 2, "corpus.jsonl:2"),
        ("queries.jsonl", ['{"_id": "q", "text": 3}'], "queries.jsonl:1"),
        ("qrels/test.tsv", ["query-id\tcorpus-id\tscore", "q\ta"], "test.tsv:2"),
        ("qrels/test.tsv", ["query-id\tcorpus-id\tscore", "q\ta\thigh"], "test.tsv:2"),
        ("qrels/test.tsv", ["query-id\tcorpus-id\tscore", "q\ta\t1", "zz\ta\t1"], "test.tsv:3"),
    ],
)
def test_read_beir_bad_lines(tmp_path, file, lines, where):
    _write(tmp_path / "corpus.jsonl", ['{"_id": "a", "text": "x"}'])
    _write(tmp_path / "queries.jsonl", ['{"_id": "q", "text": "x"}'])
    _write(tmp_path / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "q\ta\t1"])
    _write(tmp_path / file, lines)
    with pytest.raises(InputError, match=where.replace(".", r"\.")):
        evaluation.read_beir(tmp_path)


def test_read_sts_bad_line(tmp_path):
    path = tmp_path / "sts.jsonl"
    _write(path, ['{"sentence1": "a", "sentence2": "b", "score": 1}', '{"sentence1": "a"}'])
    with pytest.raises(InputError, match=r"sts\.jsonl:2: missing field \"sentence2\""):
        evaluation.read_sts(path)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def embedder(minilm_dir) -> Embedder:
    return Embedder.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def st_model(minilm_dir):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    return sentence_transformers.SentenceTransformer(str(minilm_dir), device="cpu")


def test_evaluate_beir_and_sts_match_sentence_transformers(tmp_path, embedder, st_model):
    beir_dir = _beir_subset(tmp_path / "beir")
    data = evaluation.read_beir(beir_dir)
    sts_path = tmp_path / "sts.jsonl"
    pairs = [(data.queries[q], data.corpus[next(iter(data.qrels[q]))]) for q in data.qrels]
    pairs += [(a, b) for (a, _), (_, b) in zip(pairs, pairs[1:] + pairs[:1], strict=True)]
    gold = np.r_[np.linspace(3, 5, 12), np.linspace(0, 2, 12)]
    _write(
        sts_path,
        [
            json.dumps({"sentence1": a, "sentence2": b, "score": s})
            for (a, b), s in zip(pairs, gold, strict=True)
        ],
    )
    # 32 tokens and batch 64 on both sides: few compiled shapes; truncation is the same in both.
    result = evaluation.evaluate(
        embedder, beir_dir=beir_dir, sts_file=sts_path, batch_size=64, max_length=32
    )
    st_model.max_seq_length = 32

    # Reference: sentence-transformers' torch encoder, NumPy full sort, the same metric code.
    doc_ids, query_ids = list(data.corpus), list(data.queries)
    d = st_model.encode([data.corpus[i] for i in doc_ids], normalize_embeddings=True)
    q = st_model.encode([data.queries[i] for i in query_ids], normalize_embeddings=True)
    order = np.argsort(-(q @ d.T), axis=1, kind="stable")
    ranking = {
        qid: [doc_ids[j] for j in row[:100]] for qid, row in zip(query_ids, order, strict=True)
    }
    ref = evaluation.retrieval_metrics(ranking, data.qrels)
    for key in ("ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100"):
        assert result["beir"][key] == pytest.approx(ref[key], abs=1e-9), key
    assert result["beir"]["num_queries"] == len(data.qrels) == 12
    assert result["beir"]["num_docs"] == len(data.corpus)

    e1 = st_model.encode([a for a, _ in pairs], normalize_embeddings=True)
    e2 = st_model.encode([b for _, b in pairs], normalize_embeddings=True)
    cosine = np.sum(e1 * e2, axis=1)
    assert result["sts"]["spearman"] == pytest.approx(scipy.stats.spearmanr(cosine, gold)[0])
    assert result["sts"]["pearson"] == pytest.approx(scipy.stats.pearsonr(cosine, gold)[0], 1e-5)


def test_evaluate_beir_per_dimension_matches_sentence_transformers_truncate_dim(
    tmp_path, embedder, st_model
):
    """``dims``: each prefix scored from one encoding equals sentence-transformers' own
    ``truncate_dim`` encode, searched by a NumPy full sort (the Matryoshka quality per dimension
    the quality suite reports); the full dim equals the untruncated result."""
    data = evaluation.read_beir(_beir_subset(tmp_path / "beir"))
    full = embedder.model.embedding_dim
    result = evaluation.evaluate_beir(embedder, data, max_length=32, dims=(8, 48, full))
    st_model.max_seq_length = 32
    doc_ids, query_ids = list(data.corpus), list(data.queries)
    for dim in (8, 48):
        st_model.truncate_dim = dim
        try:
            d = st_model.encode([data.corpus[i] for i in doc_ids], normalize_embeddings=True)
            q = st_model.encode([data.queries[i] for i in query_ids], normalize_embeddings=True)
        finally:
            st_model.truncate_dim = None
        assert d.shape[1] == dim
        scores = q.astype(np.float64) @ d.T.astype(np.float64)
        # the comparison is well posed: the two implementations' cosines differ by less than half
        # the smallest gap between two of the reference's scores, so they rank alike
        embedder.set_truncate_dim(dim)
        try:
            ours = (
                embedder.encode(list(data.queries.values()), max_length=32)
                @ embedder.encode([data.corpus[i] for i in doc_ids], max_length=32).T
            )
        finally:
            embedder.set_truncate_dim(None)
        gap = np.diff(-np.sort(scores, axis=1)[:, ::-1], axis=1).min()
        assert np.abs(ours - scores).max() < gap / 2, (dim, np.abs(ours - scores).max(), gap)
        order = np.argsort(-scores, axis=1, kind="stable")
        ranking = {
            qid: [doc_ids[j] for j in row[:100]] for qid, row in zip(query_ids, order, strict=True)
        }
        ref = evaluation.retrieval_metrics(ranking, data.qrels)
        for key in ("ndcg@10", "mrr@10", "recall@10"):
            assert result["by_dim"][dim][key] == pytest.approx(ref[key], abs=1e-9), (dim, key)
    assert result["by_dim"][8]["mrr@10"] != result["mrr@10"]  # the prefix is really scored
    for key in ("ndcg@10", "mrr@10", "recall@100"):
        assert result["by_dim"][full][key] == result[key]


@pytest.mark.parametrize("dims", [(0,), (385,), (64, 999)])
def test_evaluate_beir_refuses_a_dimension_the_embedding_lacks_before_encoding(
    tmp_path, embedder, dims, monkeypatch
):
    data = evaluation.read_beir(_beir_subset(tmp_path / "beir"))
    monkeypatch.setattr(embedder, "encode", lambda *a, **k: pytest.fail("encoded first"))
    with pytest.raises(ValueError, match=r"must be in \[1, 384\]"):
        evaluation.evaluate_beir(embedder, data, dims=dims)


def test_ignore_identical_ids(tmp_path, embedder):
    # A query that is also in the corpus under its own id must not retrieve itself.
    _write(
        tmp_path / "corpus.jsonl",
        ['{"_id": "q", "text": "the cat"}', '{"_id": "a", "text": "a dog"}'],
    )
    _write(tmp_path / "queries.jsonl", ['{"_id": "q", "text": "the cat"}'])
    _write(tmp_path / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "q\ta\t1"])
    result = evaluation.evaluate(embedder, beir_dir=tmp_path)["beir"]
    assert result["mrr@10"] == 1.0


def test_eval_suite_matches_evaluate(tmp_path, embedder):
    # The hook takes the module and tokenizer the train loop holds in memory.
    model, tokenizer = embedder.model, embedder.tokenizer
    beir_dir = _beir_subset(tmp_path / "beir", num_queries=6, extra_docs=10)
    sets = [{"name": "bible", "kind": "beir", "path": str(beir_dir), "query_prefix": "q: "}]
    suite = evaluation.EvalSuite(sets, batch_size=8)
    metrics = suite(model, tokenizer)
    direct = evaluation.evaluate(
        Embedder(model, tokenizer), beir_dir=beir_dir, prefix_query="q: ", batch_size=8
    )["beir"]
    assert set(metrics) == {f"bible/{k}" for k in direct if "@" in k}
    for k, v in metrics.items():
        assert v == pytest.approx(direct[k.split("/", 1)[1]], abs=1e-12)


def test_eval_suite_rejects_bad_config(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        evaluation.EvalSuite([{"name": "x", "kind": "sts", "path": "x", "prefix": "q"}])
    with pytest.raises(ValueError, match="kind"):
        evaluation.EvalSuite([{"name": "x", "kind": "mteb", "path": "x"}])
    with pytest.raises(InputError, match="no such file"):  # fails when built, not mid-training
        evaluation.EvalSuite([{"name": "x", "kind": "sts", "path": str(tmp_path / "no.jsonl")}])


def test_load_embedder_workdir_export_and_errors(tmp_path, minilm_dir):
    workdir = tmp_path / "run" / "finetune"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "base_model").mkdir()
    (workdir / "export").symlink_to(minilm_dir, target_is_directory=True)
    embedder = evaluation.load_embedder(workdir)
    assert embedder.model.embedding_dim == 384
    with pytest.raises(FileNotFoundError, match=r"\['finetune'\]"):
        evaluation.load_embedder(tmp_path / "run")


def test_load_embedder_workdir_checkpoint(tmp_path, minilm_dir, embedder):
    # No export/: the newest checkpoint's params go into base_model's architecture.
    import jax

    from gte_jax.checkpoint import Checkpointer
    from gte_jax.train import ModelFn

    workdir = tmp_path / "stage"
    workdir.mkdir()
    (workdir / "base_model").symlink_to(minilm_dir, target_is_directory=True)
    model_fn, params = ModelFn.from_module(embedder.model)
    changed = jax.tree.map(lambda x: x * 1.05, params)  # [every weight scaled]
    ckpt = Checkpointer(workdir / "checkpoints", every_steps=1, async_save=False)
    ckpt.save(3, {"params": changed}, {}, force=True)
    ckpt.close()
    texts = ["In the beginning God created the heaven and the earth."]
    got = evaluation.load_embedder(workdir).encode(texts)
    want = Embedder(model_fn.module(changed), embedder.tokenizer).encode(texts)
    base = embedder.encode(texts)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(got - base).max() > 1e-3


# ----------------------------------------------------------------------------- CLI


def test_cli_eval_bundled_set(minilm_dir, capsys):
    # max_length 16 and batch 256: one compiled shape for the whole set, so this stays fast.
    rc = cli.main(
        ["eval", "--model", str(minilm_dir), "--beir", str(BIBLE_EVAL)]
        + ["--max-length", "16", "--batch-size", "256"]
    )
    out, _ = capsys.readouterr()
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    qrels = (BIBLE_EVAL / "qrels" / "test.tsv").read_text().splitlines()[1:]
    assert result["num_queries"] == len({r.split("\t")[0] for r in qrels})
    assert result["num_docs"] == len((BIBLE_EVAL / "corpus.jsonl").read_text().splitlines())
    assert 0 <= result["recall@1"] <= result["recall@10"] <= result["recall@100"] <= 1
    # One relevant document per query here, so reciprocal rank lies between the two recalls.
    assert result["recall@1"] <= result["mrr@10"] <= result["recall@10"]
    assert 0 <= result["ndcg@10"] <= 1


def test_cli_eval_sts(tmp_path, minilm_dir, capsys):
    path = tmp_path / "sts.jsonl"
    texts = [("a man plays a guitar", "a person plays music", 4.0)]
    texts += [("a cat sleeps", "the stock market fell", 0.2), ("it rains", "rain is falling", 4.5)]
    _write(path, [json.dumps(dict(sentence1=a, sentence2=b, score=s)) for a, b, s in texts])
    assert cli.main(["eval", "--model", str(minilm_dir), "--sts", str(path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_pairs"] == 3 and -1 <= result["spearman"] <= 1


def test_cli_eval_bad_inputs(tmp_path, minilm_dir, capsys):
    beir = _beir_subset(tmp_path / "beir", num_queries=2, extra_docs=2)
    (beir / "qrels" / "test.tsv").rename(beir / "qrels" / "dev.tsv")
    assert cli.main(["eval", "--model", str(minilm_dir), "--beir", str(beir)]) == 2
    err = capsys.readouterr().err
    assert "test.tsv: no such file" in err and "['dev']" in err

    with (beir / "corpus.jsonl").open("a") as f:
        f.write('{"_id": "broken", "text": \n')
    assert (
        cli.main(["eval", "--model", str(minilm_dir), "--beir", str(beir), "--split", "dev"]) == 2
    )
    err = capsys.readouterr().err
    n = len((beir / "corpus.jsonl").read_text().splitlines())
    assert f"corpus.jsonl:{n}: malformed JSON (expecting value at column 26; the line ends" in err

    assert cli.main(["eval", "--model", str(tmp_path / "nope"), "--sts", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err
