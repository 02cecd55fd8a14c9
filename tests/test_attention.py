"""``gte_jax.models.attention``: every kernel computes the same attention as a NumPy float64
oracle, for the mask rule's cases (padding, packed segments, causal, bidirectional, grouped-query
heads, sliding windows), forward and gradients; the towers give the same outputs whichever kernel
runs; start-up refuses a kernel the devices cannot run.

Tolerances: a float32 attention output is a convex combination of values, so two evaluations
that differ in summation order differ by about eps x (head_dim + length) x max|logit| x max|v|
(the logits' dot products, then the softmax's sum; tests/numerics.py). bfloat16 inputs: both
paths round the probabilities to bfloat16 before the value matmul and the output to bfloat16,
so they differ by a few bfloat16 ulps of max|v|.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics import reorder_atol

from gte_jax import plan, plan_cost, train
from gte_jax import sharding as shd
from gte_jax.defaults import stage_config
from gte_jax.models import attention as attn
from gte_jax.models.bert import EncoderConfig, TransformerEncoder
from gte_jax.models.decoder import DecoderConfig, DecoderTower

BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)  # 2^-7


def _rule(mask: attn.Mask) -> np.ndarray:
    """[batch, q, kv] bool by the module doc's rule, one pair at a time (the oracle's mask)."""
    real = np.asarray(mask.attention_mask).astype(bool)
    seg = None if mask.segment_ids is None else np.asarray(mask.segment_ids)
    b, n = real.shape
    out = np.zeros((b, n, n), bool)
    for r in range(b):
        for i in range(n):
            for j in range(n):
                if not real[r, i]:
                    out[r, i, j] = real[r, j]
                    continue
                ok = real[r, j] and (seg is None or seg[r, i] == seg[r, j])
                ok = ok and (not mask.causal or j <= i)
                if mask.window is not None:
                    w = mask.window
                    ok = ok and (0 <= i - j < w if mask.causal else abs(i - j) <= w // 2)
                out[r, i, j] = ok
    return out


def _oracle(q, k, v, allowed, scale, bias=None) -> np.ndarray:
    """float64 softmax attention, grouped-query heads by repeating K/V (HF's repeat_kv)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    logits = np.where(allowed[:, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


def _inputs(length=12, heads=4, kv_heads=4, head_dim=8, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(3, length, heads, head_dim))
    k, v = (rng.normal(size=(3, length, kv_heads, head_dim)) for _ in range(2))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _mask(length=12, *, packed=False, causal=False, window=None) -> attn.Mask:
    """Row 0 right-padded, row 1 left-padded, row 2 full; packed: 2-3 segments per row."""
    am = np.ones((3, length), np.int32)
    am[0, length - 4 :] = 0
    am[1, :3] = 0
    seg = None
    if packed:
        seg = np.zeros((3, length), np.int32)
        seg[0, : length - 4] = np.repeat([1, 2], [3, length - 7])
        seg[1, 3:] = np.repeat([1, 2, 3], [2, 4, length - 9])
        seg[2] = np.repeat([1, 2], [5, length - 5])
        am = (seg > 0).astype(np.int32)
        seg = jnp.asarray(seg)
    return attn.Mask(jnp.asarray(am), seg, causal, window)


CASES = {
    "padding": dict(),
    "packed": dict(packed=True),
    "causal": dict(causal=True),
    "causal_packed": dict(causal=True, packed=True),
    "bidirectional_window": dict(window=5),
    "causal_window": dict(causal=True, window=4),
}


def _tol(q, k, v, scale) -> float:
    n_terms = q.shape[-1] + k.shape[1]
    logit = float(jnp.abs(q).max() * jnp.abs(k).max()) * q.shape[-1] * scale
    return reorder_atol(float(jnp.abs(v).max()) * max(1.0, logit), n_terms)


def test_explicit_mask_is_the_rule():
    for case in CASES.values():
        mask = _mask(**case)
        rule = _rule(mask)
        np.testing.assert_array_equal(
            np.broadcast_to(np.asarray(attn.explicit_mask(mask))[:, 0], rule.shape), rule
        )


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kv_heads", [4, 2])  # multi-head and grouped-query
def test_kernels_equal_the_float64_oracle(case, kv_heads):
    q, k, v = _inputs(kv_heads=kv_heads)
    mask, scale = _mask(**CASES[case]), 8**-0.5
    want = _oracle(q, k, v, _rule(mask), scale)
    tol = _tol(q, k, v, scale)
    for kernel in ("reference", "xla"):
        got = attn.attend(q, k, v, mask, kernel=kernel, scale=scale)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=tol, err_msg=kernel)


def test_a_bias_reaches_every_kernel_that_takes_one():
    # T5's relative position bias: [1, heads, q, kv] float32, unscaled logits.
    q, k, v = _inputs()
    bias = jnp.asarray(np.random.default_rng(3).normal(size=(1, 4, 12, 12)), jnp.float32)
    mask = _mask(packed=True)
    want = _oracle(q, k, v, _rule(mask), 1.0, bias)
    tol = _tol(q, k, v, 1.0) + reorder_atol(float(jnp.abs(bias).max()), 12)
    for kernel in ("reference", "xla"):
        got = attn.attend(q, k, v, mask, kernel=kernel, scale=1.0, bias=bias)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=tol, err_msg=kernel)


