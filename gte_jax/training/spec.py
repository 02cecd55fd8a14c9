"""Typed stage specs: a stage's config, parsed and checked once at the command line.

A config file stays Python (``get_config``, ``:runlocal``, ``--config.a.b=v`` overrides: the
``ConfigDict`` the user sees); :meth:`StageSpec.from_config` turns one stage of it into frozen
dataclasses, one per schema group, and refuses what cannot work (the schema's types, the range
table, every start-up check that needs only the config, the objective's ``problems``) with
:class:`SpecError` naming the key: exit 2. The training package and ``plan`` read typed
attributes from then on.

One home per default: the values and their paper / release / ours labels are written once, in
:mod:`gte_jax.defaults` (data: :mod:`gte_jax.data.pipeline`). The dataclasses here declare only
each field's type; ``tests/test_spec.py`` asserts that their fields and the schema's keys are the
same set with the same types. Derived values are resolved here, once: ``data.max_length`` > 0
sets both ``data.query_max_length`` and ``data.doc_max_length`` (checked against the model's
positions in :func:`gte_jax.training.setup`, where the model config is known), and a stage's batch
size has one home, ``train.batch_size`` (the data-only ``data.batch_size`` is not a stage key).
``eval.max_length`` = 0 ("the model's own") is resolved by the evaluator, which holds the model.

The groups also answer ``keys()`` / ``[key]`` / ``get`` like the ``ConfigDict`` they replace, so
the data pipeline and the model loaders (which still take a config group) read them unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections

from gte_jax import interpolate, objectives
from gte_jax import sharding as shd
from gte_jax.config import check_schema
from gte_jax.data.pipeline import (
    SOURCE_DEFAULTS,
    checked_source,
    replay_problems,
    resolve_replay,
    source_kinds,
)
from gte_jax.defaults import stage_config
from gte_jax.errors import ConfigError, TrainingError
from gte_jax.gradcache import GATHER_MODES
from gte_jax.models import lora
from gte_jax.models.pooling import POOLING_MODES
from gte_jax.models.precision import compute_dtype
from gte_jax.objectives.matryoshka import sorted_dims
from gte_jax.ranges import range_problems


class SpecError(ConfigError, TrainingError):
    """A stage's settings cannot work (exit 2); the message names each key. Both a
    :class:`ConfigError` (a setting) and a :class:`TrainingError` (the run cannot start)."""


class _Group:
    """A frozen group of settings; reads like the ``ConfigDict`` group it was parsed from."""

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(getattr(self, k)) for k in self.keys()}


def _plain(value: Any) -> Any:
    if isinstance(value, _Group):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


_frozen = dataclasses.dataclass(frozen=True)


@_frozen
class LoraSpec(_Group):
    enabled: bool
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    base_dtype: str


@_frozen
class ModelSpec(_Group):
    init_from: str
    dtype: str
    remat: bool
    scan_layers: bool
    dropout: float
    attention_dropout: float
    attention: str
    attention_kernel: str
    train_dropout: bool
    pooling: str
    normalize: bool
    include_prompt: str
    padding_side: str
    append_eos: bool
    lora: LoraSpec


@_frozen
class MntpSpec(_Group):
    mask_probability: float
    mask_all: bool
    mask_token: str
    mask_token_id: int


@_frozen
class SourceSpec(_Group):
    """One ``data.sources[]`` entry, its unset fields at ``SOURCE_DEFAULTS``."""

    name: str
    kind: str
    path: str
    format: str
    tfds: str
    split: str
    query_field: str
    positive_field: str
    negatives_field: str
    instruction_field: str
    text_field: str
    doc_instruction_field: str
    tsv_header: bool
    query_prefix: str
    doc_prefix: str
    query_instruction: str
    doc_instruction: str
    instruction_template: str
    batch_size: int
    num_negatives: int


@_frozen
class ReplaySpec(_Group):
    share: float
    stage: str
    sources: tuple[SourceSpec, ...]
    train_files: str
    text_files: str
    data_dir: str
    alpha: float


@_frozen
class DataSpec(_Group):
    tokenizer: str
    train_files: str
    text_files: str
    sources: tuple[SourceSpec, ...]
    data_dir: str
    alpha: float
    seed: int
    mixed_batches: bool
    max_length: int
    query_max_length: int
    doc_max_length: int
    min_bucket: int
    bucket_multiple: int
    packing: bool
    packing_row_multiple: int
    packing_estimate_batches: int
    packing_row_length: int
    on_bad_input: str
    max_text_chars: int
    max_direct_file_bytes: int
    prefetch: int
    replay: ReplaySpec


@_frozen
class LossSpec(_Group):
    name: str
    temperature: float
    symmetric: bool
    matryoshka_dims: tuple[int, ...]
    matryoshka_weights: tuple[float, ...]
    distill_weight: float
    teacher_temperature: float
    learn_temperature: bool
    temperature_min: float
    temperature_max: float
    temperature_learning_rate: float


@_frozen
class TrainSpec(_Group):
    batch_size: int
    num_steps: int
    epochs: float
    learning_rate: float
    warmup_ratio: float
    warmup_steps: int
    schedule: str
    weight_decay: float
    adam_b1: float
    adam_b2: float
    adam_eps: float
    max_grad_norm: float
    seed: int
    gradcache: bool
    gradcache_chunk_size: int
    log_every: int
    progress_bar: bool
    max_consecutive_nonfinite: int

    @property
    def num_chunks(self) -> int:
        """GradCache chunks per step (1 without GradCache)."""
        chunk = self.gradcache_chunk_size
        if self.gradcache and chunk > 0 and self.batch_size > chunk:
            return self.batch_size // chunk
        return 1


@_frozen
class CheckpointSpec(_Group):
    every_steps: int
    max_to_keep: int
    async_save: bool


@_frozen
class MeshSpec(_Group):
    data: int
    model: int
    slices: int
    simulate_topology: str


@_frozen
class ShardingSpec(_Group):
    params: str
    rules: tuple[tuple[str, tuple[str | None, ...]], ...]
    gather_params: str


@_frozen
class EvalSpec(_Group):
    sets: tuple[Mapping[str, Any], ...]  # checked by gte_jax.evaluation (its own fields)
    every_steps: int
    at_start: bool
    batch_size: int
    max_length: int
    best_metric: str
    best_mode: str


@_frozen
class ExportSpec(_Group):
    enabled: bool
    interpolate_from: str
    interpolate_weight: float


@_frozen
class StageSpec(_Group):
    """One training stage, parsed and checked: what the loop, ``plan`` and the checks read."""

    stage: str
    kind: str
    model: ModelSpec
    mntp: MntpSpec
    data: DataSpec
    loss: LossSpec
    train: TrainSpec
    checkpoint: CheckpointSpec
    mesh: MeshSpec
    sharding: ShardingSpec
    eval: EvalSpec
    export: ExportSpec

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> StageSpec:
        """Parses one stage's ``ConfigDict`` (unset keys at their schema defaults) and refuses,
        with :class:`SpecError`, every setting that cannot work whatever the devices."""
        if "stages" in config:
            raise SpecError("a multi-stage config: parse it with stage_specs(config)")
        config = config.copy_and_resolve_references()
        check_schema(config)
        spec = _resolved(_parse(cls, config, stage_config(), ""))
        # Ranges first, alone: a value out of range (mesh.data=0, say) can break the checks below.
        problems = range_problems(spec) or config_problems(spec)
        if problems:
            raise SpecError(cannot_run(_one_per_key(problems)))
        return spec

    def replace(self, **changes: Any) -> StageSpec:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        """The spec as the workdir's ``config.json`` records it."""
        return json.dumps(self.to_dict(), indent=2, default=str)


