"""Sources: a name plus random access to validated (query, positive, negatives) records.

A source is read either from a prepared TFDS dataset (array_record, via ``as_data_source``) or
straight from local JSONL / TSV / Parquet / TXT files (quick fine-tunes without a build step).

Two kinds (``Source.kind``): ``"pairs"`` (query, positive[, negatives]) for contrastive stages,
and ``"text"``: single texts (a JSONL field, default ``"text"``; a TXT file, one text per line;
a Parquet column; a TFDS feature) for the unsupervised stages (SimCSE, MNTP). A text record is a
:class:`PairRecord` whose query and positive are the same string object: the sampler, batching,
text ids and the loss need nothing new, and a SimCSE batch is a pair batch of identical texts
(its two views differ only by their dropout keys, gte_jax/gradcache.py).

Bad input (malformed JSON, missing or empty fields, undecodable bytes, over-long texts) follows a
policy: ``"skip"`` (default) drops the record, counts it and logs the first few with ``file:line``;
``"error"`` raises :class:`InputError` naming ``file:line``. Per source the invariant
``read == used + skipped`` holds and :meth:`Source.stats` returns the counts for the run summary.

Local files are validated eagerly, when they are opened (parsed into memory), so ``Source[i]``
only ever returns valid records and ``len(source)`` (which the α mixture weights use) counts
valid records only. A TFDS dataset built by ``data_pipelines/`` (which validate when they build)
opens from the counts its builder wrote beside the data (:data:`COUNTS_FILE`: records and
negatives per record), without reading a record: at pre-training size a read-through costs hours
per process at every restart. A record that still turns out bad when read (read-time settings
stricter than the build's) is skipped and counted then, and index i stands for the next valid
record after it (cyclically): a pure function of the index, so every process and a resumed run
draw the same records. A dataset without counts (built before they were written, a catalogue
dataset, a sliced split, a field mapping other than the stored features) is read once through at
opening, as before (logged): its bad records are skipped and counted like a file's and only their
positions are kept, so memory is O(bad records) and index -> record stays a pure function.

Hard negatives: K (``num_negatives``) is decided once per source, when it is opened: the
configured value, or "auto" = the most common number of negatives among the records that have any
(0 if none has), logged. A record with fewer than K negatives is kept: the batch marks its missing
negatives invalid (``neg_valid``) and the loss leaves them out; ``stats()`` counts such records as
``records_short_of_negatives``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import pathlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from gte_jax.prompts import instruction_template, side_prompt
from gte_jax.textio import InputError, iter_json_lines, iter_lines

logger = logging.getLogger(__name__)

POLICIES = ("skip", "error")
FORMATS = ("jsonl", "tsv", "parquet", "txt")
SOURCE_KINDS = ("pairs", "text")
SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "txt",
}
# How many bad records per source are logged individually before only counting.
MAX_REPORTED = 5
# A text longer than this (characters) is treated as broken input, not as a long document:
# truncation to the token budget handles ordinary long texts.
DEFAULT_MAX_TEXT_CHARS = 100_000
# Records read per call when a TFDS source is checked through, when it is opened.
SCAN_CHUNK = 1024
# Written by the builders of data_pipelines/ beside a dataset's array_record files: per split,
# {"num_records": n, "negatives_histogram": {"k": records}}. A file of our own rather than TFDS's
# DatasetInfo.metadata: TFDS restores MetadataDict only through a builder class whose _info
# declares it, whereas this is read from the directory whatever reads it.
COUNTS_FILE = "gte_jax_counts.json"
COUNTS_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class PairRecord:
    """One training example. ``instruction`` / ``doc_instruction`` (may be empty) replace the
    source's query / document task for this record (:func:`gte_jax.prompts.side_prompt`); the
    document instruction covers the positive and the negatives."""

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    instruction: str = ""
    doc_instruction: str = ""
    # A teacher's scores of the positive then of each negative (``gte-jax mine --teacher-scores``
    # writes them as ``pos_score`` / ``neg_scores``), for distillation; empty: none.
    teacher_scores: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Which input fields hold the query, positive, negatives and (optional) query and document
    instructions.

    ``negatives`` may name a field holding one string or a list of strings. For TSV files the
    fields are column indices given as strings ("0", "1", ...) or header names when the file has
    a header (``tsv_header=True`` on the source).
    """

    query: str = "query"
    positive: str = "positive"
    negatives: str | None = "negatives"
    instruction: str | None = "instruction"
    doc_instruction: str | None = "doc_instruction"
    pos_score: str | None = "pos_score"
    neg_scores: str | None = "neg_scores"