def test_packing_is_what_the_test_checks():
    # The packed case's oracle differs from unpacked attention by far more than the tolerance,
    # so dropping the segment ids (a mutation) fails test_kernels_equal_the_float64_oracle.
    q, k, v = _inputs()
    packed = _mask(packed=True)
    unpacked = attn.Mask(packed.attention_mask)
    gap = np.abs(
        np.asarray(attn.attend(q, k, v, packed)) - np.asarray(attn.attend(q, k, v, unpacked))
    )
    assert gap.max() > 100 * _tol(q, k, v, 8**-0.5)


def test_bfloat16_xla_equals_reference():
    q, k, v = _inputs(kv_heads=2, dtype=jnp.bfloat16)
    mask = _mask(causal=True, packed=True)
    ref = attn.attend(q, k, v, mask, kernel="reference").astype(jnp.float32)
    xla = attn.attend(q, k, v, mask, kernel="xla").astype(jnp.float32)
    # probabilities and outputs each rounded to bfloat16 once: 2 ulps of max|v| (and one more).
    assert float(jnp.abs(ref - xla).max()) <= 3 * BF16_EPS * float(jnp.abs(v).max())


@pytest.mark.parametrize("case", ["packed", "causal_window"])
def test_gradients_equal(case):
    q, k, v = _inputs(kv_heads=2)
    mask = _mask(**CASES[case])
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    real = mask.attention_mask.astype(jnp.float32)[:, :, None, None]

    def loss(kernel):
        return lambda q, k, v: jnp.sum(attn.attend(q, k, v, mask, kernel=kernel) * w * real)

    ref = jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
    xla = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    # Backward: the forward's reductions again, each scaled by the gradient's own magnitude,
    # with the softmax's Jacobian (logit scale) in front: reorder rounding of that size.
    logit = float(jnp.abs(q).max() * jnp.abs(k).max()) * q.shape[-1] * 8**-0.5
    n_terms = 2 * (q.shape[-1] + q.shape[1])
    for name, a, b in zip("qkv", ref, xla, strict=True):
        tol = reorder_atol(float(jnp.abs(a).max()) * max(1.0, logit), n_terms)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=tol, err_msg=name)
        assert float(jnp.abs(a).max()) > 0


def test_splash_kernel_equals_the_oracle_on_real_tokens():
    # Pallas' interpreter runs the TPU kernel's maths on CPU; lengths are a multiple of 128.
    q, k, v = _inputs(length=128, heads=4, kv_heads=2, head_dim=128)
    am = np.ones((3, 128), np.int32)
    am[0, 100:] = 0
    seg = np.zeros((3, 128), np.int32)
    seg[0, :100] = np.repeat([1, 2], [60, 40])
    seg[1] = np.repeat([1, 2], [70, 58])
    seg[2] = 1
    mask = attn.Mask(jnp.asarray(am), jnp.asarray(seg), causal=True, window=32)
    scale = 128**-0.5
    got = attn.splash_attention(q, k, v, mask, scale=scale, interpret=True)
    want = _oracle(q, k, v, _rule(mask), scale)
    real = am.astype(bool)  # pad rows attend other pads there (module doc): never pooled
    tol = _tol(q, k, v, scale)
    np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=0, atol=tol)


def test_splash_inside_a_shard_map_over_data_runs_per_device():
    """GradCache's pass 2 runs the tower per device (a shard_map over "data"); the splash call
    there must not split the already local rows again (it failed to lower before)."""
    n = 2  # devices (interpreting the kernel is slow)
    mesh = shd.make_mesh(n, 1, jax.devices()[:n])
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(n, 128, 1, 128)), jnp.float32) for _ in range(3))

    def run(q, k, v):
        mask = attn.Mask(jnp.ones(q.shape[:2], jnp.int32))
        return attn.splash_attention(q, k, v, mask, scale=0.1, interpret=True)

    rows = jax.sharding.PartitionSpec("data")
    with jax.set_mesh(mesh):
        per_device = jax.shard_map(
            run, in_specs=(rows,) * 3, out_specs=rows, axis_names={"data"}, check_vma=False
        )
        got = jax.jit(per_device)(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(run(q, k, v)), rtol=0, atol=1e-5)


