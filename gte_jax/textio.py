"""Reading text files: one JSONL reader and one error style for every command and source.

Bad input is an :class:`InputError` whose message names ``file:line`` and what is wrong. Training
sources skip and count bad lines (:func:`iter_json_lines` yields the error instead of raising);
``encode``, ``eval`` and ``mine`` stop at the first one (:func:`iter_jsonl`). Paths may be local or
``gs://`` (``etils.epath``).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator, Mapping
from typing import Any

from etils import epath


class InputError(ValueError):
    """Input data that cannot be used; the message names ``file:line`` and what to fix."""


def describe_json_error(e: json.JSONDecodeError, line: str) -> str:
    """What is wrong with one JSON line, as a whole phrase: json's own messages stop where it
    appends the position ("Unterminated string starting at"), so add the column here."""
    what, end = e.msg.removesuffix(" at"), len(line.rstrip())
    cut = e.msg.startswith("Unterminated") or e.pos >= end
    hint = "; the line ends before the JSON object does" if cut else ""
    return f"{what[:1].lower()}{what[1:]} at column {min(e.pos, end) + 1}{hint}"


def iter_lines(path: epath.PathLike, *, skip_blank: bool) -> Iterator[tuple[str, Any]]:
    """(``file:line``, text without its line break, or an :class:`InputError`) per line."""
    path = epath.Path(path)
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if skip_blank and not raw.strip():
                continue  # blank lines are layout, not records
            loc = f"{path}:{lineno}"
            try:
                yield loc, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield loc, InputError(f"not valid UTF-8 ({e.reason} at byte {e.start})")


def iter_json_lines(path: epath.PathLike) -> Iterator[tuple[str, Any]]:
    """(``file:line``, parsed JSON value, or an :class:`InputError`) per non-blank line."""
    for loc, text in iter_lines(path, skip_blank=True):
        if isinstance(text, InputError):
            yield loc, text
            continue
        try:
            yield loc, json.loads(text)
        except json.JSONDecodeError as e:
            yield loc, InputError(f"malformed JSON ({describe_json_error(e, text)})")


def iter_jsonl(path: epath.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``file:line``, object) per non-blank line; the first bad line raises :class:`InputError`."""
    path = epath.Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file.")
    for loc, value in iter_json_lines(path):
        if isinstance(value, InputError):
            raise InputError(f"{loc}: {value}.")
        if not isinstance(value, dict):
            raise InputError(f"{loc}: expected a JSON object.")
        yield loc, value


def jsonl_field(record: Mapping[str, Any], key: str, where: str, kind: type | tuple = str) -> Any:
    """``record[key]`` of type ``kind``, or an :class:`InputError` naming ``where``."""
    if key not in record:
        raise InputError(f'{where}: missing field "{key}".')
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InputError(f'{where}: field "{key}" has type {type(value).__name__}.')
    return value


def normalise(text: str) -> str:
    """The one rule for "the same text" (synth's duplicates, mine's excluded candidates): NFKC,
    case-folded, punctuation and symbols removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in text)
    return " ".join(kept.split())
