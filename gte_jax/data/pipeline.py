"""Builds sources and the batch iterator from a config's ``data`` group.

``data`` fields (defaults in :func:`default_data_config`; GTE §3.1 for α = 0.5):

- ``tokenizer``: local Hugging Face tokenizer directory (``AutoTokenizer.from_pretrained``).
- ``train_files``: comma-separated JSONL files (``query``/``positive``[/``negatives``]), each a
  source named by its file stem. Combined with ``sources``.
- ``sources``: list of dicts, one per source, fields as in ``SOURCE_DEFAULTS``: ``name``; either
  ``path`` (comma-separated local JSONL/TSV/Parquet files, ``format`` guessed from the suffix) or
  ``tfds`` (a prepared TFDS dataset name read from ``data_dir``, ``split``); field names
  ``query_field``/``positive_field``/``negatives_field``/``instruction_field``/
  ``doc_instruction_field`` (TSV: column indices "0", "1", ... unless ``tsv_header``);
  ``query_prefix``/``doc_prefix``, or ``query_instruction``/``doc_instruction`` (task texts)
  with ``instruction_template`` (a preset of ``gte_jax.prompts.INSTRUCTION_TEMPLATES`` or a text
  with one "{task}"; it also formats the records' own instructions) -- whether prompt tokens are
  pooled is the model's ``model.include_prompt``, for every source and role; ``batch_size`` (0:
  the run's) and ``num_negatives`` (-1: auto). ``format: "medi"``: ``path`` is one MEDI JSON
  file (INSTRUCTOR's ``medi-data.json``), read as one source per task (``<name>/<task_name>``),
  so a batch draws from one task.
- ``text_files``: comma-separated files of single texts (TXT: one per line; JSONL: the field
  ``"text"``), each a *text* source named by its file stem (stage kinds simcse / mntp).
- A source's ``kind`` is ``"pairs"`` (default) or ``"text"`` (single texts, from ``path`` or
  ``tfds``: the field / feature ``text_field``, default ``"text"``; TXT files: one per line).
  A text source has one prefix, ``query_prefix``, given to every view of its texts (a SimCSE
  positive must be the same tokens as its query); ``doc_prefix`` is refused there.
- ``data_dir``: TFDS data directory for ``tfds`` sources and ``gte-jax data build``.
- ``alpha``, ``seed``, ``batch_size`` (global), ``mixed_batches`` (ablation: mix sources within a
  batch), ``query_max_length``, ``doc_max_length``, ``min_bucket``, ``on_bad_input``
  (skip|error), ``max_text_chars``.
- ``bucket_multiple``: 0 pads to power-of-two lengths; k > 0 to multiples of k (less padding,
  more shapes to compile).
- ``packing``: several texts per row of at most ``*_max_length`` tokens with block-diagonal
  attention (docs/design.md, "Packed batches"); ``packing_row_multiple``: packed row counts are rounded up
  to a multiple of both this and the process's data devices (fewer shapes to compile);
  ``packing_row_length``: tokens per packed row, 0 = fitted to the first batches' texts.
- ``max_direct_file_bytes``: larger local files are refused, pointing to ``gte-jax data build``.
- ``prefetch``: batches prepared ahead in a background thread (:mod:`gte_jax.data.prefetch`).
- ``replay``: a ``share`` of the steps drawn from an earlier stage's sources (``stage``, resolved
  by :func:`resolve_replay`, or ``sources`` / ``train_files`` / ``text_files`` as above), named
  ``replay/<name>``; the weights are :func:`gte_jax.data.mixture.replay_weights`.
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections

from gte_jax.data.batching import PairBatchIterator
from gte_jax.data.layout import BatchLayout
from gte_jax.data.mixture import REPLAY_PREFIX, is_replay, replay_weights
from gte_jax.data.sources import (
    SOURCE_KINDS,
    FieldMap,
    Source,
    SourceOptions,
    from_files,
    from_medi,
    from_tfds,
)
from gte_jax.errors import ConfigError

DEMO_DIR = pathlib.Path(__file__).resolve().parent.parent / "resources" / "demo"

SOURCE_DEFAULTS: dict[str, Any] = {
    "name": "",  # ours
    "kind": "pairs",  # "pairs" | "text" (single texts: stage kinds simcse, mntp); ours
    "path": "",  # ours
    "format": "",  # ours
    "tfds": "",  # ours
    "split": "train",  # ours
    "query_field": "query",  # ours
    "positive_field": "positive",  # ours
    "negatives_field": "negatives",  # ours
    "instruction_field": "instruction",  # ours
    "text_field": "text",  # text sources: the JSONL / Parquet field or TFDS feature ("a/b"); ours
    "doc_instruction_field": "doc_instruction",  # ours
    "tsv_header": False,  # ours
    "query_prefix": "",  # ours
    "doc_prefix": "",  # ours
    "query_instruction": "",  # ours
    "doc_instruction": "",  # ours
    "instruction_template": "plain",  # ours
    "batch_size": 0,  # ours
    "num_negatives": -1,  # ours
}


def default_data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.tokenizer = ""  # ours
    c.train_files = ""  # ours
    c.text_files = ""  # comma-separated TXT (one text per line) / JSONL ("text") text sources; ours
    c.sources = []  # ours
    c.data_dir = ""  # ours
    c.alpha = 0.5  # GTE §3.1: p_i ∝ n_i^0.5
    c.seed = 0  # ours
    # A data-only config's (gte-jax data) global batch; a stage's is train.batch_size. Ours.
    c.batch_size = 32
    c.mixed_batches = False  # ours
    # Ours.
    c.max_length = 0  # > 0: one token budget for queries and documents (wins over the two below)
    c.query_max_length = 64  # ours
    c.doc_max_length = 256  # ours
    c.min_bucket = 16  # ours
    c.bucket_multiple = 0  # 0: pad to powers of two; k > 0: to multiples of k (less padding); ours
    # Ours.
    c.packing = False  # several texts per row: almost no padding (with GradCache: chunked rows)
    c.packing_row_multiple = 1  # packed rows per device and role: a multiple of this; ours
    # Packed rows per device and role are fixed at start-up from this many batches' lengths (and
    # only grow if a later batch needs more): one compiled train step. 0: rows per batch. A run
    # of fewer batches primes them all (tokenising 64 batches of 64 pairs takes ~0.4 s).
    c.packing_estimate_batches = 64  # ours
    # Tokens per packed row (GradCache chunks: always the max lengths). 0: fitted to the longest
    # text of those batches (plus an eighth unless they are the whole run), in multiples of 8:
    # attention over a packed row costs in proportion to its length. k > 0: min(k, max length).
    # A later, longer text switches the run to rows of the max lengths (one more compiled program,
    # logged).
    c.packing_row_length = 0  # ours
    c.on_bad_input = "skip"  # ours
    c.max_text_chars = 100_000  # ours
    # A local file larger than this (bytes) is refused (ours): parsed whole into memory by every
    # process at every start; built once (`gte-jax data build --files`), it opens from its counts.
    # 0: no limit.
    c.max_direct_file_bytes = 1 << 30
    # Batches drawn and tokenised ahead of the device in a background thread (ours); 0: none.
    c.prefetch = 2
    c.replay = _replay_defaults()
    return c


def _replay_defaults() -> ml_collections.ConfigDict:
    """Replay (ours): a share of this stage's batches drawn from an earlier stage's sources, so
    that a fine-tuning stage keeps what the earlier one taught (docs/training.md)."""
    c = ml_collections.ConfigDict()
    # The share of the steps that draw a replayed source (one source per batch); 0: off (ours).
    c.share = 0.0
    # A stage of this multi-stage config whose sources are replayed (its data.sources,
    # train_files, text_files, data_dir and alpha); or leave it empty and list sources below. Ours.
    c.stage = ""
    c.sources = []  # replayed sources, as data.sources (named replay/<name> in the run); ours
    c.train_files = ""  # replayed pair files, as data.train_files; ours
    c.text_files = ""  # replayed text files, as data.text_files; ours
    c.data_dir = ""  # TFDS data directory of the replayed sources; "": data.data_dir; ours
    c.alpha = -1.0  # p_j ∝ n_j^alpha among the replayed sources; -1: data.alpha (ours)
    return c


def _source_specs(data: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The stage's own sources, then the replayed ones (:func:`_replay_specs`)."""
    specs = _group_specs(data, "data")
    if not specs:
        raise ConfigError("no data sources: set data.train_files or data.sources in the config")
    return specs + _replay_specs(data)


