"""LoRA for any tower: chosen ``nnx.Linear`` layers become ``x·W + b + s·(drop(x)·A)·B``.

Hu et al. 2021 (and PEFT, whose conventions we keep so adapters interchange): ``A`` [in, r] starts
kaiming-uniform as ``torch.nn.Linear`` (bound 1/sqrt(in)), ``B`` [r, out] starts at zero, so an
injected model computes exactly what the base did; ``s = alpha / r``; dropout acts on the LoRA
input only. The forward never builds ``W + s·A·B``: the LoRA path costs two thin matmuls per layer
(tevatron's JAX trainer rebuilds every full weight each step instead).

Trainable vs frozen: LoRA factors are :class:`LoRAParam` (a subclass of ``nnx.Param``, so every
split by ``nnx.Param`` still sees them). A model that has any LoRAParam trains those alone; every
other parameter (the tower, the projection) is frozen. :func:`trainable_mask` gives that split on
the pure parameter dict that training works on (``ModelFn``); the optimizer state and the gradient
are taken over the trainable part only.

Towers call their projections through :func:`dense` with keys from :func:`site_keys`, so a
LoRA layer's dropout is a pure function of the step's dropout key (GradCache replays it) and a
plain ``nnx.Linear`` is called exactly as before.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gte_jax.models.registry as registry
from gte_jax.errors import ConfigError

# The layer half lives in lora_layer.py (below the towers, which import it); re-exported so that
# callers above the registry have one module for LoRA.
from gte_jax.models.lora_layer import (  # noqa: F401
    LoRALinear,
    LoRAParam,
    dense,
    dropout,
    site_keys,
)

# Every family's LoRA targets (its module's ``LORA_TARGETS``: role -> projection attribute name,
# what a path like "encoder/layers/3/query/kernel" ends with; not the torch names).
LORA_TARGETS: dict[str, tuple[str, ...]] = registry.lora_targets()
KNOWN_TARGETS = frozenset(name for names in LORA_TARGETS.values() for name in names)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """The ``model.lora`` group: rank r, alpha (scale = alpha / r), dropout on the LoRA input,
    target layer names (empty: every projection of the tower with a name in ``KNOWN_TARGETS``)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()

    @property
    def scale(self) -> float:
        return float(self.alpha) / int(self.rank)

    @classmethod
    def from_config(cls, group: Any) -> LoRAConfig | None:
        """From a config's ``model.lora`` group; None when LoRA is off. Raises ConfigError."""
        if not bool(group.enabled):
            return None
        problems = config_problems(group)
        if problems:
            raise ConfigError("model.lora cannot work:\n  - " + "\n  - ".join(problems))
        return cls(
            rank=int(group.rank),
            alpha=float(group.alpha),
            dropout=float(group.dropout),
            target_modules=tuple(str(t) for t in group.target_modules),
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LoRAConfig:
        d = json.loads(text)
        d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)


# ``model.lora.base_dtype``: how the frozen tower is stored (training only; exports are float32).
BASE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}


def base_dtype(group: Any) -> np.dtype:
    """The frozen base's dtype under a ``model.lora`` group (float32 when LoRA is off)."""
    return BASE_DTYPES[group.base_dtype] if group.enabled else BASE_DTYPES["float32"]


