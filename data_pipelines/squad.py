"""SQuAD v1.1 (JSON) -> (question, answer-bearing context) pairs.

Config ``sentence`` (default): the positive is the sentence of the paragraph that contains the
first answer's ``answer_start`` (a short passage, as in sentence-level QA retrieval);
``paragraph``: the positive is the whole paragraph. Licence: CC BY-SA 4.0.
"""

from __future__ import annotations

import dataclasses
import json
import re

import tensorflow_datasets as tfds

from data_pipelines.common import (
    MANUAL_INSTRUCTIONS,
    PairBuilder,
    example,
    local_or_download,
)
from gte_jax.data.sources import BadInputAccounting, RecordParser
from gte_jax.textio import InputError

URLS = {
    "train": "https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json",
    "validation": "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json",
}
FILES = {"train": "train-v1.1.json", "validation": "dev-v1.1.json"}

# A sentence ends at . ! or ? followed by whitespace (good enough for Wikipedia prose).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentence_at(context: str, char: int) -> str:
    """The sentence of ``context`` that contains character offset ``char``."""
    start = 0
    for m in _SENTENCE_END.finditer(context):
        if m.start() > char:
            return context[start : m.start()]
        start = m.end()
    return context[start:]


@dataclasses.dataclass
class SquadConfig(tfds.core.BuilderConfig):
    positive: str = "sentence"  # sentence | paragraph


class SquadPairs(PairBuilder):
    """SQuAD v1.1 question -> context sentence (or paragraph)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        SquadConfig(name="sentence", positive="sentence"),
        SquadConfig(name="paragraph", positive="paragraph"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS.format(files=", ".join(FILES.values()))

    HOMEPAGE = "https://rajpurkar.github.io/SQuAD-explorer/"
    CITATION = "Rajpurkar et al., SQuAD (2016), arXiv:1606.05250"

    def _split_generators(self, dl_manager):
        return {
            split: self._generate_examples(local_or_download(dl_manager, FILES[split], URLS[split]))
            for split in FILES
        }

    def _generate_examples(self, path):
        acct = BadInputAccounting(f"squad_pairs/{self.builder_config.name}")
        parser = RecordParser()
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)["data"]
        for article in data:
            for p_i, para in enumerate(article.get("paragraphs", [])):
                context = para.get("context", "")
                for qa in para.get("qas", []):
                    loc = f"{path}:{article.get('title', '?')}/{p_i}/{qa.get('id', '?')}"
                    answers = qa.get("answers") or []
                    if self.builder_config.positive == "sentence" and answers:
                        positive = sentence_at(context, int(answers[0]["answer_start"]))
                    else:
                        positive = context
                    try:
                        if self.builder_config.positive == "sentence" and not answers:
                            raise InputError("question has no answer")
                        rec = parser({"query": qa.get("question"), "positive": positive})
                    except InputError as e:
                        acct.bad(loc, e)
                        continue
                    acct.ok()
                    yield qa.get("id") or loc, example(rec)
        self.log_accounting(acct)
