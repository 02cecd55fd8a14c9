"""Typed stage specs (gte_jax/training/spec.py): the same keys and types as the schema (whose
defaults are the only ones), parsed once with the refusals naming the key, derived values
resolved once."""

from __future__ import annotations

import dataclasses
import typing

import ml_collections
import pytest

from gte_jax.config import check_schema
from gte_jax.data.pipeline import DEMO_DIR, SOURCE_DEFAULTS
from gte_jax.defaults import stage_config
from gte_jax.errors import ConfigError, TrainingError
from gte_jax.training import spec as spec_lib
from gte_jax.training.spec import SourceSpec, StageSpec, stage_specs

_SCALARS = (bool, int, float, str)


def _kind(value) -> type:
    """The Python type a schema default declares (lists and tuples: a tuple)."""
    return tuple if isinstance(value, (list, tuple)) else type(value)


def _fields(cls: type, prefix: str = "") -> dict[str, type]:
    """Every leaf field of a spec class as dotted key -> its declared type (tuple for
    ``tuple[...]``)."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if isinstance(kind, type) and issubclass(kind, spec_lib._Group):
            out.update(_fields(kind, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = typing.get_origin(kind) or kind
    return out


def _schema(node, prefix: str = "") -> dict[str, type]:
    out = {}
    for key in node.keys():
        value = node[key]
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_schema(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = _kind(value)
    return out


def test_spec_fields_are_the_schema_keys_with_their_types():
    fields, schema = _fields(StageSpec), _schema(stage_config())
    assert set(fields) == set(schema), set(fields) ^ set(schema)
    assert {k: fields[k] for k in schema} == schema
    sources = {k: v for k, v in _fields(SourceSpec).items()}
    assert sources == {k: _kind(v) for k, v in SOURCE_DEFAULTS.items()}


def test_the_field_check_can_fail():
    @dataclasses.dataclass(frozen=True)
    class Wrong(spec_lib._Group):
        batch_size: float  # the schema's is an int
        extra: str

    assert _fields(Wrong) == {"batch_size": float, "extra": str}
    assert _fields(Wrong) != {k: v for k, v in _schema(stage_config().train).items()}


def test_defaults_come_from_the_schema_alone():
    """An empty stage parses to the schema's defaults, each with the declared type; the spec
    classes hold no default of their own."""
    spec = StageSpec.from_config(stage_config())
    for key, default in _leaves(stage_config()):
        value = _get(spec, key)
        expected = tuple(default) if isinstance(default, (list, tuple)) else default
        assert value == expected and type(value) is _kind(default), key
    for cls in (StageSpec, spec_lib.TrainSpec, spec_lib.DataSpec, SourceSpec):
        assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(cls))
    # Keys a config file leaves out take the schema's default too.
    partial = ml_collections.ConfigDict({"train": {"batch_size": 8}})
    parsed = StageSpec.from_config(partial)
    assert parsed.train.batch_size == 8
    assert parsed.train.learning_rate == stage_config().train.learning_rate
    assert parsed.loss.temperature == stage_config().loss.temperature


def _leaves(node, prefix=""):
    for key in node.keys():
        if isinstance(node[key], ml_collections.ConfigDict):
            yield from _leaves(node[key], f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", node[key]


def _get(spec, key):
    for part in key.split("."):
        spec = getattr(spec, part)
    return spec


def test_values_are_typed_and_frozen():
    config = stage_config()
    config.train.learning_rate = 1  # an int where a float belongs: the schema admits it
    config.data.sources = [{"name": "bible", "path": str(DEMO_DIR / "bible_finetune.jsonl")}]
    spec = StageSpec.from_config(config)
    assert type(spec.train.learning_rate) is float
    (source,) = spec.data.sources
    assert isinstance(source, SourceSpec) and source.num_negatives == -1  # SOURCE_DEFAULTS'
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.train.batch_size = 4
    # Read like the ConfigDict group it replaces, for the pipeline.
    assert dict(source)["path"] == source.path and spec.mesh.get("slices") == spec.mesh.slices


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("train.learning_rate", -1.0, "train.learning_rate=-1.0: must be >= 0"),
        ("train.schedule", "step", "train.schedule='step'"),
        ("loss.name", "triplet", "loss.name='triplet'"),
        ("train.gradcache_chunk_size", 5, "train.gradcache_chunk_size=5 must divide"),
        ("model.pooling", "max_of_all", "model.pooling='max_of_all'"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_the_key(key, value, words):
    config = stage_config()
    if key == "train.gradcache_chunk_size":
        config.train.gradcache = True
    group, field = key.split(".")
    config[group][field] = value
    with pytest.raises(spec_lib.SpecError, match="this config cannot run") as e:
        StageSpec.from_config(config)
    assert words in str(e.value)
    assert isinstance(e.value, ConfigError) and isinstance(e.value, TrainingError)  # exit 2


def test_a_stage_has_one_batch_size():
    config = stage_config()
    assert "batch_size" not in config.data
    config.data.batch_size = 8
    with pytest.raises(ConfigError, match=r"data\.batch_size.*train\.batch_size"):
        check_schema(config)
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        StageSpec.from_config(config)


def test_data_max_length_is_resolved_once():
    config = stage_config()
    config.data.max_length = 48
    spec = StageSpec.from_config(config)
    assert (spec.data.query_max_length, spec.data.doc_max_length) == (48, 48)
    config.data.max_length = 0
    spec = StageSpec.from_config(config)
    defaults = stage_config().data
    assert spec.data.query_max_length == defaults.query_max_length
    assert spec.data.doc_max_length == defaults.doc_max_length


def test_every_stage_is_checked_before_the_first_runs():
    config = ml_collections.ConfigDict()
    config.stages = ["pre", "ft"]
    config.pre, config.ft = stage_config(), stage_config()
    specs = stage_specs(config)
    assert [s.stage for s in specs] == ["pre", "ft"]
    config.ft.train.schedule = "step"
    with pytest.raises(spec_lib.SpecError, match="stage ft: .*train.schedule='step'"):
        stage_specs(config)


def test_the_spec_records_as_json():
    import json

    spec = StageSpec.from_config(stage_config())
    assert json.loads(spec.to_json())["train"]["batch_size"] == spec.train.batch_size
