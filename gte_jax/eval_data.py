"""Evaluation data readers: BEIR-format retrieval sets (``corpus.jsonl``, ``queries.jsonl``,
``qrels/<split>.tsv``) and STS JSONL (``sentence1``, ``sentence2``, ``score``). Bad input raises
:class:`~gte_jax.textio.InputError` naming ``file:line``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from gte_jax.textio import InputError, iter_jsonl, iter_lines, jsonl_field

logger = logging.getLogger(__name__)


def doc_text(record: Mapping[str, Any], where: str) -> str:
    """BEIR / sentence-transformers: ``(title + " " + text).strip()`` when there is a title."""
    text = jsonl_field(record, "text", where)
    title = record.get("title") or ""
    if not isinstance(title, str):
        raise InputError(f'{where}: field "title" has type {type(title).__name__}.')
    return (title + " " + text).strip() if title else text


@dataclasses.dataclass
class BeirData:
    """A BEIR-format split: the corpus, the queries that have qrels, and the qrels."""

    corpus: dict[str, str]  # doc id -> title + " " + text
    queries: dict[str, str]  # query id -> text (only queries that appear in qrels)
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: grade}


def read_beir(directory: str | epath.PathLike, split: str = "test") -> BeirData:
    """Read ``corpus.jsonl`` (_id, title, text), ``queries.jsonl`` (_id, text) and
    ``qrels/<split>.tsv`` (tab-separated query-id, corpus-id, score; header line optional)."""
    directory = epath.Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory; pass a BEIR-format dataset directory.")
    qrels_path = directory / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        found = sorted(p.stem for p in (directory / "qrels").glob("*.tsv"))
        raise InputError(
            f"{qrels_path}: no such file; splits found: {found or 'none'} (choose one with --split)."
        )
    qrels, qrels_line = _read_qrels(qrels_path)

    corpus_path, queries_path = directory / "corpus.jsonl", directory / "queries.jsonl"
    corpus = _read_by_id(corpus_path, doc_text)
    all_queries = _read_by_id(queries_path, lambda r, where: jsonl_field(r, "text", where))

    missing = [qid for qid in qrels if qid not in all_queries]
    if missing:
        raise InputError(
            f"{qrels_line[missing[0]]}: query {missing[0]!r} is not in "
            f"{queries_path} ({len(missing)} such queries)."
        )
    unknown_docs = {d for judged in qrels.values() for d in judged if d not in corpus}
    if unknown_docs:
        logger.warning(
            "%s: %d judged documents are not in the corpus (they still count as relevant)",
            qrels_path,
            len(unknown_docs),
        )
    return BeirData(corpus, {qid: all_queries[qid] for qid in qrels}, qrels)


def read_sts(path: str | epath.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    """JSONL with ``sentence1``, ``sentence2``, ``score`` -> (sentences1, sentences2, scores)."""
    path = epath.Path(path)
    first, second, scores = [], [], []
    for where, record in iter_jsonl(path):
        first.append(jsonl_field(record, "sentence1", where))
        second.append(jsonl_field(record, "sentence2", where))
        scores.append(float(jsonl_field(record, "score", where, (int, float))))
    if len(scores) < 2:
        raise InputError(f"{path}: needs at least 2 sentence pairs, found {len(scores)}.")
    return first, second, np.asarray(scores, np.float64)


def _read_by_id(path: epath.Path, text_of) -> dict[str, str]:
    """``{_id: text_of(record, "file:line")}`` of a BEIR JSONL file; a repeated ``_id`` is an error."""
    out: dict[str, str] = {}
    for where, record in iter_jsonl(path):
        key = str(jsonl_field(record, "_id", where, (str, int)))
        if key in out:
            raise InputError(f"{where}: duplicate _id {key!r}.")
        out[key] = text_of(record, where)
    return out


def _read_qrels(path: epath.Path) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """qrels TSV -> ({query id: {doc id: grade}}, {query id: "file:line" of its first judgement})."""
    qrels: dict[str, dict[str, int]] = {}
    first_seen: dict[str, str] = {}
    for where, line in iter_lines(path, skip_blank=True):
        if isinstance(line, InputError):
            raise InputError(f"{where}: {line}.")
        fields = line.split("\t")
        if where.endswith(":1") and fields[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue  # header
        if len(fields) != 3:
            raise InputError(
                f"{where}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                f"got {len(fields)}."
            )
        qid, did, score = (x.strip() for x in fields)
        try:
            grade = int(float(score))
        except ValueError:
            raise InputError(f"{where}: score {score!r} is not a number.") from None
        qrels.setdefault(qid, {})[did] = grade
        first_seen.setdefault(qid, where)
    return qrels, first_seen
