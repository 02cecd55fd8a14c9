"""Tower families: an HF ``config.json`` ``model_type`` -> our config, tower and weight-name map.

A *family* is everything gte-jax needs to know about one kind of transformer tower:

- ``config_from_hf(hf: dict, **overrides) -> config``: our frozen config dataclass from an HF
  ``config.json`` dict. Overrides are the family's own field names plus these generic ones, which
  every family accepts: ``dtype`` (compute dtype), ``remat`` (bool), ``dropout`` and
  ``attention_dropout`` (floats: the config group ``model``'s switches, mapped onto the family's
  fields — BERT's ``hidden_dropout_prob``, T5's ``dropout_rate``, ...), ``attention``
  ("causal" | "bidirectional": decoders take either, encoders refuse "causal").
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

The config dataclass of every family has ``model_type``, ``hidden_size``, ``num_hidden_layers``,
``num_attention_heads``, ``dtype``, ``param_dtype``, ``remat``, ``max_length`` and ``to_hf()``.
A new family is one module under ``gte_jax/models/`` plus one ``Family`` entry below.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
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
        canonical_name=decoder.hf_canonical_name,
        ignored=decoder.HF_IGNORED,
        architecture=decoder.hf_architecture,
        export_name=decoder.hf_export_name,
        fit_to_tensors=decoder.fit_to_tensors,
    ),
)


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
