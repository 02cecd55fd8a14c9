"""Write the quality suite's tasks to a workdir (cached): per task ``train.jsonl`` (query /
positive pairs for in-domain training) and BEIR-format ``dev/`` and ``test/`` directories
(``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``) that ``gte_jax.evaluation.read_beir``
reads. Identical texts (after :func:`tasks.norm`) are one document / one query; a query's relevant
documents are all the positives paired with its text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

from benchmarks.quality import tasks

VERSION = 4  # bump when a builder changes: cached workdirs are rebuilt


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Caps per split, in pairs (whole groups taken in hash order until the cap) and in queries
    evaluated (the corpus keeps every document of the split's pairs: a larger corpus is harder)."""

    train_pairs: int
    dev_pairs: int
    test_pairs: int
    eval_queries: int


# Sized for a CPU (a model's whole suite in minutes); the test corpora still hold thousands of
# documents, which is what keeps MiniLM far from the ceiling (ours).
FULL = Sizes(train_pairs=100_000, dev_pairs=1_000, test_pairs=2_000, eval_queries=300)
QUICK = Sizes(train_pairs=32, dev_pairs=40, test_pairs=120, eval_queries=40)  # the CI test's


def _rank(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def cap_groups(pairs: list[tasks.Pair], n: int) -> list[tasks.Pair]:
    """Whole groups in hash order until ``n`` pairs (a deterministic subset, stable as n grows)."""
    by_group: dict[str, list[tasks.Pair]] = {}
    for p in pairs:
        by_group.setdefault(p.group, []).append(p)
    out: list[tasks.Pair] = []
    for g in sorted(by_group, key=_rank):
        if len(out) >= n:
            break
        out += by_group[g]
    return out[:n]


def beir_records(pairs: list[tasks.Pair], max_queries: int) -> tuple[dict, dict, dict]:
    """(corpus {id: text}, queries {id: text}, qrels {qid: {did: 1}}) from pairs."""
    doc_id: dict[str, str] = {}
    corpus: dict[str, str] = {}
    for p in pairs:
        key = tasks.norm(p.positive)
        if key not in doc_id:
            doc_id[key] = f"d{len(doc_id)}"
            corpus[doc_id[key]] = p.positive
    texts: dict[str, str] = {}
    judged: dict[str, dict[str, int]] = {}
    for p in pairs:
        key = tasks.norm(p.query)
        texts.setdefault(key, p.query)
        judged.setdefault(key, {})[doc_id[tasks.norm(p.positive)]] = 1
    keep = sorted(texts, key=_rank)[:max_queries]
    # A query whose text is also a document (bible_ot: each verse is the next verse of the one
    # before) takes that document's id, BEIR's convention (Quora, ArguAna): the evaluation's
    # ignore_identical_ids then never ranks the query itself, which would otherwise be every
    # model's first hit (cosine 1) and cap MRR@10 at 0.5. A document that is the query's own
    # text is never relevant to it.
    qid = {k: doc_id.get(k, f"q{i}") for i, k in enumerate(keep)}
    qrels = {qid[k]: {d: g for d, g in judged[k].items() if d != qid[k]} for k in qid}
    keep = [k for k in keep if qrels[qid[k]]]
    return corpus, {qid[k]: texts[k] for k in keep}, {qid[k]: qrels[qid[k]] for k in keep}


def write_beir(out: pathlib.Path, split: str, corpus: dict, queries: dict, qrels: dict) -> None:
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "corpus.jsonl", ({"_id": i, "text": t} for i, t in corpus.items()))
    _write_jsonl(out / "queries.jsonl", ({"_id": i, "text": t} for i, t in queries.items()))
    lines = ["query-id\tcorpus-id\tscore"]
    lines += [f"{q}\t{d}\t{g}" for q, docs in qrels.items() for d, g in docs.items()]
    (out / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_jsonl(path: pathlib.Path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build_task(name: str, out: pathlib.Path, sizes: Sizes, reserved: set[str]) -> dict:
    """Build one task under ``out`` -> its manifest entry (counts per split)."""
    by_split = tasks.split_pairs(name, tasks.TASKS[name](), reserved)
    caps = {"train": sizes.train_pairs, "dev": sizes.dev_pairs, "test": sizes.test_pairs}
    counts: dict[str, dict[str, int]] = {}
    for split in tasks.SPLITS:
        pairs = cap_groups(by_split[split], caps[split])
        if split == "train":
            recs = ({"query": p.query, "positive": p.positive} for p in pairs)
            out.mkdir(parents=True, exist_ok=True)
            _write_jsonl(out / "train.jsonl", recs)
            counts[split] = {"pairs": len(pairs)}
            continue
        corpus, queries, qrels = beir_records(pairs, sizes.eval_queries)
        write_beir(out / split, split, corpus, queries, qrels)
        counts[split] = {"pairs": len(pairs), "docs": len(corpus), "queries": len(queries)}
    return counts


def build_suite(workdir: str | pathlib.Path, *, quick: bool = False) -> pathlib.Path:
    """Build every task (once: a manifest with the same version and sizes means it is cached)
    -> the suite's directory, ``<workdir>/quick`` or ``<workdir>/full``."""
    sizes = QUICK if quick else FULL
    root = pathlib.Path(workdir) / ("quick" if quick else "full")
    manifest_path = root / "manifest.json"
    key = {"version": VERSION, "sizes": dataclasses.asdict(sizes)}
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in key} == key:
            return root
    reserved = tasks.reserved_texts()
    counts = {name: build_task(name, root / name, sizes, reserved) for name in tasks.TASKS}
    manifest_path.write_text(json.dumps({**key, "tasks": counts}, indent=1))
    return root