def stage_specs(config: ml_collections.ConfigDict) -> StageSpec | list[StageSpec]:
    """The spec of a one-stage config; or of each stage of ``config.stages`` in order, named and
    with ``data.replay.stage`` filled in. Every stage is checked before the first starts: a
    later stage's typo must not cost the hours of the earlier ones."""
    if "stages" not in config:
        return StageSpec.from_config(config)
    problems = [p for name in config.stages for p in range_problems(config[name], f"{name}.")]
    problems += replay_problems(config) + interpolate.stage_problems(config)
    if problems:
        raise SpecError(cannot_run(problems))
    specs = []
    for name in config.stages:
        stage_cfg = config[name].copy_and_resolve_references()
        stage_cfg.stage = name
        resolve_replay(stage_cfg.data, config)
        try:
            specs.append(StageSpec.from_config(stage_cfg))
        except SpecError as e:
            raise SpecError(f"stage {name}: {e}") from None
    return specs


def parse(config: StageSpec | ml_collections.ConfigDict) -> StageSpec:
    """``config`` as a spec: a spec as it is, a one-stage ``ConfigDict`` parsed (scripts and
    tests that build a config by hand)."""
    return config if isinstance(config, StageSpec) else StageSpec.from_config(config)


def train_spec(group: TrainSpec | ml_collections.ConfigDict) -> TrainSpec:
    """A ``train`` group as a :class:`TrainSpec`, its unset fields at their defaults."""
    if isinstance(group, TrainSpec):
        return group
    return _parse(TrainSpec, group, stage_config().train, "train.")


# --------------------------------------------------------------------------- parsing


