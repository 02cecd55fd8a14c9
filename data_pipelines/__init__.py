"""TFDS builders (array_record) for contrastive pair sources, and a one-call build helper.

Importing this package registers the builders with TFDS under their snake_case names
(``local_pairs``, ``msmarco_triples``, ``squad_pairs``, ``nli_triplets``).
"""

from __future__ import annotations

import pathlib

from data_pipelines.local_pairs import LocalPairs, LocalPairsConfig
from data_pipelines.msmarco import MsmarcoTriples
from data_pipelines.nli import NliTriplets
from data_pipelines.squad import SquadPairs

BUILDERS = {
    "local_pairs": LocalPairs,
    "msmarco_triples": MsmarcoTriples,
    "squad_pairs": SquadPairs,
    "nli_triplets": NliTriplets,
}

__all__ = [
    "BUILDERS",
    "LocalPairs",
    "LocalPairsConfig",
    "MsmarcoTriples",
    "NliTriplets",
    "SquadPairs",
    "build_dataset",
]


def build_dataset(
    name: str,
    *,
    data_dir: str | pathlib.Path,
    manual_dir: str | pathlib.Path | None = None,
    **builder_kwargs,
) -> pathlib.Path:
    """Prepares ``name`` (``builder`` or ``builder/config``, ours or any TFDS catalogue name) as
    array_record under ``data_dir``; files found in ``manual_dir`` are used instead of downloads.
    Returns the prepared dataset's directory."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(
        name, data_dir=str(data_dir), file_format="array_record", **builder_kwargs
    )
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
    builder.download_and_prepare(download_config=config)
    return pathlib.Path(builder.data_dir)