def cast_frozen(frozen: Any, dtype: Any) -> Any:
    """The frozen base in ``dtype``: arrays cast (a no-op when they already are, e.g. read
    straight to it by ``gte_jax.sharded_io``), abstract leaves given the dtype (``plan``)."""

    def cast(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x if x.dtype == dtype else x.astype(dtype)

    return jax.tree.map(cast, frozen)


def config_problems(group: Any) -> list[str]:
    """What is wrong with an enabled ``model.lora`` group (empty when it can work)."""
    problems = []
    if not isinstance(group.rank, int) or int(group.rank) < 1:
        problems.append(f"model.lora.rank={group.rank!r}: must be an integer >= 1 (E5-mistral: 16)")
    if not float(group.alpha) > 0:
        problems.append(f"model.lora.alpha={group.alpha!r}: must be > 0 (the scale is alpha/rank)")
    if not 0.0 <= float(group.dropout) < 1.0:
        problems.append(f"model.lora.dropout={group.dropout!r}: must be in [0, 1)")
    if group.base_dtype not in BASE_DTYPES:
        problems.append(
            f"model.lora.base_dtype={group.base_dtype!r}: use one of {sorted(BASE_DTYPES)}"
        )
    unknown = sorted(set(group.target_modules) - KNOWN_TARGETS)
    if unknown:
        problems.append(
            f"model.lora.target_modules: unknown {unknown}; the towers' projections are "
            + "; ".join(f"{family}: {', '.join(names)}" for family, names in LORA_TARGETS.items())
            + " (empty: all of the model's)"
        )
    return problems


# --------------------------------------------------------------------------------------------------
# Inject / merge on a built model
# --------------------------------------------------------------------------------------------------


def _replace(model: nnx.Module, path: tuple[Any, ...], new: nnx.Module) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def inject(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> list[str]:
    """Replaces (in place) every ``nnx.Linear`` whose attribute name is a target by a
    :class:`LoRALinear`; returns the paths replaced. A target this model does not have is a
    ConfigError naming the projections it has."""
    linears = [
        (path, m) for path, m in nnx.iter_modules(model) if path and isinstance(m, nnx.Linear)
    ]
    names = {str(path[-1]) for path, _ in linears}
    wanted = set(config.target_modules) or (names & KNOWN_TARGETS)
    missing = sorted(wanted - names)
    if missing or not wanted:
        raise ConfigError(
            f"model.lora.target_modules: {missing or 'nothing'} matches no Linear layer of this "
            f"model; its Linear layers are {sorted(names)}"
        )
    done = []
    for path, linear in linears:
        if str(path[-1]) in wanted:
            new = LoRALinear(
                linear,
                rank=config.rank,
                alpha=config.alpha,
                dropout_rate=config.dropout,
                rngs=rngs,
            )
            _replace(model, path, new)
            done.append("/".join(map(str, path)))
    return done


def lora_layers(model: nnx.Module) -> list[tuple[tuple[Any, ...], LoRALinear]]:
    """(path, layer) of every LoRA layer of ``model``, in graph order."""
    return [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)]


def has_lora(model: nnx.Module) -> bool:
    return bool(lora_layers(model))


def merge(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every LoRA layer written back as a plain ``nnx.Linear`` of kernel
    ``W + s·A·B`` (``model`` itself is unchanged; arrays are shared where nothing changes)."""
    layers = lora_layers(model)
    if not layers:
        return model
    out = nnx.clone(model)
    for path, layer in lora_layers(out):
        plain = nnx.eval_shape(
            lambda layer=layer: nnx.Linear(
                layer.in_features,
                layer.out_features,
                use_bias=layer.use_bias,
                dtype=layer.dtype,
                param_dtype=layer.param_dtype,
                precision=layer.precision,
                dot_general=layer.dot_general,
                promote_dtype=layer.promote_dtype,
                preferred_element_type=layer.preferred_element_type,
                rngs=nnx.Rngs(0),
            )
        )
        plain.kernel = nnx.Param(layer.merged_kernel())
        plain.bias = nnx.data(nnx.Param(layer.bias[...]) if layer.bias is not None else None)
        _replace(out, path, plain)
    return out


# --------------------------------------------------------------------------------------------------
# Trainable / frozen split of a pure parameter dict
# --------------------------------------------------------------------------------------------------


def trainable_mask(module: nnx.Module) -> dict | None:
    """Pure dict of bools over ``nnx.state(module, nnx.Param)``: True on LoRA factors. None when
    the module has no LoRA (everything trains)."""
    if not has_lora(module):
        return None
    state = nnx.state(module, nnx.Param)
    flat = [(path, isinstance(v, LoRAParam)) for path, v in nnx.to_flat_state(state)]
    return _unflatten(flat)


def _unflatten(items: Iterable[tuple[tuple[Any, ...], Any]]) -> dict:
    out: dict = {}
    for path, value in items:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def partition(tree: Mapping, mask: Mapping) -> tuple[dict, dict]:
    """(leaves where ``mask`` is True, the rest), both nested dicts without empty branches."""
    chosen, rest = {}, {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            a, b = partition(value, mask[key])
            if a:
                chosen[key] = a
            if b:
                rest[key] = b
        elif mask[key]:
            chosen[key] = value
        else:
            rest[key] = value
    return chosen, rest


def combine(a: Mapping, b: Mapping) -> dict:
    """The union of two nested dicts with disjoint leaves (inverse of :func:`partition`)."""
    out = dict(a)
    for key, value in b.items():
        if key in out:
            if not (isinstance(out[key], Mapping) and isinstance(value, Mapping)):
                raise ValueError(f"parameter {key!r} is in both the trainable and frozen parts")
            out[key] = combine(out[key], value)
        else:
            out[key] = value
    return out
