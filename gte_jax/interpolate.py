"""Weight interpolation of two models of one family at export: (1 - w)·own + w·partner per tensor.

WiSE-FT (Wortsman et al., 2022) and LM-Cocktail (Xiao et al., 2023): averaging a fine-tuned
model's weights with those of the model it started from (or another stage's) recovers much of
what fine-tuning forgot, at no inference cost. Here the exported stage is "own", the model named
by ``gte-jax export --interpolate SPEC=W`` or ``export.interpolate_from`` / ``interpolate_weight``
is the partner with weight ``w``. A LoRA model is merged (W + s·A·B) before it is mixed.

The mix is computed in float64 and rounded once to the own tensor's dtype, so ``w = 0`` gives
the own tensor bit for bit. Only weights are mixed: the export keeps the own model's config,
pooling, normalisation, prompts and tokenizer. Both models must be of one family with the same
parameter names and shapes; the first tensor that differs is named otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from gte_jax.models import lora
from gte_jax.models.encoder import ModelFn
from gte_jax.models.registry import family_of


class InterpolationError(ValueError):
    """The two models cannot be mixed (another family, or a tensor's name or shape differs)."""


@dataclasses.dataclass(frozen=True)
class Interpolation:
    """``partner``: a stage name (a sibling workdir of the exported one), ``stage:<name>``, a
    model directory or a workdir; ``weight``: the partner's share in [0, 1]."""

    partner: str
    weight: float


def parse(text: str) -> Interpolation:
    """``"SPEC=W"`` (the last ``=`` splits, so a path may hold one) -> :class:`Interpolation`."""
    spec, sep, weight = str(text).rpartition("=")
    try:
        value = float(weight)
    except ValueError:
        value = float("nan")
    if not sep or not spec or not 0 <= value <= 1:
        raise ValueError(
            f"--interpolate {text!r}: expected MODEL=WEIGHT with WEIGHT in [0, 1] (the weight "
            "on MODEL, a stage name, a model directory or a workdir), e.g. pretrain=0.3"
        )
    return Interpolation(spec, value)


def from_config(export_cfg: Any) -> Interpolation | None:
    """The ``export.interpolate_*`` settings of a stage (None: a plain export)."""
    partner = str(export_cfg.interpolate_from)
    return Interpolation(partner, float(export_cfg.interpolate_weight)) if partner else None


def config_problems(export_cfg: Any) -> list[str]:
    """A weight without a partner (the weight's range is ``gte_jax/ranges.py``'s)."""
    if float(export_cfg.interpolate_weight) and not str(export_cfg.interpolate_from):
        return [
            f"export.interpolate_weight={export_cfg.interpolate_weight} needs "
            "export.interpolate_from (a model directory, a workdir or stage:<name>)"
        ]
    return []


def stage_problems(config: Any) -> list[str]:
    """One line per stage of a multi-stage config whose ``export.interpolate_from`` names a stage
    that has not run before it (checked before the first stage starts)."""
    problems = []
    stages = list(config.stages)
    for i, name in enumerate(stages):
        partner = str(config[name].export.interpolate_from)
        if partner.startswith("stage:") and partner.split(":", 1)[1] not in stages[:i]:
            problems.append(
                f"{name}.export.interpolate_from={partner!r}: not an earlier stage of this "
                f"config (stages: {stages})"
            )
    return problems


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.update(_flat(value, f"{path}/") if isinstance(value, Mapping) else {path: value})
    return out


def _unflat_like(tree: Mapping[str, Any], flat: Mapping[str, Any], prefix: str = "") -> dict:
    return {
        key: _unflat_like(value, flat, f"{prefix}{key}/")
        if isinstance(value, Mapping)
        else flat[f"{prefix}{key}"]
        for key, value in tree.items()
    }


def mix_params(own: Mapping[str, Any], partner: Mapping[str, Any], weight: float) -> dict[str, Any]:
    """(1 - weight)·own + weight·partner per leaf of two pure param dicts (NumPy, float64, then
    the own leaf's dtype). :class:`InterpolationError` naming the first leaf missing from either
    or of another shape."""
    a, b = _flat(own), _flat(partner)
    for name in sorted(set(a) | set(b)):
        if name not in b or name not in a:
            which = "the partner" if name not in b else "the exported model"
            raise InterpolationError(f"cannot interpolate: tensor {name} is missing from {which}")
        if np.shape(a[name]) != np.shape(b[name]):
            raise InterpolationError(
                f"cannot interpolate: tensor {name} has shape {tuple(np.shape(a[name]))} in the "
                f"exported model and {tuple(np.shape(b[name]))} in the partner"
            )
    mixed = {}
    for name, x in a.items():
        x64 = np.asarray(x, dtype=np.float64)
        y64 = np.asarray(b[name], dtype=np.float64)
        mixed[name] = ((1.0 - weight) * x64 + weight * y64).astype(np.asarray(x).dtype)
    return _unflat_like(own, mixed)


def mix_models(own: Any, partner: Any, weight: float) -> Any:
    """The own ``BiEncoder`` (LoRA merged) with its weights mixed with the partner's."""
    own, partner = lora.merge(own), lora.merge(partner)
    mine, theirs = family_of(own.config).name, family_of(partner.config).name
    if mine != theirs:
        raise InterpolationError(
            f"cannot interpolate a {mine} model ({own.config.model_type}) with a {theirs} "
            f"model ({partner.config.model_type}): the two must be of one family"
        )
    model_fn, params = ModelFn.from_module(own)
    _, partner_params = ModelFn.from_module(partner)
    return model_fn.module(mix_params(params, partner_params, float(weight)))
