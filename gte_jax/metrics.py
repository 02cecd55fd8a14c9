"""Metric writers: TensorBoard event files (tensorboardX, no TensorFlow) and a JSONL log.

Only process 0 writes; other processes get a writer that does nothing, so call sites need no
``if jax.process_index() == 0`` guards.

A remote ``logdir`` (``gs://``) has no append: the JSONL log is kept in memory (with the rows a
previous run wrote) and uploaded whole, and the event files are written to a local temporary
directory and uploaded; both at most every ``sync_seconds`` and at ``flush``/``close``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from etils import epath

log = logging.getLogger(__name__)
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_./-]")


def _scalar(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value


class MetricWriter:
    def __init__(
        self,
        logdir: str | epath.PathLike | None,
        *,
        enabled: bool = True,
        sync_seconds: float = 30.0,
    ):
        self._tb = None
        self._jsonl = None
        self._remote: _RemoteLog | None = None
        if logdir is None or not enabled:
            return
        logdir = epath.Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        if "://" in os.fspath(logdir):
            self._remote = _RemoteLog(logdir, sync_seconds)
            self._jsonl = self._remote.jsonl
            tb_dir = self._remote.local_dir
        else:
            self._jsonl = (logdir / "metrics.jsonl").open("a")
            tb_dir = str(logdir)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # TensorBoard is optional; the JSONL log is always written
            log.warning("tensorboardX is not installed: writing metrics.jsonl only")
        else:
            self._tb = SummaryWriter(tb_dir)

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        scalars = {}
        for key, value in metrics.items():
            v = _scalar(value)
            if v is not None:
                scalars[f"{prefix}{key}"] = v
        if self._jsonl is not None:
            row = {
                "step": int(step),
                **{k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()},
            }
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, v in scalars.items():
                # TensorBoard tags allow [A-Za-z0-9_./-]: "ndcg@10" -> "ndcg_at_10".
                self._tb.add_scalar(_TAG_UNSAFE.sub("_", key.replace("@", "_at_")), v, int(step))
        if self._remote is not None and self._remote.due():
            self.flush()

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        if self._remote is not None:
            self._remote.sync()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._remote is not None:
            self._remote.sync()
            self._remote.cleanup()
            self._remote = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


class _RemoteLog:
    """Local stand-ins for a remote logdir, uploaded whole by :meth:`sync`."""

    def __init__(self, logdir: epath.Path, sync_seconds: float):
        self.logdir = logdir
        self.sync_seconds = sync_seconds
        self._tmp = tempfile.TemporaryDirectory(prefix="gte_jax_logs_")
        self.local_dir = os.path.join(self._tmp.name, "events")
        self.jsonl = io.StringIO()
        previous = logdir / "metrics.jsonl"
        if previous.exists():  # a resumed run continues the log
            self.jsonl.write(previous.read_text())
        self._last_sync = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._last_sync >= self.sync_seconds

    def sync(self) -> None:
        (self.logdir / "metrics.jsonl").write_text(self.jsonl.getvalue())
        if os.path.isdir(self.local_dir):
            for name in sorted(os.listdir(self.local_dir)):
                with open(os.path.join(self.local_dir, name), "rb") as f:
                    (self.logdir / name).write_bytes(f.read())
        self._last_sync = time.monotonic()

    def cleanup(self) -> None:
        self._tmp.cleanup()
