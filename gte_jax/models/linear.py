"""Mixed-precision dense layers: ``y = x·W + b`` with bfloat16 operands and float32 accumulation.

The one rule for a projection whose compute dtype is not float32 (``model.dtype=bfloat16``, or
``auto`` where bf16 is the fast choice: :func:`gte_jax.models.precision.compute_dtype`):

- forward: the matmul takes bf16 operands and accumulates (and returns) float32, the bias is
  added in float32, then the output is cast to the compute dtype;
- backward (a ``custom_vjp``, not autodiff of the forward): ``dx = dy·Wᵀ`` and
  ``dW = xᵀ·dy`` with bf16 operands and float32 accumulation, contracted over the leading
  [batch, length] axes as they are (no flattened transposed copy), and ``db = Σ dy`` in float32.
  The kernel and bias gradients are float32 (the parameters' dtype); autodiff through
  ``kernel.astype(bf16)`` would have rounded them to bf16 first.

Why not ``nnx.Linear(dtype=bf16)``: its matmul returns bf16, and autodiff's transposed matmuls
come out as bf16-output dots on transposed operands. XLA:CPU runs those off its fast path; on a
CPU with AMX-BF16 (this repository's CI machines) the bf16-output form ran at ~180 GFLOP/s and
the transposed weight-gradient form at ~120, against 750-1200 for the forms used here (f32 at
~175-215): a MiniLM fine-tune step went from 3.9-4.1 s (f32) / 4.0-4.6 s (plain bf16) to 1.64 s
(``benchmarks/README.md``, where a fine-tune step's time goes). The rule is the same on every backend (TPU MXUs and GPU
tensor cores accumulate bf16 products in f32 too); it was not measured on an accelerator.

float32 compute keeps ``nnx.Linear``'s own call (bitwise what it was).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


def _lead(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def _forward(x, kernel, bias, dtype):
    xc, wc = x.astype(dtype), kernel.astype(dtype)
    y = lax.dot_general(
        xc, wc, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=_F32
    )  # [..., out] float32
    if bias is not None:
        y = y + bias.astype(_F32)
    return y.astype(dtype), (xc, wc)


def _backward(dtype, has_bias, res, dy):
    xc, wc = res
    dyc = dy.astype(dtype)  # [..., out]
    lead = _lead(xc)
    if xc.ndim == 2:  # XLA:CPU's fast weight-gradient form contracts two leading axes
        x3, dy3 = xc[None], dyc[None]
    else:
        x3, dy3 = xc, dyc
    l3 = _lead(x3)
    dx = lax.dot_general(
        dyc, wc, (((dyc.ndim - 1,), (1,)), ((), ())), preferred_element_type=_F32
    ).astype(xc.dtype)  # [..., in]
    dw = lax.dot_general(x3, dy3, ((l3, l3), ((), ())), preferred_element_type=_F32)  # [in, out]
    db = jnp.sum(dyc.astype(_F32), axis=lead) if has_bias else None  # [out]
    return dx, dw, db


def linear(
    x: jax.Array,  # [..., in]
    kernel: jax.Array,  # [in, out] (parameter dtype, float32)
    bias: jax.Array | None,  # [out]
    dtype,
) -> jax.Array:
    """``x·kernel + bias`` computed in ``dtype`` as the module docstring says ([..., out], dtype)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return y if bias is None else y + bias
    return _mixed_impl(x, kernel, bias, dtype.name)


_mixed_impl = jax.custom_vjp(
    lambda x, kernel, bias, dtype_name: _forward(x, kernel, bias, jnp.dtype(dtype_name))[0],
    nondiff_argnums=(3,),
)


def _nd_fwd(x, kernel, bias, dtype_name):
    y, (xc, wc) = _forward(x, kernel, bias, jnp.dtype(dtype_name))
    # Dtypes ride along as zero-size arrays (residuals must be JAX values).
    tags = (
        jnp.zeros((0,), x.dtype),
        jnp.zeros((0,), kernel.dtype),
        None if bias is None else jnp.zeros((0,), bias.dtype),
    )
    return y, (xc, wc, tags)


def _nd_bwd(dtype_name, saved, dy):
    xc, wc, (xt, wt, bt) = saved
    dx, dw, db = _backward(jnp.dtype(dtype_name), bt is not None, (xc, wc), dy)
    return dx.astype(xt.dtype), dw.astype(wt.dtype), None if db is None else db.astype(bt.dtype)


_mixed_impl.defvjp(_nd_fwd, _nd_bwd)


# --------------------------------------------------------------------------------------------------
# The LoRA path s·(x·A)·B of a layer computing in bf16
# --------------------------------------------------------------------------------------------------


def lora_delta(
    x: jax.Array,  # [..., in] (dropout already applied)
    a: jax.Array,  # [in, r] float32
    b: jax.Array,  # [r, out] float32
    scale: float,
    dtype,
) -> jax.Array:
    """``s·(x·A)·B`` [..., out] float32 for a LoRA layer computing in ``dtype`` (not float32).

    The rule of :func:`linear` (bf16 operands x, A, B; float32 accumulation; float32 parameter
    gradients), with the rank-r intermediates ``h = s·x·A`` and ``dh = s·dy·Bᵀ`` kept in float32:
    dA = xᵀ·dh and dB = hᵀ·dy are made of them, and autodiff rounds them to bf16 (dA / dB relative
    errors ~2.5e-3 against float32's ~1e-6, tests/test_lora.py). Every matmul after x·A is
    float32 but thin (r = rank columns): ~3r(in + out) / (2 in·out) of the frozen layer's flops.
    """
    return _lora_impl(x, a, b, float(scale), jnp.dtype(dtype).name)


def _contract_last(u, v):  # [..., k] x [k, n] -> [..., n] float32
    return lax.dot_general(u, v, (((u.ndim - 1,), (0,)), ((), ())), preferred_element_type=_F32)


def _lora_forward(x, a, b, scale, dtype):
    xc, ac, bc = x.astype(dtype), a.astype(dtype), b.astype(dtype)
    h = _contract_last(xc, ac) * scale  # [..., r] float32
    return _contract_last(h, bc.astype(_F32)), (xc, ac, bc, h)  # [..., out] float32


def _lora_fwd(x, a, b, scale, dtype_name):
    y, res = _lora_forward(x, a, b, scale, jnp.dtype(dtype_name))
    return y, (res, jnp.zeros((0,), x.dtype))  # x's dtype rides along (residuals are arrays)


def _lora_bwd(scale, dtype_name, saved, dy):
    (xc, ac, bc, h), x_tag = saved
    dy = dy.astype(_F32)  # [..., out]
    lead = _lead(xc)
    dh = scale * lax.dot_general(
        dy, bc.astype(_F32), (((dy.ndim - 1,), (1,)), ((), ()))
    )  # [..., r]
    db = lax.dot_general(h, dy, ((lead, lead), ((), ())))  # [r, out]
    da = lax.dot_general(xc.astype(_F32), dh, ((lead, lead), ((), ())))  # [in, r]
    dx = lax.dot_general(dh, ac.astype(_F32), (((dh.ndim - 1,), (1,)), ((), ())))  # [..., in]
    return dx.astype(x_tag.dtype), da, db


_lora_impl = jax.custom_vjp(
    lambda x, a, b, scale, dtype_name: _lora_forward(x, a, b, scale, jnp.dtype(dtype_name))[0],
    nondiff_argnums=(3, 4),
)
_lora_impl.defvjp(_lora_fwd, _lora_bwd)
