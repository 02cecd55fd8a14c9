"""Tower families: an HF ``config.json`` ``model_type`` -> our config, tower and weight-name map.

A *family* is everything gte-jax needs to know about one kind of transformer tower:

- ``config_from_hf(hf: dict, **overrides) -> config``: our frozen config dataclass from an HF
  ``config.json`` dict. Overrides are the family's own field names plus these generic ones, which
  every family accepts: ``dtype`` (compute dtype), ``remat`` (bool), ``dropout`` and
  ``attention_dropout`` (floats: the config group ``model``'s switches, mapped onto the family's
  fields — BERT's ``hidden_dropout_prob``, T5's ``dropout_rate``, ...), ``attention``
  ("causal" | "bidirectional": decoders take either, encoders refuse "causal"),
  ``attention_kernel`` and ``attention_platform`` (``gte_jax.models.attention``: which kernel
  computes attention, and the platform "auto" decides for).
- ``tower(config, *, rngs) -> nnx.Module`` with ``__call__(input_ids, attention_mask,
  token_type_ids=None, position_ids=None, *, segment_ids=None, dropout_rng=None) -> [B, L, D]``
  (docs/design.md, "Model"; packed rows when ``segment_ids`` is given).
- ``param_names(config) -> {torch name: (path in BiEncoder's param state, transpose?)}``: the
  one map between an HF checkpoint and our parameters, used to load and to export.
- ``canonical_name(name) -> name``: a checkpoint name as ``param_names`` spells it (task-head
  prefixes such as ``bert.`` stripped, legacy spellings fixed).
- ``ignored``: tensors that are neither parameters nor kept (buffers, task heads); ``keep``:
  tensors carried untrained and written back on export (BERT's pooler).
- ``architecture(config) -> str``: the ``architectures`` entry written to the exported config.
- ``fit_to_tensors(config, names) -> config``: the config adjusted to the checkpoint's canonical
  tensor names where config.json cannot tell (a decoder's ``lm_head`` present or not).
- ``export_name(config, name) -> name``: the name a canonical tensor name is written under on
  export (decoders exported as ``*ForCausalLM`` put back the ``model.`` prefix).
- ``logical_axes``: {the last two components of a parameter path ("query/kernel"): its logical
  axes ("embed", "heads")}, for every parameter the tower can have: what ``gte_jax/sharding.py``
  maps to mesh axes (one rule table for every family). ``tests/test_sharding.py`` builds each
  family's variants and refuses a parameter without an entry.
- ``lora_targets``: {role (``lora_layer.LORA_ROLES``): the attribute name of that projection},
  what LoRA may wrap (``gte_jax/models/lora.py``); every projection inside a block must be one.

The config dataclass of every family has ``model_type``, ``hidden_size``, ``num_hidden_layers``,
``num_attention_heads``, ``dtype``, ``param_dtype``, ``remat``, ``max_length`` and ``to_hf()``.
A new family is one module under ``gte_jax/models/`` plus one ``Family`` entry below: sharding
and LoRA read the family, nothing else names its parameters.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import gte_jax.models.bert as bert
import gte_jax.models.decoder as decoder
import gte_jax.models.t5 as t5

_NOTHING = re.compile(r"(?!)")  # matches no name


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[..., Any]
    tower: Callable[..., Any]
    param_names: Callable[[Any], dict[str, tuple[tuple[Any, ...], bool]]]
    logical_axes: Mapping[str, tuple[str | None, ...]]
    lora_targets: Mapping[str, str]
    canonical_name: Callable[[str], str] = lambda name: name
    ignored: re.Pattern = _NOTHING
    keep: re.Pattern = _NOTHING
    architecture: Callable[[Any], str] = lambda config: type(config).__name__
    export_name: Callable[[Any, str], str] = lambda config, name: name
    fit_to_tensors: Callable[[Any, set[str]], Any] = lambda config, names: config


FAMILIES: tuple[Family, ...] = (
    Family(
        name="bert",
        model_types=tuple(bert.SUPPORTED_MODEL_TYPES),
        config_from_hf=bert.EncoderConfig.from_hf,
        tower=bert.TransformerEncoder,
        param_names=bert.hf_param_names,
        logical_axes=bert.LOGICAL_AXES,
        lora_targets=bert.LORA_TARGETS,
        canonical_name=bert.hf_canonical_name,
        ignored=bert.HF_IGNORED,
        keep=bert.HF_KEEP,
        architecture=bert.hf_architecture,
    ),
    Family(
        name="t5",
        model_types=t5.SUPPORTED_MODEL_TYPES,
        config_from_hf=t5.T5EncoderConfig.from_hf,
        tower=t5.T5Encoder,
        param_names=t5.hf_param_names,
        logical_axes=t5.LOGICAL_AXES,
        lora_targets=t5.LORA_TARGETS,
        canonical_name=t5.hf_canonical_name,
        ignored=t5.HF_IGNORED,
        architecture=t5.hf_architecture,
    ),
    Family(
        name="decoder",
        model_types=decoder.SUPPORTED_MODEL_TYPES,
        config_from_hf=decoder.DecoderConfig.from_hf,
        tower=decoder.DecoderTower,
        param_names=decoder.hf_param_names,
        logical_axes=decoder.LOGICAL_AXES,
        lora_targets=decoder.LORA_TARGETS,
        canonical_name=decoder.hf_canonical_name,
        ignored=decoder.HF_IGNORED,
        architecture=decoder.hf_architecture,
        export_name=decoder.hf_export_name,
        fit_to_tensors=decoder.fit_to_tensors,
    ),
)

# The parameters a BiEncoder has besides its tower (models/encoder.py: the optional projection of
# the pooled vector, [hidden, projection_dim]).
HEAD_LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "projection/kernel": ("embed", None),
    "projection/bias": (None,),
}


def _merged_logical_axes() -> dict[str, tuple[str | None, ...]]:
    """Every family's table in one (a train state's paths do not say the family). Two families
    naming one parameter differently is a bug in their tables: raised at import."""
    merged: dict[str, tuple[str | None, ...]] = dict(HEAD_LOGICAL_AXES)
    for family in FAMILIES:
        for name, axes in family.logical_axes.items():
            if merged.setdefault(name, tuple(axes)) != tuple(axes):
                raise ValueError(
                    f"family {family.name!r} gives {name!r} the logical axes {axes}, another "
                    f"family {merged[name]}: rename the parameter or agree on its axes"
                )
    return merged


LOGICAL_AXES = _merged_logical_axes()


def param_logical_axes(path: str, ndim: int) -> tuple[str | None, ...] | None:
    """The logical axes of the leaf at ``path`` ("params/encoder/layers/3/query/kernel", or an
    Adam moment's "opt_state/1/0/mu/encoder/layers/3/query/kernel"), read off the last two
    components; None when no family declares it or its rank is not ``ndim``."""
    axes = LOGICAL_AXES.get("/".join(path.split("/")[-2:]))
    return axes if axes is not None and len(axes) == ndim else None


def lora_targets() -> dict[str, tuple[str, ...]]:
    """{family name: the attribute names of the projections LoRA may wrap}."""
    return {family.name: tuple(family.lora_targets.values()) for family in FAMILIES}


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_for(model_type: str | None) -> Family:
    """The family of an HF ``model_type`` (``ValueError`` naming the supported ones otherwise)."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"model_type {model_type!r} is not supported; gte-jax has towers for "
        f"{', '.join(supported_model_types())}."
    )


def family_of(config: Any) -> Family:
    return family_for(config.model_type)


def config_from_hf(hf_config: dict[str, Any], **overrides: Any) -> Any:
    """Our config for an HF ``config.json`` dict (``model_type`` missing means BERT, as in HF)."""
    return family_for(hf_config.get("model_type", "bert")).config_from_hf(hf_config, **overrides)


def build_tower(config: Any, *, rngs: Any) -> Any:
    return family_of(config).tower(config, rngs=rngs)
