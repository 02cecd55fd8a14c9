"""Metric writers: TensorBoard event files (tensorboardX, no TensorFlow) and a JSONL log.

Only process 0 writes; other processes get a writer that does nothing, so call sites need no
``if jax.process_index() == 0`` guards.
"""

from __future__ import annotations

import json
import logging
import math
import re
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
    def __init__(self, logdir: str | epath.PathLike | None, *, enabled: bool = True):
        self._tb = None
        self._jsonl = None
        if logdir is None or not enabled:
            return
        logdir = epath.Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (logdir / "metrics.jsonl").open("a")
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # TensorBoard is optional; the JSONL log is always written
            log.warning("tensorboardX is not installed: writing metrics.jsonl only")
        else:
            self._tb = SummaryWriter(str(logdir))

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

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
