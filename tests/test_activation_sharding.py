"""Activation sharding and GradCache's one gradient reduction per step, on 8 fake devices.

The compiled FSDP + GradCache train step of a tiny BERT, Mistral-shaped decoder and T5 encoder
is read with :mod:`gte_jax.plan_cost`'s parser: no collective moves an activation (the batch
stays split over "data"), and every parameter's gradient is reduced once per step, not once per
chunk and role. The numbers stay those of the replicated, plain (non-GradCache) step.

Sizes are picked so that shapes cannot be confused: the length L = 13 divides no parameter dim
(the tiny towers' are 5000, 128, 64, 32, 16, 8, 4 and 2), so a collective with a dim divisible
by 13 carries an activation ([rows, L, ...], attention [rows, heads, L, L], RoPE tables, T5's
position bias) or token ids.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import TINY_BERT
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, PartitionSpec
from test_fsdp import GRAD_ATOL, GRAD_REL_TOL, _close
from tiny_models import TINY_T5
from transformers import MistralConfig

from gte_jax import gradcache as gc
from gte_jax import plan_cost, train
from gte_jax import sharding as shd
from gte_jax.models import registry
from gte_jax.models.encoder import BiEncoder

BATCH, LENGTH, CHUNKS = 48, 13, 2  # chunks of 24 rows, 3 per device
VOCAB = 5000


TOWERS = ("bert", "mistral", "t5")


def _hf_config(tower: str) -> dict:
    """One layer and a 5000-token table (test time): every constraint site and every parameter
    kind of the tower is in it. Dropout on where the family has it."""
    if tower == "bert":
        return {**TINY_BERT, "num_hidden_layers": 1, "vocab_size": VOCAB}
    if tower == "mistral":  # grouped-query heads, RoPE, gated MLP; no dropout in Mistral
        return MistralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        ).to_dict()  # fmt: skip
    return {"model_type": "t5", **TINY_T5, "num_layers": 1, "vocab_size": VOCAB}


def _model(tower: str = "bert"):
    config = registry.config_from_hf(_hf_config(tower))
    model = BiEncoder(config, pooling="mean", normalize=True, rngs=nnx.Rngs(0))
    return train.ModelFn.from_module(model)


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    out = {}
    for role in ("query", "doc"):
        lengths = rs.randint(3, LENGTH + 1, (BATCH, 1))
        out[f"{role}_input_ids"] = rs.randint(1000, VOCAB, (BATCH, LENGTH)).astype(np.int32)
        out[f"{role}_attention_mask"] = (np.arange(LENGTH)[None] < lengths).astype(np.int32)
    return out


@pytest.fixture(scope="module", params=TOWERS)
def compiled_step(request):
    """(per-chip HLO text, params) of the jitted FSDP + GradCache train step, AOT from shapes."""
    model_fn, params = _model(request.param)
    tcfg = ml_collections.ConfigDict(
        {"learning_rate": 1e-3, "warmup_steps": 0, "warmup_ratio": 0.0, "schedule": "constant",
         "max_grad_norm": 1.0, "adam_eps": 1e-6}
    )  # fmt: skip
    tx, schedule = train.make_optimizer(tcfg, total_steps=10)
    state = jax.eval_shape(lambda p: train.init_train_state(p, tx, seed=0), params)
    mesh = shd.make_mesh()
    shardings = shd.state_shardings(state, mesh, "fsdp")
    step = train.make_train_step(
        model_fn, tx, loss_name="gte", loss_kwargs={"temperature": 0.05}, num_chunks=CHUNKS,
        gradcache=True, mesh=mesh, schedule=schedule, gather_params="per_chunk",
        param_shardings=shardings["params"],
    )  # fmt: skip
    spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, jnp.int32, sharding=shd.batch_sharding(mesh))
        for k, v in _batch().items()
    }
    lowered = jax.jit(step, out_shardings=(shardings, None)).lower(
        jax.tree.map(spec, state, shardings), batch
    )
    return lowered.compile().as_text(), params


def test_no_collective_moves_an_activation(compiled_step):
    hlo, _ = compiled_step
    ops = plan_cost.collective_ops(hlo)
    moved = [
        op
        for op in ops
        if any(d % LENGTH == 0 for shape in op.operand_shapes + op.result_shapes for d in shape)
    ]
    assert not moved, "\n".join(map(str, moved[:5]))
    # Not vacuous: the FSDP weights are gathered inside the chunk loops.
    assert sum(op.runs for op in ops if op.kind == "all-gather") >= 2 * CHUNKS


def test_each_gradient_is_reduced_once_per_step(compiled_step):
    hlo, params = compiled_step
    shapes = collections.Counter(tuple(x.shape) for x in jax.tree.leaves(params))
    reduced: collections.Counter = collections.Counter()
    for op in plan_cost.collective_ops(hlo):
        if op.kind not in ("all-reduce", "reduce-scatter"):
            continue
        for shape in op.operand_shapes:  # a reduce-scatter's operand is the unreduced gradient
            if shape in shapes:
                reduced[shape] += op.runs
    # Each parameter's gradient once (the Adam moments and updates need no reduction);
    # per chunk and role it would be 2 x CHUNKS times.
    assert reduced == shapes


def test_the_loss_reduces_only_each_devices_own_rows_of_the_embedding_gradient(compiled_step):
    """The contrastive loss runs per device on its own rows against the gathered batch (the
    objective gets the step's mesh: ``losses.sharded_contrastive_loss``): every reduction of a
    batch-sized array is a reduce-scatter back to the device's rows. The global-view loss that
    XLA partitions by itself all-reduced the whole [BATCH, D] gradients here (and, at 64 chips,
    each 1,024-row block's rows in every block: ~0.7x the f32 parameter bytes of GTE-base)."""
    hlo, _ = compiled_step
    rows = BATCH // jax.device_count()
    reduced = [
        op
        for op in plan_cost.collective_ops(hlo)
        if op.kind in ("all-reduce", "reduce-scatter")
        and any(shape and shape[0] == BATCH for shape in op.operand_shapes)
    ]
    assert reduced  # not vacuous: the embeddings' gradients are reduced
    for op in reduced:
        assert op.kind == "reduce-scatter", op
        assert all(shape[0] == rows for shape in op.result_shapes), op
        assert op.runs == 1, op


def _grads(model_fn, params, mesh, mode, *, gradcache, gather, batch, rng):
    embed_fn = train.make_embed_fn(model_fn)
    loss_fn = gc.make_loss_fn("gte", temperature=0.05)
    shardings = shd.state_shardings(params, mesh, mode)
    run = gc.cached_value_and_grad if gradcache else gc.plain_value_and_grad
    kwargs = {"gather": gather, "param_shardings": shardings} if gradcache else {}

    def step(p, b):
        with shd.mesh_context(mesh):
            return run(embed_fn, loss_fn, p, b, rng, CHUNKS, mesh=mesh, **kwargs)

    (loss, _), grads = jax.jit(step)(shd.place(params, shardings), batch)
    return float(loss), jax.device_get(grads)


@pytest.mark.parametrize("tower", TOWERS)
def test_one_reduction_gradcache_equals_the_plain_replicated_step(tower):
    """FSDP, weights gathered per chunk and per step. Dropout on (the tiny BERT's and T5's 0.1):
    the per-device backward draws the masks of the global forward. Tolerances of
    tests/test_fsdp.py (float32 sums in another order)."""
    model_fn, params = _model(tower)  # one model for every run below (its init is eager)
    params = jax.device_get(params)
    mesh = shd.make_mesh()
    batch = shd.global_batch(_batch(1), mesh)
    rng = jax.random.key(3)
    ref_loss, ref = _grads(
        model_fn, params, mesh, "replicate", gradcache=False, gather=None, batch=batch, rng=rng
    )
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(ref)) > 1e-2
    for gather in gc.REDUCE_ONCE_MODES:  # per_layer is the global view of tests/test_fsdp.py
        loss, got = _grads(
            model_fn, params, mesh, "fsdp", gradcache=True, gather=gather, batch=batch, rng=rng
        )
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        _close(got, ref, atol=GRAD_ATOL, rel=GRAD_REL_TOL)


def _step_memory(gather: str, layers: int = 8, width: int = 128) -> tuple[float, float]:
    """(compiled temp bytes per device, float32 parameter bytes) of the FSDP + GradCache step of
    a scanned BERT on the 8 CPU devices, AOT from shapes."""
    hf = {**TINY_BERT, "num_hidden_layers": layers, "hidden_size": width, "vocab_size": 1000,
          "intermediate_size": 4 * width, "num_attention_heads": 4}  # fmt: skip
    config = registry.config_from_hf(hf, scan_layers=True)
    model = BiEncoder(config, pooling="mean", normalize=True, rngs=nnx.Rngs(0))
    model_fn, params = train.ModelFn.from_module(model)
    tx = optax.sgd(0.1)
    state = jax.eval_shape(lambda p: train.init_train_state(p, tx, seed=0), params)
    mesh = shd.make_mesh()
    shardings = shd.state_shardings(state, mesh, "fsdp")
    step = train.make_train_step(
        model_fn, tx, loss_name="gte", loss_kwargs={"temperature": 0.05}, num_chunks=4,
        gradcache=True, mesh=mesh, gather_params=gather, param_shardings=shardings["params"],
    )  # fmt: skip
    spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    batch = {
        f"{role}_{k}": jax.ShapeDtypeStruct((32, 8), jnp.int32, sharding=shd.batch_sharding(mesh))
        for role in ("query", "doc")
        for k in ("input_ids", "attention_mask")
    }
    compiled = (
        jax.jit(step, out_shardings=(shardings, None))
        .lower(jax.tree.map(spec, state, shardings), batch)
        .compile()
    )
    weights = sum(x.size * 4 for x in jax.tree.leaves(params))
    return float(compiled.memory_analysis().temp_size_in_bytes), float(weights)


def test_per_layer_gathers_keep_fsdp_memory_and_the_reduce_once_modes_do_not():
    """per_layer (the global view) never holds the full weights or a full-size gradient on a
    device; the per-device backward holds both (weights gathered whole, its own accumulator)."""
    per_layer, weights = _step_memory("per_layer")
    per_step, _ = _step_memory("per_step")
    assert per_step >= 2 * weights, (per_step, weights)  # full weights + full accumulator
    assert per_layer < weights, (per_layer, weights)  # not even the whole weights once


def test_activation_spec_follows_the_rules():
    auto = AbstractMesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    spec = shd.activation_spec
    assert spec(("batch", "length", "embed"), (8, 13, 32), auto) == PartitionSpec(
        "data", None, None
    )
    assert spec(("batch", "length", "heads", "kv"), (8, 13, 4, 16), auto) == PartitionSpec(
        "data", None, "model", None
    )
    assert spec(("batch", "length", "mlp"), (6, 13, 3), auto) is None  # neither divides
    manual = AbstractMesh((4, 1), ("data", "model"), axis_types=(AxisType.Manual, AxisType.Auto))
    # Inside shard_map over "data" the rows are local; a size-1 "model" axis splits nothing.
    assert spec(("batch", "length", "mlp"), (8, 13, 64), manual) is None
    x = jnp.ones((8, 13, 32))
    assert shd.constrain(x, ("batch", "length", "embed")) is x  # no mesh in context
