"""The LoRA layer the towers call: ``x·W + b + s·(drop(x)·A)·B`` (:class:`LoRALinear`), and
:func:`dense` / :func:`site_keys`, through which every tower calls its projections.

This is the part of LoRA below the towers (``bert.py``, ``t5.py``, ``decoder.py`` import it);
``gte_jax/models/lora.py`` (inject, merge, the config group, the trainable split) sits above the
family registry, whose families name the projections LoRA may wrap (:data:`LORA_ROLES`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gte_jax.models.dropout as _dropout
import gte_jax.models.linear as _linear

# The roles a family's LoRA targets are declared by (each family module's ``LORA_TARGETS``:
# role -> the attribute name of that projection in its tower), PEFT's usual target set.
LORA_ROLES = (
    "attention_q",
    "attention_k",
    "attention_v",
    "attention_o",
    "mlp_gate",
    "mlp_up",
    "mlp_down",
)

# Folded into a layer's dropout key for its LoRA sites: independent of the layer's own dropout
# draws, which stay what they were without LoRA.
_LORA_KEY_SALT = 0x10AA


class LoRAParam(nnx.Param):
    """A LoRA factor (``lora_a`` / ``lora_b``): the only trainable parameters of a model that has
    any."""


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout, the towers' rule (``gte_jax.models.dropout``)."""
    return _dropout.dropout(x, rate, rng)


class LoRALinear(nnx.Module):
    """``nnx.Linear`` + a low-rank update: ``x·W + b + s·(drop(x)·A)·B``, same param paths for
    ``kernel`` [in, out] and ``bias`` [out] (the HF name map and the sharding rules still apply),
    plus ``lora_a`` [in, r] and ``lora_b`` [r, out]."""

    def __init__(
        self, base: nnx.Linear, *, rank: int, alpha: float, dropout_rate: float, rngs: nnx.Rngs
    ):
        self.in_features, self.out_features = base.in_features, base.out_features
        self.use_bias = base.use_bias
        self.dtype, self.param_dtype = base.dtype, base.param_dtype
        self.precision = base.precision
        self.dot_general, self.promote_dtype = base.dot_general, base.promote_dtype
        self.preferred_element_type = base.preferred_element_type
        self.rank, self.alpha, self.dropout_rate = int(rank), float(alpha), float(dropout_rate)
        self.kernel = nnx.Param(base.kernel[...])  # [in, out]
        self.bias = nnx.data(nnx.Param(base.bias[...]) if base.bias is not None else None)
        # A scanned tower's projection is stacked ([layers, in, out]): so are its factors.
        lead = tuple(base.kernel.shape[:-2])
        # torch.nn.Linear's default init (kaiming_uniform, a=sqrt(5)): U(±1/sqrt(in)), as PEFT.
        init_a = nnx.initializers.variance_scaling(
            1.0 / 3.0, "fan_in", "uniform", batch_axis=tuple(range(len(lead)))
        )
        self.lora_a = LoRAParam(
            init_a(rngs.params(), lead + (self.in_features, rank), self.param_dtype)
        )
        self.lora_b = LoRAParam(jnp.zeros(lead + (rank, self.out_features), self.param_dtype))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        if self.dtype is not None and jnp.dtype(self.dtype) != jnp.float32:
            return self._mixed(x, dropout_rng)
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        kwargs = {}
        if self.preferred_element_type is not None:
            kwargs["preferred_element_type"] = self.preferred_element_type
        # The base layer exactly as nnx.Linear computes it: with B = 0 the output is the base's.
        y = self.dot_general(
            x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision, **kwargs
        )  # [..., out]
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        a, b = self.promote_dtype((self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        h = jnp.matmul(
            dropout(x, self.dropout_rate, dropout_rng), a, precision=self.precision
        )  # [..., rank]
        return y + jnp.matmul(h * self.scale, b, precision=self.precision)  # [..., out]

    def _mixed(self, x: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
        """bf16 compute: the base as a plain layer's (:func:`gte_jax.models.linear.linear`) and
        the LoRA path with float32 accumulation and float32 dA / dB (``linear.lora_delta``)."""
        bias = self.bias[...] if self.bias is not None else None
        y = _linear.linear(x, self.kernel[...], bias, self.dtype)  # [..., out]
        dropped = dropout(x.astype(self.dtype), self.dropout_rate, dropout_rng)
        delta = _linear.lora_delta(
            dropped, self.lora_a[...], self.lora_b[...], self.scale, self.dtype
        )  # [..., out] float32
        return (y + delta).astype(y.dtype)

    def merged_kernel(self) -> jax.Array | np.ndarray:
        """``W + s·A·B`` [in, out] in the parameter dtype (export and between stages only). A
        kernel in host memory (NumPy: a model loaded to be placed shard by shard) stays there."""
        kernel = self.kernel[...]
        if isinstance(kernel, np.ndarray):
            delta = np.asarray(self.lora_a[...]) @ np.asarray(self.lora_b[...])  # [in, out]
            return (kernel + self.scale * delta).astype(self.param_dtype)
        delta = jnp.matmul(
            self.lora_a[...], self.lora_b[...], precision=jax.lax.Precision.HIGHEST
        )  # [in, out]
        return (kernel + self.scale * delta).astype(self.param_dtype)


def dense(layer: nnx.Module, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
    """``layer(x)``, giving a LoRA layer its dropout key. A plain Linear computing in float32 is
    called as it is; in bf16 it goes through :func:`gte_jax.models.linear.linear` (bf16 operands,
    float32 accumulation and parameter gradients)."""
    if isinstance(layer, LoRALinear):
        return layer(x, dropout_rng)
    if layer.dtype is None or jnp.dtype(layer.dtype) == jnp.float32:
        return layer(x)
    bias = layer.bias[...] if layer.bias is not None else None
    return _linear.linear(x, layer.kernel[...], bias, layer.dtype)


def site_keys(dropout_rng: jax.Array | None, layers: Sequence[nnx.Module]) -> list:
    """One dropout key per layer for :func:`dense` (all None unless some layer has LoRA dropout:
    a model without LoRA draws nothing more)."""
    active = dropout_rng is not None and any(
        isinstance(layer, LoRALinear) and layer.dropout_rate > 0 for layer in layers
    )
    if not active:
        return [None] * len(layers)
    return list(jax.random.split(jax.random.fold_in(dropout_rng, _LORA_KEY_SALT), len(layers)))
