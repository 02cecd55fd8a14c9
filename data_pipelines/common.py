"""What every pair builder shares: the feature spec, file resolution, bad-input accounting."""

from __future__ import annotations

import inspect
import json
import logging
import pathlib
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils import py_utils

from gte_jax.data.sources import COUNTS_FILE, COUNTS_FORMAT, BadInputAccounting, PairRecord

logger = logging.getLogger(__name__)

HOMEPAGE = "https://github.com/gte-jax"


class PairBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of our builders (not registered itself): one example = one training pair
    (:func:`pair_features`); a builder sets ``HOMEPAGE`` and ``CITATION`` (``DESCRIPTION``
    defaults to its module's docstring)."""

    HOMEPAGE: str = HOMEPAGE
    CITATION: str = ""
    DESCRIPTION: str = ""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION or inspect.getmodule(type(self)).__doc__,
            features=pair_features(),
            homepage=self.HOMEPAGE,
            citation=self.CITATION or None,
        )

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        """Also writes :data:`~gte_jax.data.sources.COUNTS_FILE` (records and negatives per
        record of each split), so that opening the dataset reads it instead of every record.

        Written into TFDS's temporary build directory, so it appears with the data in one
        rename, or not at all."""
        generators = self._split_generators
        counts: dict[str, dict[int, int]] = {}
        accounts: dict[str, dict[str, Any]] = {}
        self._accounts: list[dict[str, Any]] = []

        def counted(*args, **kwargs):
            splits = generators(*args, **kwargs)
            return {
                split: _counting(gen, counts.setdefault(str(split), {}), self._accounts,
                                 accounts.setdefault(str(split), {}))
                for split, gen in splits.items()
            }  # fmt: skip

        self._split_generators = counted  # the instance attribute shadows the method
        try:
            super()._download_and_prepare(dl_manager, download_config)
        finally:
            del self._split_generators
        payload = {
            "format": COUNTS_FORMAT,
            "splits": {
                split: {
                    "num_records": sum(hist.values()),
                    "negatives_histogram": {str(k): v for k, v in sorted(hist.items())},
                    # The input lines the builder read, used and dropped (bad input).
                    "build": accounts[split],
                }
                for split, hist in counts.items()
            },
        }
        (epath.Path(self.data_dir) / COUNTS_FILE).write_text(json.dumps(payload, indent=1))

    def log_accounting(self, acct: BadInputAccounting) -> None:
        """Logs a split's bad-input counts (call at the end of ``_generate_examples``) and keeps
        them for the counts file."""
        log_accounting(acct)
        self._accounts.append(acct.stats.as_dict())

    # TFDS 4.9.10 finds a packaged builder's source through `importlib_resources`, which its
    # dependencies do not install (ModuleNotFoundError on first use); the file is all it needs.
    @py_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))


def _counting(
    examples: Iterator[Any], histogram: dict[int, int], logged: list[dict], build: dict
) -> Iterator[Any]:
    """Passes a split's ``(key, example)`` through, counting negatives per stored example; at
    its end, takes the bad-input counts its generator logged (splits are generated in turn)."""
    for key, ex in examples:
        k = len(ex["negatives"])
        histogram[k] = histogram.get(k, 0) + 1
        yield key, ex
    if logged:
        build.update(logged.pop())


def pair_features() -> tfds.features.FeaturesDict:
    """One example = one training pair; the feature names are what gte_jax.data reads by default."""
    return tfds.features.FeaturesDict(
        {
            "query": tfds.features.Text(),
            "positive": tfds.features.Text(),
            "negatives": tfds.features.Sequence(tfds.features.Text()),
            "instruction": tfds.features.Text(),
        }
    )


def example(rec: PairRecord, instruction: str = "") -> dict[str, Any]:
    return {
        "query": rec.query,
        "positive": rec.positive,
        "negatives": list(rec.negatives),
        "instruction": rec.instruction or instruction,
    }


MANUAL_INSTRUCTIONS = (
    "Optional: put the original file(s) ({files}) in the manual dir "
    "(`--manual_dir`, tfds DownloadConfig(manual_dir=...)) to skip the download."
)


def local_or_download(dl_manager, filename: str, url: str) -> pathlib.Path:
    """``filename`` from the manual dir if it is there, else downloaded (and extracted) from url."""
    try:
        manual = pathlib.Path(dl_manager.manual_dir)
    except AssertionError:  # no manual dir, or an empty one
        manual = None
    if manual is not None:
        hits = sorted(manual.rglob(filename))
        if hits:
            return hits[0]
    fetched = pathlib.Path(dl_manager.download_and_extract(url))
    if fetched.is_file():
        return fetched
    hits = sorted(fetched.rglob(filename))
    if not hits:
        raise FileNotFoundError(f"{url} unpacked to {fetched} without a {filename}")
    return hits[0]


def log_accounting(acct: BadInputAccounting) -> None:
    s = acct.stats
    logger.info(
        "%s: read %d, used %d, skipped %d %s",
        acct.source,
        s.read,
        s.used,
        s.skipped,
        s.reasons or "",
    )