def _resolved(spec: StageSpec) -> StageSpec:
    """Derived values, once: data.max_length > 0 is the budget of queries and documents."""
    data = spec.data
    if data.max_length:
        data = dataclasses.replace(
            data, query_max_length=data.max_length, doc_max_length=data.max_length
        )
    return dataclasses.replace(spec, data=data)


def _parse(cls: type, node: Any, schema: Any, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        key, kind = field.name, hints[field.name]
        value = node[key] if key in node else schema[key]
        if isinstance(kind, type) and issubclass(kind, _Group):
            values[key] = _parse(kind, value, schema[key], f"{prefix}{key}.")
        else:
            values[key] = _value(kind, value, f"{prefix}{key}")
    return cls(**values)


def _value(kind: Any, value: Any, key: str) -> Any:
    if kind is bool:
        return bool(value)
    if kind in (int, float, str):
        return kind(value)
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if item is SourceSpec:
            return tuple(_source(s, f"{key}[{i}]") for i, s in enumerate(value))
        return tuple(_frozen_item(v) for v in value)
    raise TypeError(f"{key}: no parser for {kind}")


def _frozen_item(value: Any) -> Any:
    """Lists inside a setting (sharding rules) as tuples; eval sets as plain dicts."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen_item(v) for v in value)
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
        return dict(value)
    return value


def _source(raw: Any, where: str) -> SourceSpec:
    """A source entry: unknown fields refused by the pipeline's own check (its messages)."""
    raw = dict(raw)
    if set(raw) - set(SOURCE_DEFAULTS):
        checked_source(raw, where)  # raises, naming the field
    full = {**SOURCE_DEFAULTS, **raw}
    return SourceSpec(**{k: _value(type(SOURCE_DEFAULTS[k]), full[k], where) for k in full})


# --------------------------------------------------------------------------- the checks


def cannot_run(problems: list[str]) -> str:
    """One line for one problem (what a user reads first), a list for several."""
    if len(problems) == 1:
        return f"this config cannot run: {problems[0]}"
    return "this config cannot run:\n  - " + "\n  - ".join(problems)


def _one_per_key(problems: list[str]) -> list[str]:
    """The first line about each ``key=value`` setting (the range table's comes first; a
    group's own check, e.g. model.lora's, may say the same again)."""
    seen, out = set(), []
    for line in problems:
        key = line.split("=", 1)[0] if "=" in line.split(" ", 1)[0] else None
        if key is None or key not in seen:
            out.append(line)
        seen.add(key)
    return out


def config_problems(spec: StageSpec) -> list[str]:
    """Every start-up refusal that needs only the settings (the devices' are
    :func:`gte_jax.training.checks.check_config`'s)."""
    problems = stage_kind_problems(spec)
    if spec.kind != "mntp" and spec.loss.name not in objectives.contrastive_names():
        problems.append(
            f"loss.name={spec.loss.name!r}: use one of {objectives.contrastive_names()}"
        )
    else:
        problems.extend(objectives.from_config(spec).problems(spec))
    problems.extend(matryoshka_problems(spec.loss))
    problems.extend(interpolate.config_problems(spec.export))
    problems.extend(model_problems(spec.model))
    if spec.train.schedule not in ("linear", "cosine", "constant"):
        problems.append(f"train.schedule={spec.train.schedule!r}: use linear, cosine or constant")
    problems.extend(sharding_problems(spec))
    problems.extend(batch_problems(spec))
    return problems


def model_problems(model: ModelSpec) -> list[str]:
    """``model.*`` choices that name nothing (the kernel's are checked with the devices)."""
    problems = []
    if model.include_prompt.lower() not in ("auto", "true", "false"):
        problems.append(f"model.include_prompt={model.include_prompt!r}: use auto, true or false")
    if model.pooling not in ("auto", *POOLING_MODES):
        problems.append(
            f"model.pooling={model.pooling!r}: use auto or one of {list(POOLING_MODES)}"
        )
    try:
        compute_dtype(model.dtype)
    except ValueError as e:  # names the setting and the choices
        problems.append(str(e))
    if model.padding_side not in ("auto", "left", "right"):
        problems.append(f"model.padding_side={model.padding_side!r}: use auto, left or right")
    if model.lora.enabled:
        problems.extend(lora.config_problems(model.lora))
    return problems


def sharding_problems(spec: StageSpec) -> list[str]:
    problems = []
    params = spec.sharding.params
    if params not in shd.SHARDING_MODES:
        problems.append(f"sharding.params={params!r}: use one of " + ", ".join(shd.SHARDING_MODES))
    elif spec.mesh.model != 1 and params != "fsdp_tp":
        problems.append(
            f"mesh.model={spec.mesh.model}: only sharding.params=fsdp_tp uses the model axis "
            "(tensor parallelism); otherwise it would only waste devices: set mesh.model=1"
        )
    if spec.sharding.gather_params not in GATHER_MODES:
        problems.append(
            f"sharding.gather_params={spec.sharding.gather_params!r}: use one of "
            + ", ".join(GATHER_MODES)
        )
    return problems


def batch_problems(spec: StageSpec) -> list[str]:
    """GradCache chunks that do not divide the batch; packed rows that cannot be chunked."""
    tcfg = spec.train
    batch_size, chunk = tcfg.batch_size, tcfg.gradcache_chunk_size
    if tcfg.gradcache and chunk > 0 and batch_size % chunk:
        return [f"train.gradcache_chunk_size={chunk} must divide train.batch_size={batch_size}"]
    return packing_problems(spec.data, tcfg.num_chunks)


def packing_problems(data: DataSpec, num_chunks: int) -> list[str]:
    """Packed-row settings that cannot work (docs/design.md, "Packed batches")."""
    problems = []
    row_length = data.packing_row_length
    if row_length > 0 and data.packing and num_chunks > 1:
        problems.append(
            f"data.packing_row_length={row_length} with {num_chunks} GradCache chunks: chunks "
            "budget their tokens in rows of the max lengths; leave data.packing_row_length=0"
        )
    return problems


def matryoshka_problems(loss: LossSpec) -> list[str]:
    """loss.matryoshka_dims / _weights that cannot work (sizes are checked against the model's
    dim when the loss first runs: the model is not loaded yet here)."""
    dims, weights = tuple(loss.matryoshka_dims), tuple(loss.matryoshka_weights)
    if not dims and not weights:
        return []
    try:
        sorted_dims(dims, weights)
    except (ValueError, TypeError) as e:
        return [f"loss.matryoshka_dims={list(dims)}: {e}"]
    if any(float(w) < 0 for w in weights):
        return [f"loss.matryoshka_weights={list(weights)}: weights must be >= 0"]
    return []


# Stage kind -> the kind of source it trains on (gte_jax/defaults.py documents each kind).
STAGE_KINDS = {"contrastive": "pairs", "simcse": "text", "mntp": "text"}


def stage_kind_problems(config: StageSpec | ml_collections.ConfigDict) -> list[str]:
    """Why the stage's data or model settings do not fit its ``kind`` (empty: they do).

    contrastive needs pair sources (a text source's positive is its own query). simcse needs
    text sources (a pair source can be read as one: ``kind="text"`` with ``text_field``), the
    same token budget for both views (data.max_length, or equal query/doc max lengths: the
    views must be the same tokens) and dropout (without it both views are one embedding).
    ``config``: a spec, or a one-stage ``ConfigDict`` (the same reads)."""
    kind = config.kind
    if kind not in STAGE_KINDS:
        return [f"kind={kind!r}: use one of {sorted(STAGE_KINDS)}"]
    problems = _source_kind_problems(config.data, STAGE_KINDS[kind], kind)
    if kind == "mntp":
        tcfg = config.train
        chunk = tcfg.gradcache_chunk_size
        chunked = tcfg.gradcache and chunk > 0 and tcfg.batch_size > chunk
        if config.data.packing and chunked:
            problems.append(
                "kind=mntp with data.packing and train.gradcache: MNTP labels are laid out on "
                "one-chunk packed rows; use padded rows (data.packing=false) with GradCache"
            )
    if kind == "simcse":
        data, model = config.data, config.model
        if not data.max_length and data.query_max_length != data.doc_max_length:
            problems.append(
                f"kind=simcse: data.query_max_length={data.query_max_length} != "
                f"data.doc_max_length={data.doc_max_length}: both views must be the same tokens; "
                "set data.max_length"
            )
        if not model.train_dropout or model.dropout == 0.0:
            problems.append(
                "kind=simcse: the two views differ only by dropout; model.train_dropout=false or "
                "model.dropout=0 makes them one embedding (set model.dropout, e.g. 0.1; "
                "LLM2Vec uses 0.3)"
            )
    return problems


def _source_kind_problems(data: DataSpec, need: str, kind: str) -> list[str]:
    try:
        sources = source_kinds(data)
    except ConfigError:  # no or malformed sources: build_sources says so, as before
        sources = {}
    wrong = sorted(name for name, k in sources.items() if k != need)
    if wrong and need == "pairs":
        return [
            f"kind=contrastive trains on pairs, but {wrong} are text sources (single texts): "
            "use kind=simcse for them, or read pair files as pairs"
        ]
    if wrong:
        return [
            f"kind={kind} trains on single texts, but {wrong} are pair sources: list them in "
            "data.text_files, or set kind='text' and text_field (e.g. 'positive') in data.sources"
        ]
    return []