def test_splash_in_a_data_shard_map_lowers_for_tpu_with_a_model_axis():
    """The same call lowered for TPU devices (libtpu's topology, nothing run): inside the
    shard_map over "data" the mesh's "model" axis is still automatic, and XLA cannot partition a
    Mosaic kernel ("wrap the call in a shard_map": LoRA's per_step pass 2 failed so at 7B); the
    CPU test above interprets the kernel, so no Mosaic call reaches the partitioner there."""
    pytest.importorskip("libtpu")
    from gte_jax.topologies import parse_topology, topology_devices

    devices = topology_devices(parse_topology("v5e:2x2"))
    mesh = jax.sharding.Mesh(np.array(devices).reshape(4, 1), ("data", "model"))
    rows = jax.sharding.PartitionSpec("data")
    shape = jax.ShapeDtypeStruct(
        (8, 128, 2, 128), jnp.bfloat16, sharding=jax.sharding.NamedSharding(mesh, rows)
    )

    def run(q, k, v):
        mask = attn.Mask(jnp.ones(q.shape[:2], jnp.int32))
        return attn.splash_attention(q, k, v, mask, scale=0.1)

    with jax.set_mesh(mesh):
        per_device = jax.shard_map(
            run, in_specs=(rows,) * 3, out_specs=rows, axis_names={"data"}, check_vma=False
        )
        text = jax.jit(jax.grad(lambda q, k, v: per_device(q, k, v).astype(jnp.float32).sum(),
                                argnums=(0, 1, 2))).lower(shape, shape, shape).as_text()  # fmt: skip
    assert "tpu_custom_call" in text  # the Mosaic kernel is in the program


def test_auto_picks_the_platform_kernel_where_the_call_allows():
    q, k, v = _inputs(length=128, dtype=jnp.bfloat16)
    short, _, _ = _inputs(length=12, dtype=jnp.bfloat16)
    assert attn.choose("auto", "cpu", q, k) == "reference"
    assert attn.choose("auto", "tpu", q, k) == "reference"  # no mesh set: no shard_map
    with jax.set_mesh(shd.make_mesh(1, 1, jax.devices()[:1])):
        assert attn.choose("auto", "tpu", q, k) == "splash"
        assert attn.choose("auto", "tpu", short, short) == "reference"  # not a multiple of 128
        assert attn.choose("auto", "tpu", q, k, bias=jnp.zeros((1, 4, 128, 128))) == "reference"
    assert attn.choose("auto", "gpu", q, k) == "cudnn"
    assert attn.choose("auto", "gpu", q.astype(jnp.float32), k) == "reference"
    assert attn.choose("auto", "gpu", q, k, dropout=lambda p: p) == "reference"
    with pytest.raises(ValueError, match="attention_kernel='xla'.*no attention dropout"):
        attn.choose("xla", "cpu", q, k, dropout=lambda p: p)


def _towers(kind: str, kernel: str):
    if kind == "bert":
        config = EncoderConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=32, attention_kernel=kernel,
        )  # fmt: skip
        return TransformerEncoder(config, rngs=nnx.Rngs(0))
    config = DecoderConfig(
        model_type="mistral", vocab_size=50, hidden_size=16, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        layer_types=("sliding_attention", "full_attention"), sliding_window=4,
        rope=(("full_attention", (("rope_type", "default"), ("rope_theta", 10000.0))),),
        attention_kernel=kernel,
    )  # fmt: skip
    return DecoderTower(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", ["bert", "decoder"])
def test_towers_with_xla_kernel_equal_reference(kind):
    ids = jnp.asarray(np.random.default_rng(2).integers(1, 50, size=(3, 12)), jnp.int32)
    mask = _mask(packed=True)
    args = (ids, mask.attention_mask)
    ref = _towers(kind, "reference")(*args, segment_ids=mask.segment_ids)
    xla = _towers(kind, "xla")(*args, segment_ids=mask.segment_ids)
    real = np.asarray(mask.attention_mask).astype(bool)
    # Each layer's attention differs by reorder rounding; 2 layers, hidden 16, O(1) activations.
    tol = reorder_atol(float(jnp.abs(ref).max()), 16 + 12) * 2 * 8
    np.testing.assert_allclose(np.asarray(xla)[real], np.asarray(ref)[real], rtol=0, atol=tol)


@pytest.mark.parametrize(
    "kernel, fields, message",
    [
        ("cudnn", {}, "runs on GPU only; this run's devices are cpu"),
        ("splash", {}, "runs on TPU only"),
        ("flash", {}, "use one of"),
        ("xla", {}, "has no attention dropout"),  # the checkpoint's own rate (-1): unknown
        ("xla", {"attention_dropout": 0.1}, "has no attention dropout"),
    ],
)
def test_start_up_refuses_a_kernel_that_cannot_run(kernel, fields, message):
    config = stage_config()
    config.model.attention_kernel = kernel
    config.model.update(fields)
    mesh = shd.make_mesh(1, 1, jax.devices()[:1])
    with pytest.raises(train.TrainingError, match=message):
        train.check_config(config, mesh)
    config.model.attention_dropout = 0.0
    if kernel == "xla":
        assert train.check_config(config, mesh) == 1


def test_plan_keeps_the_analytic_time_when_xla_cannot_print_the_program():
    # What a compiled step with the splash kernel does on as_text() (jax 0.10.2, libtpu 0.0.52).
    class Unprintable:
        def as_text(self):
            raise jax.errors.JaxRuntimeError("RET_CHECK failure: async-update instruction")

    assert plan_cost.compiled_cost(Unprintable(), []) == {}
    # --layers: the memory fitted in depth, no cost figures -> no time from the program
    fitted = {"argument": 1.0, "temp": 2.0, "peak": 3.0}
    assert "unavailable" in plan._cost_report(fitted, None, {}, None, None, 0.4)["compiled_cost"]