@dataclasses.dataclass
class SourceStats:
    read: int = 0
    used: int = 0
    skipped: int = 0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_text(value: Any, what: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from e
    if not isinstance(value, str):
        raise InputError(f"{what} must be a string, got {type(value).__name__}")
    return value


class RecordParser:
    """Turns one raw row (a dict, or a list for header-less TSV) into a :class:`PairRecord`.

    Raises :class:`InputError` with a reason (without location: the caller adds ``file:line``).
    Shared by the direct file readers below and the TFDS builders in ``data_pipelines/``.
    """

    def __init__(
        self,
        fields: FieldMap = FieldMap(),
        *,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        min_negatives: int = 0,
    ):
        self.fields = fields
        self.max_text_chars = max_text_chars
        self.min_negatives = min_negatives

    def _get(self, row: Any, key: str | None, required: bool) -> Any:
        if key is None:
            return None
        if isinstance(row, (list, tuple)):
            try:
                return row[int(key)]
            except (IndexError, ValueError):
                if required:
                    raise InputError(
                        f"missing column {key!r} (row has {len(row)} columns)"
                    ) from None
                return None
        if not isinstance(row, Mapping):
            raise InputError(f"expected an object/row, got {type(row).__name__}")
        if key not in row or row[key] is None:
            if required:
                raise InputError(f"missing field {key!r} (fields present: {sorted(row)})")
            return None
        return row[key]

    def _text(self, value: Any, what: str) -> str:
        text = _as_text(value, what).strip()
        if not text:
            raise InputError(f"{what} is empty")
        if len(text) > self.max_text_chars:
            raise InputError(
                f"{what} has {len(text)} characters (> max_text_chars={self.max_text_chars})"
            )
        return text

    def __call__(self, row: Any) -> PairRecord:
        f = self.fields
        query = self._text(self._get(row, f.query, True), f"field {f.query!r}")
        positive = self._text(self._get(row, f.positive, True), f"field {f.positive!r}")
        raw_negs = self._get(row, f.negatives, False)
        if raw_negs is None:
            negs: list[Any] = []
        elif isinstance(raw_negs, (str, bytes)):
            negs = [raw_negs]
        else:
            negs = list(raw_negs)
        negatives = tuple(self._text(n, f"field {f.negatives!r}[{i}]") for i, n in enumerate(negs))
        if len(negatives) < self.min_negatives:
            raise InputError(
                f"needs at least {self.min_negatives} negative(s) in field {f.negatives!r}, "
                f"has {len(negatives)}"
            )
        instructions = []
        for key in (f.instruction, f.doc_instruction):
            raw = self._get(row, key, False)
            instructions.append("" if raw is None else _as_text(raw, f"field {key!r}"))
        scores = self._teacher_scores(row, len(negatives))
        return PairRecord(query, positive, negatives, *instructions, teacher_scores=scores)

    def _teacher_scores(self, row: Any, num_negatives: int) -> tuple[float, ...]:
        """(pos_score, *neg_scores) when the row has a positive score, else (); the negatives'
        scores must be one number per negative."""
        f = self.fields
        pos = self._get(row, f.pos_score, False)
        if pos is None:
            return ()
        negs = self._get(row, f.neg_scores, False)
        negs = [] if negs is None else negs
        if isinstance(negs, (str, bytes)) or not hasattr(negs, "__len__"):
            raise InputError(f"field {f.neg_scores!r} must be a list of numbers")
        if len(negs) != num_negatives:
            raise InputError(
                f"field {f.neg_scores!r} has {len(negs)} scores for {num_negatives} negatives"
            )
        out = []
        for i, value in enumerate([pos, *negs]):
            what = f"field {f.pos_score!r}" if i == 0 else f"field {f.neg_scores!r}[{i - 1}]"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"{what} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise InputError(f"{what} is not finite ({value})")
            out.append(float(value))
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class TextLine:
    """One line of a TXT file (a row type of its own: a JSONL line may hold a bare string)."""

    text: str


class TextParser(RecordParser):
    """One raw row -> a text record ``PairRecord(text, text)``: the field ``field`` of a JSONL
    object / Parquet row / TFDS example (nested TFDS features as ``"a/b"``), or a TXT line.

    Same validation as :class:`RecordParser` (UTF-8, not empty after stripping, at most
    ``max_text_chars``); raises :class:`InputError` without location."""

    def __init__(self, field: str = "text", *, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS):
        super().__init__(FieldMap(field, field, None, None), max_text_chars=max_text_chars)
        self.field = field

    def __call__(self, row: Any) -> PairRecord:
        if isinstance(row, TextLine):
            text = self._text(row.text, "line")
        else:
            text = self._text(self._get(row, self.field, True), f"field {self.field!r}")
        return PairRecord(text, text)  # one string object: no second copy in memory


# --------------------------------------------------------------------------------------------
# Raw row readers: yield (location, row or exception) so the policy lives in one place.


def _iter_jsonl(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
    return iter_json_lines(path)


def _iter_tsv(path: pathlib.Path, header: bool) -> Iterator[tuple[str, Any]]:
    names: list[str] | None = None
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            loc = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield loc, InputError(f"line is not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            cols = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE))
            if header and names is None:
                names = cols
                continue
            yield loc, (dict(zip(names, cols, strict=False)) if names is not None else cols)


def _iter_txt(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
    """One text per line; blank lines are layout (skipped, not counted), as in JSONL."""
    for loc, text in iter_lines(path, skip_blank=True):
        yield loc, text if isinstance(text, InputError) else TextLine(text)


def _iter_parquet(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    row_no = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            row_no += 1
            yield f"{path}:row {row_no}", row


def iter_raw_rows(path: str | pathlib.Path, fmt: str, *, tsv_header: bool = False):
    """Yields ``(location, row)`` for every record of one file; ``row`` may be a InputError."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if fmt == "jsonl":
        yield from _iter_jsonl(path)
    elif fmt == "tsv":
        yield from _iter_tsv(path, tsv_header)
    elif fmt == "parquet":
        yield from _iter_parquet(path)
    elif fmt == "txt":
        yield from _iter_txt(path)
    else:
        raise ValueError(f"unknown format {fmt!r} for {path}: use one of {FORMATS}")


def guess_format(path: str | pathlib.Path) -> str:
    suffix = pathlib.Path(path).suffix.lower()
    fmt = SUFFIX_FORMATS.get(suffix)
    if fmt is None:
        raise ValueError(f"cannot tell the format of {path}: set `format` to one of {FORMATS}")
    return fmt


class BadInputAccounting:
    """Applies the bad-input policy and keeps per-source counts (``read == used + skipped``)."""

    def __init__(self, source: str, policy: str = "skip"):
        if policy not in POLICIES:
            raise ValueError(f"on_bad_input={policy!r}: use one of {POLICIES}")
        self.source = source
        self.policy = policy
        self.stats = SourceStats()

    def ok(self) -> None:
        self.stats.read += 1
        self.stats.used += 1

    @staticmethod
    def reason(err: InputError) -> str:
        """The count's key for ``err``: its message without the part in brackets."""
        return str(err).split(" (")[0]

    def count_skipped(self, reason: str) -> None:
        self.stats.skipped += 1
        self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + 1

    def bad(self, location: str, err: InputError) -> None:
        self.stats.read += 1
        if self.policy == "error":
            raise InputError(
                f"{location}: {err} (source {self.source!r}); fix or remove the record, "
                "or set on_bad_input='skip' to drop bad records"
            ) from err
        reason = self.reason(err)
        self.count_skipped(reason)
        if self.stats.skipped <= MAX_REPORTED:
            logger.warning("%s: skipped bad record of source %r: %s", location, self.source, err)
        elif self.stats.skipped == MAX_REPORTED + 1:
            logger.warning("source %r: more bad records; only counting from now on", self.source)


def parse_rows(
    rows: Iterator[tuple[str, Any]], parser: RecordParser, acct: BadInputAccounting
) -> Iterator[tuple[str, PairRecord]]:
    """Yields ``(location, record)`` for the valid rows, accounting for the bad ones."""
    for loc, row in rows:
        try:
            if isinstance(row, InputError):
                raise row
            rec = parser(row)
        except InputError as e:
            acct.bad(loc, e)
            continue
        acct.ok()
        yield loc, rec


# --------------------------------------------------------------------------------------------
# Sources


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """How a source's texts are presented to the model (per source, from the config).

    query_prefix / doc_prefix: prepended to queries / documents (and negatives), e.g. E5's
      "query: " / "passage: ". Whether prompt tokens are pooled is the model's
      ``include_prompt`` (gte_jax.prompts).
    query_instruction / doc_instruction: the source's task for queries / documents, turned into
      the side's prompt by ``instruction_template`` (a preset of
      ``gte_jax.prompts.INSTRUCTION_TEMPLATES`` or a text with one "{task}"); a record's own
      instruction replaces the source's. A side has a prefix or an instruction, not both.
    batch_size: global batch size when this source is drawn (None: the run's batch size).
    num_negatives: K hard negatives per query (None: auto, the most common number of negatives
      among the source's records that have any; 0 if none has). Records with fewer are kept, with
      their missing negatives masked out of the loss.
    """

    query_prefix: str = ""
    doc_prefix: str = ""
    batch_size: int | None = None
    num_negatives: int | None = None
    query_instruction: str = ""
    doc_instruction: str = ""
    instruction_template: str = "plain"

    def __post_init__(self):
        instruction_template(self.instruction_template)  # raises on a bad template
        for side, prefix, task in (
            ("query", self.query_prefix, self.query_instruction),
            ("doc", self.doc_prefix, self.doc_instruction),
        ):
            if prefix and task:
                raise ValueError(
                    f"{side}_prefix={prefix!r} and {side}_instruction={task!r}: set one (an "
                    "instruction becomes the prompt through instruction_template)"
                )

    def query_prompt(self, instruction: str = "") -> str:
        """The query prompt; ``instruction``: the record's own task (replaces the source's)."""
        task = instruction or self.query_instruction
        return side_prompt(self.query_prefix, self.instruction_template, task)

    def doc_prompt(self, instruction: str = "") -> str:
        """The prompt of documents and negatives (``instruction`` as in :meth:`query_prompt`)."""
        task = instruction or self.doc_instruction
        return side_prompt(self.doc_prefix, self.instruction_template, task)


def auto_num_negatives(histogram: Mapping[int, int]) -> int:
    """Auto K: the most common number of negatives among records that have any (ties: the larger
    count); 0 when no record has a negative. ``histogram``: negatives per record -> records."""
    counts = {int(c): int(r) for c, r in histogram.items() if int(c) > 0 and int(r) > 0}
    if not counts:
        return 0
    return max(counts, key=lambda c: (counts[c], c))


class Source:
    """A named, random-access collection of valid :class:`PairRecord` s.

    ``skipped_at_build``: input records a TFDS builder dropped as bad (from its counts file;
    None when not known). ``stats()`` counts the stored records only.

    ``negatives_histogram``: number of negatives per record -> number of (valid) records; fixes
    the auto K and the count of records short of K (module docstring). ``kind``: ``"pairs"`` or
    ``"text"`` (single texts; module docstring)."""

    def __init__(
        self,
        name: str,
        size: int,
        getter: Callable[[int], PairRecord],
        *,
        options: SourceOptions = SourceOptions(),
        accounting: BadInputAccounting | None = None,
        negatives_histogram: Mapping[int, int] | None = None,
        kind: str = "pairs",
        record_instructions: frozenset[tuple[str, str]] | None = None,
        get_many: Callable[[Sequence[int]], list[PairRecord]] | None = None,
    ):
        if kind not in SOURCE_KINDS:
            raise ValueError(f"source {name!r}: kind={kind!r}, use one of {SOURCE_KINDS}")
        self.skipped_at_build: int | None = None
        self.name = name
        self.kind = kind
        # The distinct (instruction, doc_instruction) of the records, when known without a read
        # (in-memory sources): their prompts are checked at start-up, not at first use.
        self.record_instructions = record_instructions
        self._size = size
        self._get = getter
        self._get_many = get_many
        self.options = options
        self.accounting = accounting or BadInputAccounting(name)
        # Bad records of this source's file that no source holds (a MEDI record without a usable
        # task_name, or a task with no valid record): reported with this source, label -> counts,
        # so that the run's counts (skipped_records) still include them.
        self.unattributed: dict[str, SourceStats] = {}
        self.negatives_histogram = {
            int(c): int(r) for c, r in sorted((negatives_histogram or {0: size}).items())
        }
        if size == 0:
            raise ValueError(
                f"source {name!r} has no valid records ({self.accounting.stats.as_dict()}); "
                "check its path and field names"
            )
        k = self.num_negatives
        self.records_short_of_negatives = sum(
            r for c, r in self.negatives_histogram.items() if c < k
        )
        if options.num_negatives is None and any(self.negatives_histogram.keys() - {0}):
            logger.info(
                "source %r: num_negatives auto = %d (the most common count among records with "
                "negatives; negatives per record -> records: %s)",
                name, k, self.negatives_histogram,
            )  # fmt: skip
        if self.records_short_of_negatives:
            logger.warning(
                "source %r: %d of %d records have fewer than num_negatives=%d hard negatives: "
                "kept, with their missing negatives masked out of the loss",
                name, self.records_short_of_negatives, size, k,
            )  # fmt: skip

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> PairRecord:
        return self._get(int(index))

    def many(self, indices: Sequence[int]) -> list[PairRecord]:
        """``[self[i] for i in indices]``, in one read where the storage allows it (a TFDS
        dataset reads a list of records several times faster than one by one)."""
        if self._get_many is not None:
            return self._get_many([int(i) for i in indices])
        return [self._get(int(i)) for i in indices]

    def found_bad(self) -> dict[int, str]:
        """Stored records found bad when read (position -> reason): a TFDS source opened from
        its counts checks each record when it is read; other sources checked all at opening."""
        return self._get.found() if isinstance(self._get, LazyChecked) else {}

    def merge_found_bad(self, found: Mapping[int, str]) -> None:
        """Counts the bad records another process found (:meth:`found_bad`) as if read here."""
        if isinstance(self._get, LazyChecked):
            self._get.merge(found)

    @property
    def num_negatives(self) -> int:
        if self.options.num_negatives is not None:
            return self.options.num_negatives
        return auto_num_negatives(self.negatives_histogram)

    def stats(self) -> dict[str, Any]:
        out = {
            "size": len(self),
            "kind": self.kind,
            **self.accounting.stats.as_dict(),
            "num_negatives": self.num_negatives,
            "records_short_of_negatives": self.records_short_of_negatives,
            **(
                {"unattributed": {k: v.as_dict() for k, v in self.unattributed.items()}}
                if self.unattributed
                else {}
            ),
        }
        if self.skipped_at_build is not None:
            out["skipped_at_build"] = self.skipped_at_build
        return out

    def __repr__(self) -> str:
        return f"Source({self.name!r}, size={len(self)}, kind={self.kind!r})"


def skipped_records(stats: Mapping[str, Mapping[str, Any]]) -> int:
    """Bad records skipped over all sources (``{name: Source.stats()}``), those of a file that no
    source holds (``unattributed``) included."""
    return sum(
        int(s.get("skipped", 0))
        + sum(int(u["skipped"]) for u in s.get("unattributed", {}).values())
        for s in stats.values()
    )


def _histogram(counts: Iterable[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for c in counts:
        out[c] = out.get(c, 0) + 1
    return out


def from_records(
    name: str, records: Sequence[PairRecord], *, options: SourceOptions = SourceOptions()
) -> Source:
    """An in-memory source (tests, programmatic use)."""
    records = list(records)
    acct = BadInputAccounting(name)
    acct.stats.read = acct.stats.used = len(records)
    return _in_memory(name, records, options, acct)


def from_texts(
    name: str, texts: Sequence[str], *, options: SourceOptions = SourceOptions()
) -> Source:
    """An in-memory text source (tests, programmatic use); texts must be non-empty strings."""
    records = [PairRecord(t, t) for t in texts]
    acct = BadInputAccounting(name)
    acct.stats.read = acct.stats.used = len(records)
    return _in_memory(name, records, options, acct, kind="text")


def _in_memory(
    name: str,
    records: list[PairRecord],
    options: SourceOptions,
    acct: BadInputAccounting,
    kind: str = "pairs",
) -> Source:
    return Source(
        name,
        len(records),
        records.__getitem__,
        options=options,
        accounting=acct,
        negatives_histogram=_histogram(len(r.negatives) for r in records),
        kind=kind,
        record_instructions=frozenset((r.instruction, r.doc_instruction) for r in records),
    )


def from_files(
    name: str,
    paths: str | pathlib.Path | Sequence[str | pathlib.Path],
    *,
    fmt: str | None = None,
    fields: FieldMap = FieldMap(),
    options: SourceOptions = SourceOptions(),
    on_bad_input: str = "skip",
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    tsv_header: bool = False,
    text_field: str | None = None,
) -> Source:
    """Reads local JSONL / TSV / Parquet files directly, validating every record up front.

    ``text_field`` set: a text source (module docstring) reading that field of each JSONL
    object / Parquet row / TSV column; TXT files (one text per line) need it too, and ignore its
    value. ``fields`` is then unused."""
    if isinstance(paths, (str, pathlib.Path)):
        paths = [p for p in str(paths).split(",") if p]
    acct = BadInputAccounting(name, on_bad_input)
    if text_field is None:
        parser: RecordParser = RecordParser(fields, max_text_chars=max_text_chars)
    else:
        parser = TextParser(text_field, max_text_chars=max_text_chars)
    records: list[PairRecord] = []
    for path in paths:
        path_fmt = fmt or guess_format(path)
        if path_fmt == "txt" and text_field is None:
            raise ValueError(
                f"{path}: a TXT file holds single texts (one per line), not pairs: read it as a "
                f"text source (data.text_files, or kind='text' in data.sources) for "
                "stage kinds simcse / mntp"
            )
        rows = iter_raw_rows(path, path_fmt, tsv_header=tsv_header)
        records.extend(rec for _, rec in parse_rows(rows, parser, acct))
    if acct.stats.skipped:
        logger.warning(
            "source %r: skipped %d of %d records", name, acct.stats.skipped, acct.stats.read
        )
    return _in_memory(name, records, options, acct, kind="pairs" if text_field is None else "text")


def valid_position(bad: np.ndarray, index: int) -> int:
    """Storage position of the ``index``-th valid record, given the sorted bad positions.

    ``bad[t] - t`` is the number of valid records stored before bad record t, so the bad records
    before the index-th valid one are those with ``bad[t] - t <= index``."""
    return int(index) + int(np.searchsorted(bad - np.arange(len(bad)), index, side="right"))


PAIR_FIELDS = FieldMap("query", "positive", "negatives", "instruction", "doc_instruction")


def _scan(
    read_many: Callable[[list[int]], list[Any]],
    n: int,
    parse: Callable[[Any], PairRecord],
    acct: BadInputAccounting,
    where: str,
) -> tuple[list[int], dict[int, int]]:
    """One pass over a TFDS source's stored records: skips and counts the bad ones (like a file
    source's) and counts negatives per record (for K). Returns (bad positions, histogram)."""
    bad: list[int] = []
    histogram: dict[int, int] = {}
    for lo in range(0, n, SCAN_CHUNK):
        ids = list(range(lo, min(n, lo + SCAN_CHUNK)))
        examples = read_many(ids)
        for i, example in zip(ids, examples, strict=True):
            try:
                rec = parse(example)
            except InputError as e:
                acct.bad(f"{where}:{i}", e)
                bad.append(i)
                continue
            acct.ok()
            histogram[len(rec.negatives)] = histogram.get(len(rec.negatives), 0) + 1
    return bad, histogram


def read_counts(data_dir: Any, split: str, num_records: int) -> dict[str, Any] | None:
    """The entry of ``split`` in the builder's :data:`COUNTS_FILE` (``negatives_histogram`` with
    int keys, ``build``: the builder's bad-input counts), or None when the dataset has none
    (built before it was written) or it does not describe these records."""
    import etils.epath

    path = etils.epath.Path(data_dir) / COUNTS_FILE
    if not path.exists():
        return None
    try:
        counts = json.loads(path.read_text())
        entry = counts["splits"][split] if counts.get("format") == COUNTS_FORMAT else None
        if entry is None or int(entry["num_records"]) != num_records:
            return None
        hist = {int(k): int(v) for k, v in entry["negatives_histogram"].items()}
        return {**entry, "negatives_histogram": hist}
    except (KeyError, TypeError, ValueError) as e:
        logger.warning("%s: unreadable (%s); reading the records instead", path, e)
        return None


class LazyChecked:
    """Index -> record over stored records counted at build time, checking each when it is read.

    A bad record is skipped and counted the first time it is met (``acct``: read == used +
    skipped over the stored records), and index i stands for the next valid stored record after
    i, cyclically: a pure function of i whatever was read before, so the mixture stays
    deterministic across processes and resumes. Thread-safe (a prefetch thread reads records
    while the loop reads the counts)."""

    def __init__(
        self, read: Callable[[int], Any], n: int, parse: Callable[[Any], PairRecord],
        acct: BadInputAccounting, where: str,
    ):  # fmt: skip
        self._read, self._n, self._parse = read, n, parse
        self._acct, self._where = acct, where
        self._bad: dict[int, str] = {}  # stored position -> reason
        self._lock = threading.Lock()
        acct.stats.read = acct.stats.used = n

    def __call__(self, index: int) -> PairRecord:
        i = int(index)
        for _ in range(self._n):
            if i not in self._bad:
                try:
                    return self._parse(self._read(i))
                except InputError as e:
                    self._skip(i, e)
            i = (i + 1) % self._n
        raise InputError(f"{self._where}: every one of its {self._n} records is bad")

    def many(self, indices: Sequence[int], read_many: Callable[[list[int]], list[Any]]):
        """``[self(i) for i in indices]`` with the stored records read in one call."""
        out = []
        for i, raw in zip(indices, read_many(list(indices)), strict=True):
            try:
                out.append(self(i) if i in self._bad else self._parse(raw))
            except InputError as e:
                self._skip(i, e)
                out.append(self(i))
        return out

    def _skip(self, i: int, err: InputError) -> None:
        with self._lock:
            if i in self._bad:
                return
            self._acct.bad(f"{self._where}:{i}", err)  # raises with on_bad_input="error"
            self._bad[i] = self._acct.reason(err)
            # The stored record was counted as read and used at opening.
            self._acct.stats.read -= 1
            self._acct.stats.used -= 1

    def found(self) -> dict[int, str]:
        """The bad records met so far (stored position -> reason)."""
        with self._lock:
            return dict(self._bad)

    def merge(self, found: Mapping[int, str]) -> None:
        """Counts bad records met elsewhere (another process's :meth:`found`), each once."""
        with self._lock:
            for i, reason in found.items():
                if int(i) not in self._bad:
                    self._bad[int(i)] = reason
                    self._acct.count_skipped(reason)
                    self._acct.stats.used -= 1


def _pair_example_reader(ds: Any, features: Any) -> Callable[[list[int]], list[Any]] | None:
    """Reads a list of records of a dataset stored with our builders' features (three texts and
    a sequence of texts) and decodes their ``tf.train.Example`` bytes directly; None for other
    feature sets. TFDS's generic NumPy decoding costs ~4x more per record (measured:
    benchmarks/README.md), and every batch reads a process's rows' records through it."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.proto import tf_example_pb2

    raw = getattr(ds, "data_source", None)  # array_record's reader, the one grain uses
    text = tfds.features.Text
    if raw is None or set(features.keys()) != {"query", "positive", "negatives", "instruction"}:
        return None
    seq = features["negatives"]
    if not (
        all(isinstance(features[k], text) for k in ("query", "positive", "instruction"))
        and isinstance(seq, tfds.features.Sequence)
        and isinstance(seq.feature, text)
    ):
        return None
    decode = tf_example_pb2.Example.FromString

    def read(ids: list[int]) -> list[dict[str, Any]]:
        out = []
        for record in raw.__getitems__(ids):
            feature = decode(record).features.feature
            ex = {k: feature[k].bytes_list.value[0] for k in ("query", "positive", "instruction")}
            ex["negatives"] = list(feature["negatives"].bytes_list.value)
            out.append(ex)
        return out

    return read


def _tfds_data_source(tfds_name: str, data_dir: str | None, split: str):
    """(builder, data source) of a prepared TFDS dataset, or one short error."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        return builder, builder.as_data_source(split=split)
    except Exception as e:  # TFDS raises several types for "not prepared"
        # TFDS's own message lists its whole catalogue (~250 lines) when the name is unknown:
        # its first line says what went wrong; the rest buries the advice.
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        where = data_dir or "~/tensorflow_datasets (TFDS's default; set data.data_dir)"
        raise FileNotFoundError(
            f"TFDS dataset {tfds_name!r} (split {split!r}) is not prepared under {where}: "
            f"build it first (`gte-jax data build --builder {tfds_name.split(':')[0]} "
            f"--data_dir DIR`, or `tfds build`). TFDS said: {reason}"
        ) from e


def from_tfds(
    name: str,
    tfds_name: str,
    *,
    data_dir: str | None = None,
    split: str = "train",
    fields: FieldMap = PAIR_FIELDS,
    options: SourceOptions = SourceOptions(),
    on_bad_input: str = "skip",
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    text_field: str | None = None,
) -> Source:
    """A prepared TFDS dataset (array_record) read through ``as_data_source``.

    ``tfds_name`` is any name ``tfds.builder`` accepts (``"msmarco_triples"``,
    ``"local_pairs/my_config:1.0.0"``, a catalogue dataset such as ``"squad"``) and ``fields``
    maps its features onto query / positive / negatives / instruction (nested features as
    ``"a/b"``). Nothing is downloaded: build it first (``gte-jax data build``). With
    ``text_field`` (a feature name, nested as ``"a/b"``) it is a text source of that feature
    (module docstring; e.g. the ``"positive"`` of a pair dataset, or a catalogue text dataset).

    Opening reads the builder's counts (:data:`COUNTS_FILE`), not the records; bad records met
    later are skipped and counted when read (module docstring). Without counts it reads every
    record once (one read of the dataset per process at start-up, logged with its time): bad
    records are skipped and counted then, and ``len()`` counts valid records only.
    """
    builder, ds = _tfds_data_source(tfds_name, data_dir, split)
    acct = BadInputAccounting(name, on_bad_input)
    if text_field is None:
        parser: RecordParser = RecordParser(fields, max_text_chars=max_text_chars)
    else:
        parser = TextParser(text_field, max_text_chars=max_text_chars)
        fields = parser.fields
    n = len(ds)
    read_many = (
        _pair_example_reader(ds, builder.info.features)
        or getattr(ds, "__getitems__", None)
        or (lambda ids: [ds[i] for i in ids])
    )

    nested = [k for k in dataclasses.astuple(fields) if k and "/" in k]  # once, not per record
    stored = _Stored(
        name, f"{tfds_name}[{split}]", n, read_many,
        (lambda ex: parser(_flat(ex, nested))) if nested else parser, acct, options,
        "pairs" if text_field is None else "text",
    )  # fmt: skip
    # The counts describe the stored "negatives" feature; another negatives field needs a read.
    counts = None
    if text_field is not None or fields.negatives in ("negatives", None):
        counts = read_counts(builder.data_dir, split, n)
    if counts is None:
        return _by_reading(stored)
    histogram = counts["negatives_histogram"]
    if text_field is not None or fields.negatives is None:
        histogram = {0: n}
    # Nothing is read now: a mapping onto features the dataset lacks must fail here, not as
    # every record skipped when drawn.
    features = set(builder.info.features.keys())
    missing = [k for k in (fields.query, fields.positive) if k.split("/")[0] not in features]
    if missing:
        raise ValueError(
            f"source {name!r}: {stored.where} has no feature(s) {missing} (its features: "
            f"{sorted(features)}); check the source's field names"
        )
    source = _from_counts(stored, histogram)
    source.skipped_at_build = counts.get("build", {}).get("skipped")
    return source


def _flat(example: Mapping[str, Any], nested: Sequence[str]) -> dict[str, Any]:
    """The example with each nested field name ("a/b") also at its flat key."""
    out = dict(example)
    for key in nested:
        value: Any = example
        for part in key.split("/"):
            value = value.get(part) if isinstance(value, Mapping) else None
        out[key] = value
    return out


@dataclasses.dataclass
class _Stored:
    """A TFDS split being opened: how to read and parse its records, where to count."""

    name: str
    where: str
    n: int
    read_many: Callable[[list[int]], list[Any]]
    parse: Callable[[Any], PairRecord]
    acct: BadInputAccounting
    options: SourceOptions
    kind: str


def _from_counts(st: _Stored, histogram: dict[int, int]) -> Source:
    get = LazyChecked(lambda i: st.read_many([i])[0], st.n, st.parse, st.acct, st.where)
    logger.info(
        "source %r: %d records of %s (counts from %s)", st.name, st.n, st.where, COUNTS_FILE
    )
    return Source(
        st.name, st.n, get, options=st.options, accounting=st.acct,
        negatives_histogram=histogram, kind=st.kind,
        get_many=lambda ids: get.many(ids, st.read_many),
    )  # fmt: skip


def _by_reading(st: _Stored) -> Source:
    logger.warning(
        "source %r: %s has no %s for this split and field mapping: reading all %d records to "
        "count them (rebuild it with `gte-jax data build` to open it without a read)",
        st.name, st.where, COUNTS_FILE, st.n,
    )  # fmt: skip
    start = time.perf_counter()
    bad, histogram = _scan(st.read_many, st.n, st.parse, st.acct, st.where)
    bad_at = np.asarray(bad, dtype=np.int64)
    logger.info(
        "source %r: read %d records of %s in %.1f s, %d skipped",
        st.name, st.n, st.where, time.perf_counter() - start, len(bad),
    )  # fmt: skip
    if bad:
        logger.warning("source %r: skipped %d of %d records", st.name, len(bad), st.n)

    def position(index: int) -> int:
        return valid_position(bad_at, index) if len(bad_at) else int(index)

    def get(index: int) -> PairRecord:
        return st.parse(st.read_many([position(index)])[0])  # valid: checked by the read above

    def get_many(indices: Sequence[int]) -> list[PairRecord]:
        return [st.parse(ex) for ex in st.read_many([position(i) for i in indices])]

    return Source(
        st.name, st.n - len(bad), get, options=st.options, accounting=st.acct,
        negatives_histogram=histogram, kind=st.kind, get_many=get_many,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# MEDI (INSTRUCTOR, Su et al., 2023): one JSON file, a list of records
#   {"query": [instruction, text], "pos": [instruction, text], "neg": [instruction, text],
#    "task_name": "..."} (a side may carry a third item, 0 or 1, as in the release's README)
# read as one source per task, so that the α-sampler draws one task per batch (INSTRUCTOR §3).


def _medi_side(record: Mapping[str, Any], key: str, parser: RecordParser) -> tuple[str, str]:
    value = record.get(key)
    # The release's README shows a third item, 0 (query) or 1 (document): not needed here.
    if not isinstance(value, (list, tuple)) or len(value) not in (2, 3):
        raise InputError(f"field {key!r} must be [instruction, text], got {value!r:.80}")
    instruction = _as_text(value[0], f"field {key!r}[0] (instruction)")  # kept as is: a prompt
    return instruction, parser._text(value[1], f"field {key!r}[1] (text)")


def _medi_record(record: Any, parser: RecordParser) -> tuple[str, PairRecord]:
    """(task name, record) of one MEDI record; InputError (without location) when broken."""
    if not isinstance(record, Mapping):
        raise InputError(f"expected an object, got {type(record).__name__}")
    task = record.get("task_name")
    if not isinstance(task, str) or not task.strip():
        raise InputError(f"field 'task_name' must be a non-empty string, got {task!r:.80}")
    q_instr, query = _medi_side(record, "query", parser)
    d_instr, positive = _medi_side(record, "pos", parser)
    negatives: tuple[str, ...] = ()
    if record.get("neg") is not None:
        n_instr, negative = _medi_side(record, "neg", parser)
        if n_instr != d_instr:  # a batch gives the negatives their example's document prompt
            raise InputError(f"'neg' instruction {n_instr!r} differs from 'pos' {d_instr!r}")
        negatives = (negative,)
    return task.strip(), PairRecord(query, positive, negatives, q_instr, d_instr)


def read_medi(
    path: str | pathlib.Path,
    *,
    name: str = "medi",
    on_bad_input: str = "skip",
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
) -> tuple[dict[str, list[PairRecord]], dict[str, BadInputAccounting]]:
    """MEDI records by task, and bad-input accounting by task (a record whose ``task_name`` is
    unusable is counted under ``""``). Locations are ``file[index]`` (index in the JSON list)."""
    import json

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as fh:
            records = json.load(fh)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    if not isinstance(records, list):
        raise InputError(f"{path}: MEDI is one JSON list of records, got {type(records).__name__}")
    parser = RecordParser(max_text_chars=max_text_chars)
    by_task: dict[str, list[PairRecord]] = {}
    accounts: dict[str, BadInputAccounting] = {}

    def account(task: str) -> BadInputAccounting:
        if task not in accounts:
            accounts[task] = BadInputAccounting(f"{name}/{task}" if task else name, on_bad_input)
        return accounts[task]

    for index, raw in enumerate(records):
        try:
            task, rec = _medi_record(raw, parser)
        except InputError as e:
            task = raw.get("task_name") if isinstance(raw, Mapping) else None
            task = task.strip() if isinstance(task, str) else ""
            account(task).bad(f"{path}[{index}]", e)
            continue
        account(task).ok()
        by_task.setdefault(task, []).append(rec)
    return by_task, accounts


def from_medi(
    name: str,
    path: str | pathlib.Path,
    *,
    options: SourceOptions = SourceOptions(),
    on_bad_input: str = "skip",
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
) -> list[Source]:
    """One source per MEDI task, named ``"<name>/<task_name>"`` (sorted), with each record's
    query / document instructions (:func:`read_medi`). Records with an unusable ``task_name``,
    and the records of a task none of whose records is valid, belong to no source: they are
    skipped, logged, and counted in the first source's ``unattributed`` (:meth:`Source.stats`),
    so the run's ``skipped_records`` has every bad record of the file."""
    by_task, accounts = read_medi(
        path, name=name, on_bad_input=on_bad_input, max_text_chars=max_text_chars
    )
    unattributed: dict[str, SourceStats] = {}
    orphans = accounts.pop("", None)
    if orphans is not None:
        logger.warning(
            "%s: %d records without a usable task_name skipped", path, orphans.stats.skipped
        )
        unattributed[f"{name} (no usable task_name)"] = orphans.stats
    sources = []
    for task in sorted(accounts):
        acct = accounts[task]
        if acct.stats.skipped:
            logger.warning(
                "source %r: skipped %d of %d records", acct.source, acct.stats.skipped,
                acct.stats.read,
            )  # fmt: skip
        if by_task.get(task):
            sources.append(_in_memory(acct.source, by_task[task], options, acct))
        else:
            unattributed[acct.source] = acct.stats  # every record of the task was bad
    if not sources:
        raise ValueError(f"{path}: no valid MEDI records; check the file")
    sources[0].unattributed = unattributed
    return sources
