"""Existing TFDS catalogue datasets as pair sources, through a field mapping.

The catalogue builder prepares the data as usual (``tfds build squad --file_format=array_record``
or ``gte-jax data build --builder squad``); reading goes through ``as_data_source`` and the
mapping names which features are query / positive / negatives (nested ones as ``"a/b"``).
"""

from __future__ import annotations

from gte_jax.data.sources import FieldMap, Source, SourceOptions, from_tfds

# Field mappings for a few catalogue datasets (name -> FieldMap).
KNOWN_FIELDS: dict[str, FieldMap] = {
    "squad": FieldMap("question", "context", None, None),
    "trivia_qa/rc.nocontext": FieldMap("question", "answer/value", None, None),
}


def catalog_source(
    tfds_name: str,
    *,
    data_dir: str | None = None,
    split: str = "train",
    fields: FieldMap | None = None,
    name: str | None = None,
    options: SourceOptions | None = None,
    on_bad_input: str = "skip",
) -> Source:
    """A :class:`~gte_jax.data.sources.Source` over a prepared TFDS dataset."""
    base = tfds_name.split(":")[0]
    if fields is None:
        if base not in KNOWN_FIELDS:
            raise ValueError(
                f"no field mapping known for {tfds_name!r}: pass fields=FieldMap(query=..., "
                f"positive=..., negatives=..., instruction=...); known: {sorted(KNOWN_FIELDS)}"
            )
        fields = KNOWN_FIELDS[base]
    return from_tfds(
        name or base.replace("/", "_"),
        tfds_name,
        data_dir=data_dir,
        split=split,
        fields=fields,
        options=options or SourceOptions(),
        on_bad_input=on_bad_input,
    )