def _group_specs(group: Any, key: str) -> list[dict[str, Any]]:
    """Source specs of ``group``'s train_files, text_files and sources (``key``: the group's
    config path, for the messages)."""
    specs = []
    for path in (p.strip() for p in str(group.train_files).split(",")):
        if path:
            spec = {**SOURCE_DEFAULTS, "name": pathlib.Path(path).stem, "path": path}
            specs.append({**spec, "config_key": f"{key}.train_files"})
    for path in (p.strip() for p in str(group.get("text_files", "")).split(",")):
        if path:
            spec = {**SOURCE_DEFAULTS, "name": pathlib.Path(path).stem, "path": path}
            specs.append({**spec, "kind": "text", "config_key": f"{key}.text_files"})
    for i, raw in enumerate(group.sources):
        specs.append(checked_source(dict(raw), f"{key}.sources[{i}]"))
    return specs


def checked_source(raw: dict[str, Any], where: str) -> dict[str, Any]:
    if "pool_query_prefix" in raw:
        raise ConfigError(
            f"{where}.pool_query_prefix is gone: whether prompt tokens are pooled is "
            "one setting of the model, model.include_prompt (true/false), used the same way "
            "by training, encode, eval and the export"
        )
    unknown = set(raw) - set(SOURCE_DEFAULTS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(SOURCE_DEFAULTS)}"
        )
    spec = {**SOURCE_DEFAULTS, **raw}
    if not spec["name"]:
        spec["name"] = pathlib.Path(spec["path"].split(",")[0]).stem or spec["tfds"]
    if bool(spec["path"]) == bool(spec["tfds"]):
        raise ConfigError(f"{where} ({spec['name']!r}): set exactly one of path, tfds")
    if spec["kind"] not in SOURCE_KINDS:
        raise ConfigError(
            f"{where} ({spec['name']!r}): kind={spec['kind']!r}; use one of {SOURCE_KINDS}"
        )
    if spec["kind"] == "text" and spec["doc_prefix"]:
        raise ConfigError(
            f"{where} ({spec['name']!r}): a text source has one prefix, "
            "query_prefix, for every view of its texts; doc_prefix must stay empty"
        )
    return {**spec, "config_key": f"{where}.path"}


