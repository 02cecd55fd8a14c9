"""Mixed-precision projections (gte_jax/models/linear.py) and the compute-dtype rule
(gte_jax/models/precision.py), against float64 NumPy on the same bf16-rounded operands."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gte_jax.models import lora
from gte_jax.models.linear import linear
from gte_jax.models.precision import compute_dtype, cpu_has_amx_bf16

REPO = pathlib.Path(__file__).resolve().parents[1]
BF16_EPS = 2.0**-8  # one bf16 rounding of a value (8 significant bits)


def _bf16_f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)


@pytest.mark.parametrize("shape", [(3, 7, 48), (21, 48)])
def test_bf16_linear_and_its_gradients_match_float64(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((48, 40)) * 0.2, jnp.float32)
    b = jnp.asarray(rng.standard_normal(40), jnp.float32)
    g = jnp.asarray(rng.standard_normal((*shape[:-1], 40)), jnp.float32)  # upstream gradient

    def loss(x, w, b):
        return jnp.sum(linear(x, w, b, jnp.bfloat16).astype(jnp.float32) * g)

    y = linear(x, w, b, jnp.bfloat16)
    dx, dw, db = jax.grad(loss, argnums=(0, 1, 2))(x, w, b)
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    # Parameter gradients keep the parameters' float32.
    assert dw.dtype == jnp.float32 and db.dtype == jnp.float32

    xs, ws, gs = _bf16_f64(x), _bf16_f64(w), _bf16_f64(g)
    lead = tuple(range(len(shape) - 1))
    y_ref = xs @ ws + np.asarray(b, np.float64)
    dw_ref = np.tensordot(xs, gs, axes=(lead, lead))
    db_ref = gs.sum(axis=lead)
    dx_ref = gs @ ws.T
    # Output and dx: one bf16 rounding of an f32-accumulated value.
    np.testing.assert_allclose(
        np.asarray(y, np.float64), y_ref, atol=2 * BF16_EPS * np.abs(y_ref).max()
    )
    np.testing.assert_allclose(
        np.asarray(dx, np.float64), dx_ref, atol=2 * BF16_EPS * np.abs(dx_ref).max()
    )
    # dW and db: f32 accumulation, no bf16 rounding (autodiff through kernel.astype(bf16) would
    # have rounded them: ~100x this tolerance).
    np.testing.assert_allclose(np.asarray(dw, np.float64), dw_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(db, np.float64), db_ref, rtol=1e-6, atol=1e-6)


def test_float32_linear_is_nnx_linear_bitwise():
    layer = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    np.testing.assert_array_equal(np.asarray(lora.dense(layer, x)), np.asarray(layer(x)))
    np.testing.assert_array_equal(
        np.asarray(linear(x, layer.kernel[...], layer.bias[...], jnp.float32)),
        np.asarray(layer(x)),
    )


def test_bf16_nnx_linear_goes_through_the_mixed_rule():
    layer = nnx.Linear(16, 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 16)).astype(jnp.bfloat16)
    y = lora.dense(layer, x)
    assert y.dtype == jnp.bfloat16
    ref = _bf16_f64(x) @ _bf16_f64(layer.kernel[...]) + np.asarray(layer.bias[...], np.float64)
    np.testing.assert_allclose(
        np.asarray(y, np.float64), ref, atol=2 * BF16_EPS * np.abs(ref).max()
    )

    def loss(model):
        return jnp.sum(lora.dense(model, x).astype(jnp.float32))

    grads = nnx.grad(loss)(layer)
    assert grads.kernel[...].dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(grads.kernel[...], np.float64),
        np.broadcast_to(_bf16_f64(x).sum(axis=(0, 1))[:, None], (16, 8)),
        rtol=1e-5,
    )


def test_compute_dtype_rule(tmp_path):
    assert compute_dtype("float32") == jnp.float32
    assert compute_dtype("bfloat16", "cpu") == jnp.bfloat16
    for accelerator in ("tpu", "gpu"):
        assert compute_dtype("auto", accelerator) == jnp.bfloat16
    assert compute_dtype("auto", "cpu", amx_bf16=True) == jnp.bfloat16
    assert compute_dtype("auto", "cpu", amx_bf16=False) == jnp.float32
    with pytest.raises(ValueError, match="model.dtype='float16'"):
        compute_dtype("float16")
    sapphire = tmp_path / "spr"
    sapphire.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    zen = tmp_path / "zen"
    zen.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert cpu_has_amx_bf16.__wrapped__(str(sapphire))
    assert not cpu_has_amx_bf16.__wrapped__(str(zen))
    assert not cpu_has_amx_bf16.__wrapped__(str(tmp_path / "missing"))


def test_a_bad_model_dtype_is_refused_at_start_up(tmp_path, capsys):
    from gte_jax.cli import main

    rc = main(
        ["train", "--config", str(REPO / "configs/finetune.py"), "--workdir", str(tmp_path / "w"),
         f"--config.data.train_files={REPO}/gte_jax/resources/demo/bible_finetune.jsonl",
         "--config.model.dtype=float16"]
    )  # fmt: skip
    assert rc == 2
    assert "model.dtype='float16'" in capsys.readouterr().err
