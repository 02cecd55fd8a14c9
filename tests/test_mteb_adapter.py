"""The mteb adapter: protocol conformance without mteb, and a run of mteb's own retrieval and STS
evaluators on small local tasks (in-memory data, nothing downloaded), against gte-jax's evaluation.
mteb is in the [test] extra."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from gte_jax import evaluation
from gte_jax.encode import Embedder
from gte_jax.mteb_adapter import MTEBEncoder

BIBLE_EVAL = pathlib.Path(evaluation.__file__).parent / "resources" / "demo" / "bible_eval"
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def embedder(minilm_dir) -> Embedder:
    return Embedder.from_pretrained(minilm_dir)


def test_encode_accepts_texts_and_batches(embedder):
    enc = MTEBEncoder(embedder, query_prefix="query: ", doc_prefix="passage: ", max_length=16)
    texts = ["a cat", "a dog", "the rain in spain"]
    want = embedder.encode(texts, max_length=16, prefix="query: ")
    got_list = enc.encode(texts, prompt_type="query")
    got_batches = enc.encode([{"text": texts[:2]}, {"text": texts[2:]}], prompt_type="query")
    np.testing.assert_array_equal(got_list, want)
    np.testing.assert_array_equal(got_batches, want)
    assert got_list.dtype == np.float32 and got_list.shape == (3, 384)
    sim = enc.similarity(got_list, got_list)
    np.testing.assert_allclose(np.diag(sim), 1, atol=1e-5)
    np.testing.assert_allclose(
        enc.similarity_pairwise(got_list, got_list[::-1]), np.diag(sim[:, ::-1]), atol=1e-6
    )  # a row-wise dot vs a matmul: float32 rounding apart (1 ulp of 1.0 seen)
    with pytest.raises(TypeError, match="text"):
        enc.encode([{"image": [1]}])


def test_prefix_priority(embedder):
    class Meta:
        name, type = "SciFact", "Retrieval"

    enc = MTEBEncoder(
        embedder,
        query_prefix="q: ",
        doc_prefix="d: ",
        prompts={"Retrieval-query": "rq: ", "SciFact": "sf: ", "SciFact-document": "sfd: "},
    )
    assert enc.prefix(Meta, "query") == "sf: "  # task name beats task type
    assert enc.prefix(Meta, "document") == "sfd: "
    Meta.name = "NFCorpus"
    assert enc.prefix(Meta, "query") == "rq: "
    assert enc.prefix(Meta, "document") == "d: "
    assert enc.prefix(None, None) == ""


# ----------------------------------------------------------------------------- with mteb


def _bible_subset(num_queries=12, extra_docs=40):
    qrels_rows = (BIBLE_EVAL / "qrels" / "test.tsv").read_text().splitlines()[1 : num_queries + 1]
    qrels = {}
    for row in qrels_rows:
        q, d, s = row.split("\t")
        qrels.setdefault(q, {})[d] = int(s)
    wanted = {d for judged in qrels.values() for d in judged}
    corpus = [json.loads(x) for x in (BIBLE_EVAL / "corpus.jsonl").read_text().splitlines()]
    corpus = [d for d in corpus if d["_id"] in wanted] + [
        d for d in corpus if d["_id"] not in wanted
    ][:extra_docs]
    queries = [json.loads(x) for x in (BIBLE_EVAL / "queries.jsonl").read_text().splitlines()]
    queries = [q for q in queries if q["_id"] in qrels]
    return corpus, queries, qrels


def _task_args():
    return dict(
        description="gte-jax test task",
        reference="https://example.invalid",
        dataset={"path": "NA", "revision": "NA"},
        category="t2t",
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        date=("2024-01-01", "2024-01-01"),
        dialect=[],
        domains=[],
        task_subtypes=[],
        license="cc-by-4.0",
        annotations_creators="derived",
        modalities=["text"],
        sample_creation="found",
        bibtex_citation="",
    )


def test_mteb_evaluators_agree_with_gte_jax(embedder, tmp_path):
    mteb = pytest.importorskip("mteb")
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models.models_protocols import EncoderProtocol

    corpus, queries, qrels = _bible_subset()
    sentences1 = [q["text"] for q in queries]
    by_id = {d["_id"]: d["text"] for d in corpus}
    sentences2 = [by_id[next(iter(qrels[q["_id"]]))] for q in queries]
    sentences2 = sentences2[:6] + sentences2[7:] + sentences2[6:7]  # half matched, half not
    gold = [5.0 - 0.3 * i for i in range(6)] + [0.1 * i for i in range(6)]

    class BibleRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            type="Retrieval", name="GteJaxBibleRetrieval", main_score="ndcg_at_10", **_task_args()
        )

        def load_data(self, num_proc=None, **kwargs):
            split = RetrievalSplitData(
                queries=Dataset.from_list([{"id": q["_id"], "text": q["text"]} for q in queries]),
                corpus=Dataset.from_list(
                    [{"id": d["_id"], "text": d["text"], "title": d["title"]} for d in corpus]
                ),
                relevant_docs=qrels,
                top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    class BibleSTS(AbsTaskSTS):
        metadata = TaskMetadata(
            type="STS", name="GteJaxBibleSTS", main_score="cosine_spearman", **_task_args()
        )
        min_score, max_score = 0, 5

        def load_data(self, num_proc=None, **kwargs):
            self.dataset = DatasetDict(
                {
                    "test": Dataset.from_dict(
                        {"sentence1": sentences1, "sentence2": sentences2, "score": gold}
                    )
                }
            )
            self.data_loaded = True

    enc = MTEBEncoder(embedder, max_length=MAX_LENGTH)
    assert isinstance(enc, EncoderProtocol)
    assert enc.mteb_model_meta.embed_dim == 384
    results = mteb.evaluate(
        enc, [BibleRetrieval(), BibleSTS()], cache=None, show_progress_bar=False
    )
    scores = {r.task_name: r.scores["test"][0] for r in results.task_results}

    # gte-jax's own pipeline on the same data (BEIR files written from the same rows).
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (tmp_path / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n"
        + "".join(f"{q}\t{d}\t{s}\n" for q, j in qrels.items() for d, s in j.items())
    )
    ours = evaluation.evaluate_beir(embedder, evaluation.read_beir(tmp_path), max_length=MAX_LENGTH)
    retrieval = scores["GteJaxBibleRetrieval"]
    # mteb rounds its scores to 5 decimals.
    assert retrieval["ndcg_at_10"] == pytest.approx(ours["ndcg@10"], abs=1e-5)
    assert retrieval["mrr_at_10"] == pytest.approx(ours["mrr@10"], abs=1e-5)
    assert retrieval["recall_at_10"] == pytest.approx(ours["recall@10"], abs=1e-5)
    assert retrieval["recall_at_1"] == pytest.approx(ours["recall@1"], abs=1e-5)
    sts = evaluation.evaluate_sts(
        embedder, sentences1, sentences2, np.asarray(gold), max_length=MAX_LENGTH
    )
    assert scores["GteJaxBibleSTS"]["cosine_spearman"] == pytest.approx(sts["spearman"], abs=1e-5)
    assert scores["GteJaxBibleSTS"]["cosine_pearson"] == pytest.approx(sts["pearson"], abs=1e-5)