def _replay_specs(data: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The replayed sources (``data.replay``), named ``replay/<name>``; none when the share is 0."""
    replay = data.get("replay")
    if replay is None or not float(replay.share):
        return []
    specs = _group_specs(replay, "data.replay")
    if not specs:
        hint = (
            f"data.replay.stage={replay.stage!r} is resolved only when the stage runs in a "
            "multi-stage config (config.stages)"
            if replay.stage
            else "set data.replay.stage (a stage of this multi-stage config) or list them in "
            "data.replay.sources / train_files / text_files"
        )
        raise ConfigError(f"data.replay.share={replay.share} but no sources to replay: {hint}")
    # A replayed TFDS source is read from its stage's data directory.
    data_dir = str(replay.data_dir)
    return [{**spec, "name": REPLAY_PREFIX + spec["name"], "data_dir": data_dir} for spec in specs]


def source_kinds(data: ml_collections.ConfigDict) -> dict[str, str]:
    """Source name -> kind ("pairs" | "text") from the config alone (nothing is read), so that
    a stage kind whose data do not fit is refused at start-up."""
    return {spec["name"]: spec["kind"] for spec in _source_specs(data)}


def _source_options(spec: dict[str, Any]) -> SourceOptions:
    text = spec["kind"] == "text"
    try:
        return SourceOptions(
            query_prefix=spec["query_prefix"],
            # A text source's views are the same string: one prefix for both roles.
            doc_prefix=spec["query_prefix"] if text else spec["doc_prefix"],
            batch_size=int(spec["batch_size"]) or None,
            num_negatives=None if int(spec["num_negatives"]) < 0 else int(spec["num_negatives"]),
            query_instruction=spec["query_instruction"],
            doc_instruction=spec["doc_instruction"],
            instruction_template=spec["instruction_template"],
        )
    except ValueError as e:
        raise ConfigError(f"data source {spec['name']!r}: {e}") from e


def _check_file_sizes(spec: dict[str, Any], limit: int) -> None:
    """Refuses a local file larger than ``data.max_direct_file_bytes`` (read whole into memory by
    every process, at every start), pointing to the build that opens in O(1)."""
    for path in (p for p in str(spec["path"]).split(",") if p):
        size = pathlib.Path(path).stat().st_size if pathlib.Path(path).is_file() else 0
        if limit and size > limit:
            raise ConfigError(
                f"{path}: {size / 2**30:.2f} GiB > data.max_direct_file_bytes={limit}: every "
                "process would parse it whole into memory at every start. Build it once with "
                f"`gte-jax data build --files {path} --name NAME --data_dir DIR` and read it as "
                "tfds='local_pairs/NAME' (opens from its counts), or raise "
                "data.max_direct_file_bytes"
            )


def build_sources(data: ml_collections.ConfigDict) -> list[Source]:
    out = []
    for spec in _source_specs(data):
        if spec["path"]:
            _check_file_sizes(spec, int(data.get("max_direct_file_bytes", 1 << 30)))
        options = _source_options(spec)
        text_field = spec["text_field"] if spec["kind"] == "text" else None
        fields = FieldMap(
            spec["query_field"],
            spec["positive_field"],
            spec["negatives_field"] or None,
            spec["instruction_field"] or None,
            spec["doc_instruction_field"] or None,
        )
        common = dict(
            options=options,
            on_bad_input=data.on_bad_input,
            max_text_chars=int(data.max_text_chars),
        )
        if spec["format"] == "medi":
            try:
                out.extend(from_medi(spec["name"], spec["path"], **common))
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{e}; check {spec['config_key']} in the config") from e
        elif spec["path"]:
            try:
                source = from_files(
                    spec["name"],
                    spec["path"],
                    fmt=spec["format"] or None,
                    fields=fields,
                    tsv_header=bool(spec["tsv_header"]),
                    text_field=text_field,
                    **common,
                )
            except FileNotFoundError as e:  # name the setting the user wrote the path in
                raise FileNotFoundError(f"{e}; check {spec['config_key']} in the config") from e
            out.append(source)
        else:
            out.append(
                from_tfds(
                    spec["name"],
                    spec["tfds"],
                    data_dir=spec.get("data_dir") or data.data_dir or None,
                    split=spec["split"],
                    fields=fields,
                    text_field=text_field,
                    **common,
                )
            )
    return out


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not path:
        raise ConfigError("data.tokenizer is empty: set it to a local tokenizer directory")
    return AutoTokenizer.from_pretrained(path)


def build_iterator(
    data: ml_collections.ConfigDict,
    *,
    tokenizer=None,
    sources: list[Source] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    local_data_devices: int = 1,
    layout: BatchLayout | None = None,
    batch_size: int | None = None,
    **kwargs: Any,
) -> PairBatchIterator:
    """The training iterator for this process (``kwargs`` go to :class:`PairBatchIterator`).

    ``layout``: this process's rows of every batch (``BatchLayout.of_mesh``); without it, process
    p holds the p-th of ``process_count`` blocks of ``local_data_devices`` devices each (with
    packing, each device packs its own examples into its own rows). ``batch_size``: the global
    batch (a training stage's ``train.batch_size``; default: ``data.batch_size``)."""
    sources = sources if sources is not None else build_sources(data)
    if "weights" not in kwargs and any(is_replay(s.name) for s in sources):
        kwargs["weights"] = replay_weights(
            {s.name: len(s) for s in sources}, **_replay_mixture(data)
        )
    if batch_size is None:  # a data-only config (gte-jax data): a stage passes train.batch_size
        batch_size = data["batch_size"]
    return PairBatchIterator(
        sources,
        tokenizer if tokenizer is not None else load_tokenizer(data.tokenizer),
        global_batch_size=int(batch_size),
        seed=int(data.seed),
        alpha=float(data.alpha),
        mixed=bool(data.mixed_batches),
        query_max_length=int(data.query_max_length),
        doc_max_length=int(data.doc_max_length),
        min_bucket=int(data.min_bucket),
        bucket_multiple=int(data.bucket_multiple),
        packing=bool(data.packing),
        pack_row_multiple=int(data.packing_row_multiple),
        pack_row_length=int(data.packing_row_length),
        pack_groups=int(local_data_devices),
        process_index=process_index,
        process_count=process_count,
        layout=layout,
        **kwargs,
    )


def _replay_mixture(data: ml_collections.ConfigDict) -> dict[str, float]:
    replay = data.replay
    replay_alpha = float(replay.alpha) if float(replay.alpha) >= 0 else float(data.alpha)
    return {"alpha": float(data.alpha), "replay_alpha": replay_alpha, "share": float(replay.share)}


def epoch_records(data: ml_collections.ConfigDict, sources: list[Source]) -> int:
    """The records one epoch (``train.epochs``) counts: the stage's own, scaled up by the replayed
    share so that the own records are still read ``epochs`` times (in expectation); a large
    replayed stage does not lengthen the run."""
    own = sum(len(s) for s in sources if not is_replay(s.name))
    replay = data.get("replay")
    share = float(replay.share) if replay is not None else 0.0
    return int(round(own / (1 - share)))


def replay_problems(config: ml_collections.ConfigDict) -> list[str]:
    """One line per stage of a multi-stage config whose ``data.replay`` cannot work (checked
    before the first stage starts)."""
    problems = []
    for name in config.stages:
        replay = config[name].data.get("replay")
        if replay is None or not replay.stage:
            continue
        where = f"{name}.data.replay.stage={replay.stage!r}"
        if replay.stage not in config.stages:
            problems.append(f"{where}: not a stage of this config (stages: {list(config.stages)})")
        elif replay.stage == name:
            problems.append(f"{where}: a stage cannot replay its own sources")
        elif replay.sources or replay.train_files or replay.text_files:
            problems.append(
                f"{where}: set either the stage or data.replay.sources / train_files / "
                "text_files, not both"
            )
    return problems


def resolve_replay(data: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    """Fills ``data.replay`` from the stage it names (``data.replay.stage``) of the multi-stage
    ``config``: that stage's own sources, data directory and alpha (unless set here)."""
    replay = data.get("replay")
    if replay is None or not replay.stage:
        return
    if str(replay.stage) not in config.stages:
        raise ConfigError(
            f"data.replay.stage={replay.stage!r}: not a stage of this config (stages: "
            f"{list(config.stages)})"
        )
    other = config[str(replay.stage)].data
    replay.sources = [dict(s) for s in other.sources]
    replay.train_files = str(other.train_files)
    replay.text_files = str(other.get("text_files", ""))
    replay.data_dir = str(replay.data_dir or other.data_dir)
    if float(replay.alpha) < 0:
        replay.alpha = float(other.alpha)
