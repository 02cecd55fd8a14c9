"""The output directory of ``gte-jax synth``: append-only JSONL that a killed run continues.

Layout of ``DIR``:

- ``<category>.jsonl``: kept examples in the training format (``query``, ``positive``,
  ``negatives``, ``instruction``) plus where each came from (``id``, ``task``, ``seed``,
  ``placeholders``, ...); one file per category, so the α-sampler mixes them as sources;
- ``tasks.jsonl``: one line per brainstorm round (``category``, ``tasks``);
- ``rejected.jsonl``: one line per rejected reply (``id``, ``stage``, ``reason``, ``detail``,
  the start of the reply);
- ``synth.json``: the settings each step was run with (a rerun with others is refused);
- ``summary.json``: kept / rejected per reason, counted from the files, and the last run's figures.

Every finished job writes exactly one line, to exactly one file, as one ``write`` + ``flush``, so
the ids in the files are the jobs done. A run killed mid-write leaves at most a last line without
its newline: :func:`repair_torn_line` drops it (counted), and its job is done again. Failed
requests write nothing, so a rerun retries them.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from gte_jax.errors import ConfigError
from gte_jax.textio import iter_jsonl, jsonl_field

TASKS_FILE = "tasks.jsonl"
REJECTED_FILE = "rejected.jsonl"
SETTINGS_FILE = "synth.json"
SUMMARY_FILE = "summary.json"


def repair_torn_line(path: pathlib.Path) -> int:
    """Cuts a last line that has no newline (a write cut short by a kill); 1 if one was cut."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with path.open("rb+") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return 0
        pos = end
        while pos > 0:  # back to the last newline, a block at a time (files may be large)
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            cut = f.read(step).rfind(b"\n")
            if cut >= 0:
                f.truncate(pos + cut + 1)
                return 1
        f.truncate(0)
    return 1


def read_lines(path: pathlib.Path, fields: tuple[str, ...] = ("id",)) -> Iterator[dict[str, Any]]:
    """The records of one output file (none if it does not exist), each with the text ``fields``;
    a bad line (the torn last one was repaired before) raises InputError naming file:line."""
    if path.exists():
        for loc, record in iter_jsonl(path):
            for name in fields:
                jsonl_field(record, name, loc)
            yield record


class Appender:
    """One output file open for appending, one line per :meth:`write`."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._file: TextIO | None = None

    def write(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class OutputDir:
    """The files of one ``DIR`` (see the module docstring), repaired when opened."""

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"--out {self.root} is a file; give a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        self.torn_lines_repaired = sum(
            repair_torn_line(p) for p in sorted(self.root.glob("*.jsonl"))
        )
        self._appenders: dict[str, Appender] = {}

    def category_path(self, category: str) -> pathlib.Path:
        return self.root / f"{category}.jsonl"

    def appender(self, name: str) -> Appender:
        if name not in self._appenders:
            self._appenders[name] = Appender(self.root / name)
        return self._appenders[name]

    def close(self) -> None:
        for appender in self._appenders.values():
            appender.close()

    def check_settings(self, step: str, settings: Mapping[str, Any]) -> None:
        """Records ``settings`` of ``step`` on first use; refuses different ones later, since a
        directory made with two models, seeds or prompt sets could not be regenerated."""
        path = self.root / SETTINGS_FILE
        recorded = json.loads(path.read_text()) if path.exists() else {}
        before = recorded.get(step)
        if before is None:
            recorded[step] = dict(settings)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
            tmp.replace(path)
            return
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            diffs = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise ConfigError(
                f"{self.root} was made by `{step}` with other settings ({diffs}); rerun with the "
                f"recorded ones (see {path}) or use another --out"
            )

    def write_summary(self, summary: Mapping[str, Any]) -> pathlib.Path:
        path = self.root / SUMMARY_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        return path
