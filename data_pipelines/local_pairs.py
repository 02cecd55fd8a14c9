"""Generic builder for local pair / triplet files (JSONL, TSV, Parquet) -> array_record.

    config = LocalPairsConfig(name="my_pairs", files={"train": ["a.jsonl"]},
                              fields=FieldMap("q", "pos", "negs"), instruction="query: ")
    builder = LocalPairs(config=config, data_dir=DIR, file_format="array_record")
    builder.download_and_prepare()

Records go through the same parser and bad-input policy as direct reading
(``gte_jax.data.sources``): with ``on_bad_input="skip"`` broken lines are dropped and counted,
with ``"error"`` the build stops at the first one, naming ``file:line``.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from data_pipelines.common import PairBuilder, example
from gte_jax.data.sources import (
    DEFAULT_MAX_TEXT_CHARS,
    BadInputAccounting,
    FieldMap,
    RecordParser,
    guess_format,
    iter_raw_rows,
    parse_rows,
)


@dataclasses.dataclass
class LocalPairsConfig(tfds.core.BuilderConfig):
    """files: split -> list of paths; format: jsonl | tsv | parquet ("" = from the suffix).

    fields: input field names (TSV: column indices as strings, or header names with
    tsv_header=True); instruction: stored with every record that has none of its own;
    source_name: name used in logs and error messages (default: the config name).
    """

    files: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    format: str = ""
    fields: FieldMap = FieldMap()
    tsv_header: bool = False
    instruction: str = ""
    source_name: str = ""
    on_bad_input: str = "skip"
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS


class LocalPairs(PairBuilder):
    """Pairs / triplets from local files; one BuilderConfig per local dataset."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [LocalPairsConfig(name="default")]

    DESCRIPTION = "Local (query, positive, negatives) records for contrastive training."

    def _split_generators(self, dl_manager):
        cfg: LocalPairsConfig = self.builder_config
        if not cfg.files:
            raise ValueError(
                f"LocalPairsConfig {cfg.name!r} has no files: pass "
                "config=LocalPairsConfig(name=..., files={'train': [...]})"
            )
        return {split: self._generate_examples(paths) for split, paths in cfg.files.items()}

    def _generate_examples(self, paths):
        cfg: LocalPairsConfig = self.builder_config
        acct = BadInputAccounting(cfg.source_name or cfg.name, cfg.on_bad_input)
        parser = RecordParser(cfg.fields, max_text_chars=cfg.max_text_chars)
        for path in paths:
            rows = iter_raw_rows(path, cfg.format or guess_format(path), tsv_header=cfg.tsv_header)
            for loc, rec in parse_rows(rows, parser, acct):
                yield loc, example(rec, cfg.instruction)
        self.log_accounting(acct)
