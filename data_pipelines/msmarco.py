"""MS MARCO passage ranking triples (``triples.train.small.tsv``: query \\t positive \\t negative).

The official "small" triples file (~40M lines, ~27 GB unpacked) from the MS MARCO passage-ranking
task; each line becomes (query, positive, [negative]). Terms of use: MS MARCO is for
non-commercial research (https://microsoft.github.io/msmarco/).
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from data_pipelines.common import (
    MANUAL_INSTRUCTIONS,
    PairBuilder,
    example,
    local_or_download,
)
from gte_jax.data.sources import (
    BadInputAccounting,
    FieldMap,
    RecordParser,
    iter_raw_rows,
    parse_rows,
)

FILENAME = "triples.train.small.tsv"
URL = "https://msmarco.z22.web.core.windows.net/msmarcoranking/triples.train.small.tar.gz"


class MsmarcoTriples(PairBuilder):
    """MS MARCO passage triples: query, relevant passage, BM25 hard negative."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS.format(files=FILENAME)

    HOMEPAGE = "https://microsoft.github.io/msmarco/"
    CITATION = "Nguyen et al., MS MARCO (2016), arXiv:1611.09268"

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(local_or_download(dl_manager, FILENAME, URL))}

    def _generate_examples(self, path):
        acct = BadInputAccounting("msmarco_triples")
        parser = RecordParser(FieldMap("0", "1", "2", None), min_negatives=1)
        for loc, rec in parse_rows(iter_raw_rows(path, "tsv"), parser, acct):
            yield loc, example(rec)
        self.log_accounting(acct)
