"""SNLI / MultiNLI (jsonl) -> (premise, entailed hypothesis, [contradicting hypothesis]) triplets.

As SimCSE (Gao et al. 2021) and GTE's fine-tuning data: for a premise, each hypothesis labelled
``entailment`` is a positive and a ``contradiction`` hypothesis of the same premise the hard
negative. Premises without both are dropped (config ``triplets``) or kept as pairs without
negatives (config ``pairs``, entailment only). Licences: SNLI CC BY-SA 4.0; MultiNLI mostly OANC /
CC BY-SA (see its data description).
"""

from __future__ import annotations

import collections
import dataclasses

import tensorflow_datasets as tfds

from data_pipelines.common import (
    MANUAL_INSTRUCTIONS,
    PairBuilder,
    example,
    local_or_download,
)
from gte_jax.data.sources import BadInputAccounting, RecordParser, iter_raw_rows
from gte_jax.textio import InputError

CORPORA = {
    "snli": ("https://nlp.stanford.edu/projects/snli/snli_1.0.zip", "snli_1.0_train.jsonl"),
    "multinli": (
        "https://cims.nyu.edu/~sbowman/multinli/multinli_1.0.zip",
        "multinli_1.0_train.jsonl",
    ),
}


@dataclasses.dataclass
class NliConfig(tfds.core.BuilderConfig):
    corpus: str = "snli"
    triplets: bool = True


class NliTriplets(PairBuilder):
    """NLI entailment pairs with contradiction hard negatives."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        NliConfig(name="snli", corpus="snli"),
        NliConfig(name="multinli", corpus="multinli"),
        NliConfig(name="snli_pairs", corpus="snli", triplets=False),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS.format(
        files=", ".join(f for _, f in CORPORA.values())
    )

    HOMEPAGE = "https://nlp.stanford.edu/projects/snli/"
    CITATION = "Bowman et al. (2015); Williams et al. (2018); Gao et al., SimCSE (2021)"

    def _split_generators(self, dl_manager):
        url, filename = CORPORA[self.builder_config.corpus]
        return {"train": self._generate_examples(local_or_download(dl_manager, filename, url))}

    def _generate_examples(self, path):
        cfg: NliConfig = self.builder_config
        acct = BadInputAccounting(f"nli_triplets/{cfg.name}")
        parser = RecordParser()
        # premise -> label -> hypotheses (first-seen order, deterministic)
        groups: dict[str, dict[str, list[str]]] = collections.defaultdict(
            lambda: collections.defaultdict(list)
        )
        first_loc: dict[str, str] = {}
        for loc, row in iter_raw_rows(path, "jsonl"):
            try:
                if isinstance(row, InputError):
                    raise row
                label = row.get("gold_label")
                premise = (row.get("sentence1") or "").strip()
                hypothesis = (row.get("sentence2") or "").strip()
                if label not in ("entailment", "neutral", "contradiction"):
                    raise InputError(f"no gold label (gold_label={label!r})")
                if not premise or not hypothesis:
                    raise InputError("empty sentence1 or sentence2")
            except InputError as e:
                acct.bad(loc, e)
                continue
            acct.ok()
            groups[premise][label].append(hypothesis)
            first_loc.setdefault(premise, loc)
        for premise, by_label in groups.items():
            contradictions = by_label.get("contradiction", [])
            if cfg.triplets and not contradictions:
                continue
            for j, positive in enumerate(by_label.get("entailment", [])):
                negs = [contradictions[j % len(contradictions)]] if cfg.triplets else []
                try:
                    rec = parser({"query": premise, "positive": positive, "negatives": negs})
                except InputError:
                    continue  # already validated above; over-long texts only
                yield f"{first_loc[premise]}#{j}", example(rec)
        self.log_accounting(acct)
