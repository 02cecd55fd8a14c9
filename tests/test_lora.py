"""LoRA (gte_jax/models/lora.py): B = 0 gives the base model bit for bit; the forward against a
float64 NumPy reference; gradients against the merged formulation; the frozen base outside the
optimizer state, the gradient and the checkpoints; GradCache + LoRA == plain autodiff; FSDP on 8
fake devices; `gte-jax train` with LoRA resumes bitwise, and its merged export (sentence-
transformers) and its PEFT adapter (peft + transformers) embed as our LoRA forward does."""

from __future__ import annotations

import collections
import functools
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from numerics import F32_EPS, reorder_atol, reorder_rtol

from gte_jax import plan_cost, train
from gte_jax import sharding as shd
from gte_jax.errors import ConfigError
from gte_jax.models import dropout as dropout_bits
from gte_jax.models import lora
from gte_jax.models.bert import EncoderConfig
from gte_jax.models.encoder import BiEncoder, ModelFn

SMALL = EncoderConfig(
    vocab_size=60,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=32,
)
LORA = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.1)


def _small_model(seed=0):
    return BiEncoder(SMALL, pooling="mean", normalize=True, rngs=nnx.Rngs(seed))


def _inputs():
    ids = jnp.array([[2, 7, 9, 11, 3, 0], [4, 5, 6, 0, 0, 0], [8, 1, 10, 12, 13, 14]], jnp.int32)
    return ids, (ids > 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, ids, mask, key):
    return nnx.merge(graphdef, state)(ids, mask, dropout_rng=key)


def _embed(model, ids, mask, key=None):
    """``model(ids, mask, dropout_rng=key)``, jitted (op-by-op dispatch is slower than a compile;
    models of one structure share the program)."""
    return _apply(*nnx.split(model), ids, mask, key)


def _randomise_b(model, seed=1):
    """B != 0 on every LoRA layer (at init B = 0 and the LoRA path would be invisible)."""
    for i, (_, layer) in enumerate(lora.lora_layers(model)):
        key = jax.random.fold_in(jax.random.key(seed), i)
        layer.lora_b[...] = 0.3 * jax.random.normal(key, layer.lora_b[...].shape)


def test_zero_b_gives_the_base_outputs():
    """One layer op by op: bit for bit (B = 0 adds exact zeros). The whole model jitted, dropout
    on: to float32 roundoff (XLA fuses the extra add differently), so the base's own dropout
    masks are unchanged by LoRA's keys (folded in, not split off)."""
    base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (2, 4, 6))
    layer = lora.LoRALinear(base, rank=3, alpha=6.0, dropout_rate=0.5, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(layer(x, jax.random.key(5)), base(x))
    model = _small_model()
    ids, mask = _inputs()
    key = jax.random.key(3)
    before = _embed(model, ids, mask, key)
    paths = lora.inject(model, LORA, rngs=nnx.Rngs(1))
    assert len(paths) == 12  # 6 projections x 2 layers
    np.testing.assert_allclose(_embed(model, ids, mask, key), before, rtol=0, atol=1e-6)
    a = np.asarray(lora.lora_layers(model)[0][1].lora_a[...])
    bound = 1.0 / np.sqrt(SMALL.hidden_size)  # torch.nn.Linear's (PEFT's) kaiming-uniform bound
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound
    _randomise_b(model)
    assert np.abs(np.asarray(_embed(model, ids, mask, key) - before)).max() > 1e-3


def _layer_and_x(dropout_rate=0.25, dtype=jnp.float32):
    base = nnx.Linear(6, 5, dtype=dtype, rngs=nnx.Rngs(0))
    base.bias[...] = jnp.linspace(-1, 1, 5)
    layer = lora.LoRALinear(base, rank=3, alpha=6.0, dropout_rate=dropout_rate, rngs=nnx.Rngs(1))
    layer.lora_b[...] = jax.random.normal(jax.random.key(2), (3, 5))
    x = jax.random.normal(jax.random.key(4), (2, 4, 6))
    return layer, x


def test_forward_equals_float64_reference_with_dropout():
    layer, x = _layer_and_x()
    key = jax.random.key(7)
    w, b = (np.asarray(v[...], np.float64) for v in (layer.kernel, layer.bias))
    a, bb = (np.asarray(v[...], np.float64) for v in (layer.lora_a, layer.lora_b))
    x64 = np.asarray(x, np.float64)
    words = np.asarray(jax.random.key_data(key)).reshape(-1)  # the draws lora.dropout makes
    keep = dropout_bits.numpy_bits((int(words[0]), int(words[-1])), x.shape) >= 2**30
    for rng, x_lora in ((None, x64), (key, np.where(keep, x64 / 0.75, 0.0))):
        expected = x64 @ w + b + 2.0 * (x_lora @ a) @ bb  # s = alpha / r = 2
        np.testing.assert_allclose(np.asarray(layer(x, rng)), expected, rtol=1e-5, atol=1e-5)
    # The merged kernel W + s·A·B (export) gives the same map without dropout.
    np.testing.assert_allclose(
        np.asarray(layer.merged_kernel(), np.float64), w + 2.0 * a @ bb, rtol=1e-6, atol=1e-6
    )


def _bf16_f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)


def _bf16_lora_grads(path, shape=(3, 40, 64), d_in=64, d_out=48, rank=8):
    """(dA, dB) of a bf16 LoRA layer's sum(y * g) and the float64 references on the same
    bf16-rounded x, A, B and upstream gradient, with each entry's Higham bound
    gamma_n · Σ|terms| (n: the longest chain of float32 additions behind the entry)."""
    rng = np.random.default_rng(0)
    base = nnx.Linear(d_in, d_out, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    layer = lora.LoRALinear(base, rank=rank, alpha=2.0 * rank, dropout_rate=0.0, rngs=nnx.Rngs(1))
    layer.lora_b = lora.LoRAParam(jnp.asarray(rng.standard_normal((rank, d_out)) * 0.1))
    x = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((*shape[:-1], d_out)), jnp.float32)
    s, w, bias = layer.scale, layer.kernel[...], layer.bias[...]
    da, db = jax.jit(jax.grad(lambda a, b: jnp.sum(path(x, w, bias, a, b, s) * g), (0, 1)))(
        layer.lora_a[...], layer.lora_b[...]
    )
    xs, a, b = _bf16_f64(x), _bf16_f64(layer.lora_a[...]), _bf16_f64(layer.lora_b[...])
    gs, lead = _bf16_f64(g), tuple(range(len(shape) - 1))  # dy: the bf16 output's cotangent
    n_tok = int(np.prod(shape[:-1]))
    da_ref = np.tensordot(xs, s * gs @ b.T, (lead, lead))
    db_ref = np.tensordot(s * xs @ a, gs, (lead, lead))
    da_bound = reorder_rtol(n_tok + d_out + 2) * np.tensordot(
        np.abs(xs), s * np.abs(gs) @ np.abs(b).T, (lead, lead)
    )
    db_bound = reorder_rtol(n_tok + d_in + 2) * np.tensordot(
        s * np.abs(xs) @ np.abs(a), np.abs(gs), (lead, lead)
    )
    return (np.asarray(da), da_ref, da_bound), (np.asarray(db), db_ref, db_bound)


def _lora_layer_call(x, w, bias, a, b, s):
    """The LoRA layer's own bf16 path (gte_jax/models/lora_layer.py, linear.lora_delta)."""
    layer = lora.LoRALinear(
        nnx.Linear(w.shape[0], w.shape[1], dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
        rank=a.shape[1],
        alpha=s * a.shape[1],
        dropout_rate=0.0,
        rngs=nnx.Rngs(0),
    )
    layer.kernel, layer.bias = nnx.Param(w), nnx.Param(bias)
    layer.lora_a, layer.lora_b = lora.LoRAParam(a), lora.LoRAParam(b)
    return layer(x).astype(jnp.float32)


def _plain_autodiff(x, w, bias, a, b, s):
    """The mutation: the LoRA path in bf16 through plain autodiff (bf16 h and dh)."""
    bf = jnp.bfloat16
    y = jnp.matmul(x, w.astype(bf)) + bias.astype(bf)
    return (y + jnp.matmul(jnp.matmul(x, a.astype(bf)) * s, b.astype(bf))).astype(jnp.float32)


@pytest.mark.numerics
def test_bf16_lora_factor_gradients_are_float32_accumulated():
    """dA and dB of a bf16 LoRA layer within float32's summation bound of float64 on the same
    bf16 operands (plain autodiff, which rounds the rank-r intermediates to bf16, is not)."""
    for grad, ref, bound in _bf16_lora_grads(_lora_layer_call):
        assert grad.dtype == np.float32
        assert np.all(np.abs(grad - ref) <= bound), np.max(np.abs(grad - ref) / bound)
    worst = [np.max(np.abs(g - r) / b) for g, r, b in _bf16_lora_grads(_plain_autodiff)]
    assert min(worst) > 1, worst


@pytest.mark.numerics
def test_gradient_equals_the_merged_formulation():
    """jax.grad through x·W + s·(x·A)·B equals jax.grad through x·(W + s·A·B), whole model."""
    model = _small_model()
    base_fn, base_params = ModelFn.from_module(nnx.clone(model))
    lora.inject(model, lora.LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    _randomise_b(model)
    model_fn, params = ModelFn.from_module(model)
    trainable, frozen = model_fn.split_params(params)
    ids, mask = _inputs()
    target = jax.random.normal(jax.random.key(9), (3, SMALL.hidden_size))

    def ours(p):
        return jnp.sum(model_fn.module(model_fn.join_params(p, frozen))(ids, mask) * target)

    def merged(p):  # independent of LoRALinear: plain Linears with kernel W + s·A·B
        full = jax.tree.map(lambda v: v, base_params)
        for i, layer in p["encoder"]["layers"].items():
            for name, f in layer.items():
                kernel = full["encoder"]["layers"][i][name]["kernel"]
                delta = jnp.matmul(f["lora_a"], f["lora_b"], precision="highest")
                full["encoder"]["layers"][i][name]["kernel"] = kernel + 2.0 * delta
        return jnp.sum(base_fn.module(full)(ids, mask) * target)

    # One program each for value and gradient (not a forward and a backward program apiece).
    v_ours, g_ours = jax.jit(jax.value_and_grad(ours))(trainable)
    v_merged, g_merged = jax.jit(jax.value_and_grad(merged))(trainable)
    # (x·A)·B vs x·(W + s·A·B): sums over the width reassociated, then over every token
    terms = int(ids.size) + SMALL.hidden_size
    np.testing.assert_allclose(v_ours, v_merged, rtol=reorder_rtol(terms))
    assert jax.tree.structure(g_ours) == jax.tree.structure(trainable)  # A and B only
    for x, y in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_merged), strict=True):
        scale = float(np.abs(np.asarray(y)).max())
        assert scale > 1e-4
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=reorder_atol(scale, terms))


def test_inject_refuses_targets_the_model_lacks_and_merge_gives_a_plain_model():
    with pytest.raises(ConfigError, match=r"q_proj.*'attention_output'"):
        lora.inject(_small_model(), lora.LoRAConfig(target_modules=("q_proj",)), rngs=nnx.Rngs(0))
    model = _small_model()
    lora.inject(model, lora.LoRAConfig(target_modules=("query", "value")), rngs=nnx.Rngs(0))
    assert [p[-1] for p, _ in lora.lora_layers(model)] == ["query", "value"] * 2
    _randomise_b(model)
    ids, mask = _inputs()
    merged = lora.merge(model)
    assert lora.has_lora(model) and not lora.has_lora(merged)
    np.testing.assert_allclose(_embed(merged, ids, mask), _embed(model, ids, mask), atol=1e-6)


def _lora_config(**lora_fields):
    from gte_jax.defaults import stage_config

    config = stage_config()
    config.model.lora.enabled = True
    config.model.lora.update(lora_fields)
    return config


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"rank": 0}, "rank=0"),
        ({"alpha": -1.0}, "alpha=-1.0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"target_modules": ("query", "qproj")}, "unknown \\['qproj'\\]"),
        ({"base_dtype": "float16"}, "base_dtype='float16'"),
    ],
)
def test_check_config_refuses_impossible_lora(fields, message):
    mesh = shd.make_mesh(1, 1, jax.devices()[:1])
    with pytest.raises(train.TrainingError, match=message):
        train.check_config(_lora_config(**fields), mesh)
    assert train.check_config(_lora_config(), mesh) == 1


def _lora_state(tiny_model_dir, tx, *, dropout=0.1, remat=False):
    from gte_jax import hf

    model, tokenizer, _ = hf.load_pretrained(tiny_model_dir, remat=remat)
    lora.inject(model, lora.LoRAConfig(rank=4, alpha=8.0, dropout=dropout), rngs=nnx.Rngs(0))
    _randomise_b(model)  # gradients reach A too
    model_fn, params = ModelFn.from_module(model)
    trainable, frozen = model_fn.split_params(params)
    state = jax.device_get(train.init_train_state(trainable, tx, seed=0, frozen=frozen))
    return model_fn, state, tokenizer


def _paths(tree):
    return {shd.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_opt_state_holds_lora_factors_only(tiny_model_dir):
    tx, _ = train.make_optimizer(ml_collections.ConfigDict({"warmup_steps": 0}), total_steps=4)
    _, state, _ = _lora_state(tiny_model_dir, tx)
    param_paths = _paths(state["params"])
    assert param_paths and all(p.endswith(("/lora_a", "/lora_b")) for p in param_paths)
    assert len(param_paths) == 2 * 6 * 2  # A and B x 6 projections x 2 layers
    moments = [p for p in _paths(state["opt_state"]) if "/mu/" in p or "/nu/" in p]
    assert len(moments) == 2 * len(param_paths)
    assert all(p.endswith(("/lora_a", "/lora_b")) for p in moments)
    assert "frozen" in state and not any(p.endswith("/lora_a") for p in _paths(state["frozen"]))
    assert set(train.checkpointed(state)) == {"params", "opt_state", "step", "rng"}


def _pairs(tokenizer, batch_size):
    """A batch of query/positive pairs (two roles: fewer programs to compile than triples)."""
    from gte_jax.data.pipeline import DEMO_DIR, build_iterator, build_sources, default_data_config

    data = default_data_config()
    data.train_files = str(DEMO_DIR / "bible_kjv_web_ot.jsonl")
    data.batch_size = batch_size
    data.query_max_length = data.doc_max_length = 32
    return next(build_iterator(data, tokenizer=tokenizer, sources=build_sources(data)))


def _step(model_fn, tx, mesh, state, batch, shardings=None, hlo=None, **kwargs):
    """(placed state, state after one step, metrics); ``hlo`` (a list): the compiled program's
    text is appended to it."""
    step = jax.jit(
        train.make_train_step(
            model_fn, tx, loss_name="gte", loss_kwargs={"temperature": 0.05}, mesh=mesh, **kwargs
        ),
        out_shardings=(shardings, None) if shardings is not None else None,
    )
    placed = shd.place(state, shardings) if shardings is not None else shd.shard_params(state, mesh)
    batch = shd.global_batch(batch, mesh)
    compiled = step.lower(placed, batch).compile()
    if hlo is not None:
        hlo.append(compiled.as_text())
    new, metrics = compiled(placed, batch)
    return placed, jax.device_get(new), jax.device_get(metrics)


LR = 0.5


@pytest.fixture(scope="module")
def lora_steps(tiny_model_dir):
    """One SGD step (the params after it carry the gradient itself, scale included), LoRA dropout
    on, 4 chunks: plain autodiff and GradCache with per-layer remat on 2 devices, GradCache +
    FSDP on 8 (the dropout masks depend on the chunks, not on the device count)."""
    tx = optax.sgd(LR)
    model_fn, state, tokenizer = _lora_state(tiny_model_dir, tx, dropout=0.3)
    remat_fn, remat_state, _ = _lora_state(tiny_model_dir, tx, dropout=0.3, remat=True)
    assert jax.tree.structure(remat_state) == jax.tree.structure(state)
    batch = _pairs(tokenizer, 32)
    fsdp_mesh = shd.make_mesh(8, 1)
    fsdp_shardings = shd.state_shardings(state, fsdp_mesh, "fsdp")
    # tokens summed into each LoRA factor's gradient (every row of every role)
    tokens = sum(v.size for k, v in batch.items() if k.endswith("_input_ids"))
    runs = {"init": state, "fsdp_shardings": fsdp_shardings, "tokens": tokens, "hlo": []}
    two = shd.make_mesh(2, 1, jax.devices()[:2])
    once = {"gather_params": "per_step", "param_shardings": fsdp_shardings["params"]}
    for name, fn, mesh, kwargs in (
        ("plain", model_fn, two, {}),
        ("gradcache", remat_fn, two, {"gradcache": True}),
        ("fsdp", model_fn, fsdp_mesh, {"gradcache": True, "shardings": fsdp_shardings}),
        ("fsdp_once", model_fn, fsdp_mesh,
         {"gradcache": True, "shardings": fsdp_shardings, "hlo": runs["hlo"], **once}),
    ):  # fmt: skip
        placed, new, metrics = _step(fn, tx, mesh, state, batch, num_chunks=4, **kwargs)
        runs[name] = (new, metrics)
        runs[f"{name}_placed"] = placed
    return runs


def _assert_params_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def _assert_same_gradients(a, b, init, tokens):
    """(init - params) / lr per leaf: equal up to float32 sums over ``tokens`` terms in another
    order (tests/numerics.py), plus the rounding of init - lr g read back through / lr."""
    for x, y, x0 in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(init), strict=True):
        gx, gy = (np.asarray(x0) - np.asarray(x)) / LR, (np.asarray(x0) - np.asarray(y)) / LR
        scale = float(np.abs(gy).max())
        assert scale > 0
        atol = reorder_atol(scale, tokens) + 2 * F32_EPS * float(np.abs(x0).max()) / LR
        np.testing.assert_allclose(gx, gy, rtol=0, atol=atol)


def test_a_step_moves_every_lora_factor_and_no_base_weight(lora_steps):
    init, (plain, metrics) = lora_steps["init"], lora_steps["plain"]
    assert bool(metrics["finite"]) and float(metrics["grad_norm"]) > 1e-3
    for x, y in zip(jax.tree.leaves(plain["frozen"]), jax.tree.leaves(init["frozen"]), strict=True):
        np.testing.assert_array_equal(x, y)
    moved = [
        float(np.abs(x - y).max())
        for x, y in zip(jax.tree.leaves(plain["params"]), jax.tree.leaves(init["params"]), strict=True)
    ]  # fmt: skip
    assert min(moved) > 1e-6  # every A and B got an update


@pytest.mark.numerics
def test_gradcache_and_remat_with_lora_equal_plain_autodiff_with_dropout(lora_steps):
    """GradCache replays each chunk's dropout key (LoRA's included) in both passes; remat
    recomputes each layer with the same keys."""
    (plain, m_plain), (cached, m_cached) = lora_steps["plain"], lora_steps["gradcache"]
    tokens = lora_steps["tokens"]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(m_cached[key], m_plain[key], rtol=reorder_rtol(tokens))
    _assert_same_gradients(cached["params"], plain["params"], lora_steps["init"]["params"], tokens)


@pytest.mark.numerics
def test_fsdp_shards_lora_like_its_kernel_and_equals_replicated(lora_steps):
    """A [in, r] and B [r, out] split on their wide dim (1/8 per device), their optimizer state
    alike; the frozen base FSDP-sharded too; the GradCache step equals the replicated one."""
    shardings = lora_steps["fsdp_shardings"]
    layer0 = shardings["params"]["encoder"]["layers"][0]
    assert layer0["query"]["lora_a"].spec == jax.sharding.PartitionSpec("data", None)
    assert layer0["intermediate"]["lora_b"].spec == jax.sharding.PartitionSpec(None, "data")
    assert "data" in shardings["frozen"]["encoder"]["layers"][0]["intermediate"]["kernel"].spec
    a = lora_steps["fsdp_placed"]["params"]["encoder"]["layers"][0]["query"]["lora_a"]
    assert a.addressable_shards[0].data.shape == (a.shape[0] // 8, a.shape[1])
    (fsdp, m_fsdp), (cached, m_cached) = lora_steps["fsdp"], lora_steps["gradcache"]
    tokens = lora_steps["tokens"]
    np.testing.assert_allclose(
        m_fsdp["grad_norm"], m_cached["grad_norm"], rtol=reorder_rtol(tokens)
    )
    _assert_same_gradients(fsdp["params"], cached["params"], lora_steps["init"]["params"], tokens)


@pytest.mark.numerics
def test_lora_per_step_gather_reduces_each_factor_gradient_once(lora_steps):
    """sharding.gather_params=per_step with LoRA: the frozen base gathered whole once, the
    per-device backward, each LoRA factor's gradient reduce-scattered once per step (not once
    per chunk and role: 4 chunks x 2 roles); the step equals the replicated GradCache one."""
    (once, m_once), (cached, m_cached) = lora_steps["fsdp_once"], lora_steps["gradcache"]
    tokens = lora_steps["tokens"]
    np.testing.assert_allclose(
        m_once["grad_norm"], m_cached["grad_norm"], rtol=reorder_rtol(tokens)
    )
    _assert_same_gradients(once["params"], cached["params"], lora_steps["init"]["params"], tokens)
    init = lora_steps["init"]
    factors = collections.Counter(tuple(x.shape) for x in jax.tree.leaves(init["params"]))
    reduced: collections.Counter = collections.Counter()
    for op in plan_cost.collective_ops(lora_steps["hlo"][0]):
        if op.kind in ("all-reduce", "reduce-scatter"):
            for shape in op.operand_shapes:  # a reduce-scatter's operand: the unreduced gradient
                if shape in factors:
                    reduced[shape] += op.runs
    assert reduced == factors


# --------------------------------------------------------------------------------------------------
# `gte-jax train` with LoRA: resume, export, PEFT
# --------------------------------------------------------------------------------------------------

LORA_FLAGS = (
    "--config.model.lora.enabled=true",
    "--config.model.lora.rank=4",
    "--config.model.lora.alpha=8",
    "--config.model.lora.dropout=0.1",
    "--config.train.learning_rate=1e-2",
)
TEXTS = ["In the beginning God created the heaven and the earth.", "", "naïve café ☕ " * 5]


def _train(tiny_model_dir, workdir, *extra):
    from test_train import _env, _train_cmd, run_train

    return run_train(_train_cmd(tiny_model_dir, workdir, *LORA_FLAGS, *extra), _env(2), workdir)


@pytest.fixture(scope="module")
def lora_workdir(tiny_model_dir, tmp_path_factory):
    """8 steps of LoRA fine-tuning (dropout on), exported."""
    workdir = tmp_path_factory.mktemp("lora_run")
    summary = _train(tiny_model_dir, workdir, "--config.export.enabled=true")
    assert summary["steps"] == 8 and summary["completed"]
    return workdir


def _saved(workdir):
    from test_train import _final_state

    return _final_state(workdir)


@pytest.mark.slow
def test_lora_run_resumes_bitwise_after_a_restart(tiny_model_dir, tmp_path, lora_workdir):
    """4 steps, a new process, 4 more (constant rate: the 4-step run's schedule is the 8-step
    one's): the same A, B, Adam moments and step as 8 steps in one go."""
    workdir = tmp_path / "restarted"
    assert _train(tiny_model_dir, workdir, "--config.train.num_steps=4")["steps"] == 4
    summary = _train(tiny_model_dir, workdir)
    assert summary["resumed_from_step"] == 4 and summary["completed"]
    (step_a, a), (step_b, b) = _saved(lora_workdir), _saved(workdir)
    assert step_a == step_b == 8
    assert set(a) == {"params", "opt_state", "step", "rng"}  # the frozen base is not saved
    assert all(p.endswith(("/lora_a", "/lora_b")) for p in _paths(a["params"]))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _bf16_rounded_copy(model_dir, out):
    """``model_dir`` with every float tensor rounded to bfloat16 and stored as float32 again."""
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    shutil.copytree(model_dir, out)
    for file in out.rglob("*.safetensors"):
        tensors = load_file(file)
        rounded = {
            k: v.astype(ml_dtypes.bfloat16).astype(np.float32) if v.dtype == np.float32 else v
            for k, v in tensors.items()
        }
        save_file(rounded, file, metadata={"format": "pt"})
    return out


def test_bfloat16_frozen_base_trains_as_its_float32_rounding(tiny_model_dir, tmp_path):
    """model.lora.base_dtype=bfloat16 stores the frozen tower in bfloat16 (read straight to it).
    Compute promotes it to float32 exactly, so the run must equal a float32 run on a copy of the
    model whose weights were rounded to bfloat16 beforehand: the same values in every product,
    hence the same factors and Adam moments to the bit. A base left in float32 (the key ignored)
    differs from that reference by the rounding (~2^-9 relative), far above any reordering."""
    rounded = _bf16_rounded_copy(tiny_model_dir, tmp_path / "rounded")
    # bitwise equality of two runs, not dropout: its random bits are ~1/3 of a compile
    steps = (
        "--config.train.num_steps=3",
        "--config.model.dropout=0",
        "--config.model.lora.dropout=0",
    )
    bf16 = _train(
        tiny_model_dir, tmp_path / "bf16", *steps, "--config.model.lora.base_dtype=bfloat16"
    )
    ref = _train(rounded, tmp_path / "ref", *steps)
    assert bf16["steps"] == ref["steps"] == 3
    (_, a), (_, b) = _saved(tmp_path / "bf16"), _saved(tmp_path / "ref")
    assert jax.tree.structure(a) == jax.tree.structure(b)
    moved = 0
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        moved += 1
    assert moved


def test_resume_on_other_base_weights_is_refused(tiny_model_dir, tmp_path, lora_workdir):
    """Checkpoints hold the LoRA factors only: resuming a finished LoRA run with more steps on a
    base whose weights changed exits 2 before any step, naming the fingerprint file; the same
    base resumes (the fixture run finished 8 steps on it)."""
    from test_train import _env, _train_cmd

    from gte_jax import hf

    other = tmp_path / "other_base"
    model, tokenizer, info = hf.load_pretrained(tiny_model_dir)
    leaf = model.encoder.layers[0].query.kernel
    leaf.value = leaf.value + 1.0
    hf.export_pretrained(model, tokenizer, other, info=info)
    workdir = tmp_path / "run"
    shutil.copytree(lora_workdir, workdir)
    out = subprocess.run(
        _train_cmd(other, workdir, *LORA_FLAGS, "--config.train.num_steps=9"),
        env=_env(2),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "frozen_base.sha256" in out.stderr and "other base weights" in out.stderr
    assert _saved(workdir)[0] == 8  # nothing trained
    fp = (workdir / "frozen_base.sha256").read_text().strip()
    assert fp == (lora_workdir / "frozen_base.sha256").read_text().strip()


def _our_lora_embeddings(workdir):
    """Our LoRA forward (unmerged) on the trained factors, rebuilt by hand from the workdir."""
    from gte_jax import hf
    from gte_jax.encode import Embedder

    model, tokenizer, _ = hf.load_pretrained(workdir / "base_model")
    base = Embedder(model, tokenizer).encode(TEXTS)
    cfg = lora.LoRAConfig.from_json((workdir / "lora.json").read_text())
    assert (cfg.rank, cfg.alpha, cfg.dropout) == (4, 8.0, 0.1)
    lora.inject(model, cfg, rngs=nnx.Rngs(0))
    model_fn, params = ModelFn.from_module(model)
    _, frozen = model_fn.split_params(params)
    _, state = _saved(workdir)
    trained = model_fn.module(model_fn.join_params(state["params"], frozen))
    assert lora.has_lora(trained)
    ours = Embedder(trained, tokenizer).encode(TEXTS)
    assert np.abs(ours - base).max() > 1e-3  # the training moved the embeddings
    return ours, tokenizer


def _agree(a, b):
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() >= 0.99999, cos
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_merged_export_in_sentence_transformers_equals_our_lora_forward(lora_workdir):
    from sentence_transformers import SentenceTransformer

    from gte_jax import workdir as wd
    from gte_jax.encode import Embedder

    ours, tokenizer = _our_lora_embeddings(lora_workdir)
    export = lora_workdir / "export"
    st = SentenceTransformer(str(export), device="cpu").encode(TEXTS, convert_to_numpy=True)
    _agree(st, ours)
    # The next stage's starting point (a workdir as model spec): the merged, plain model.
    merged, tok, _ = wd.load_model(str(lora_workdir))
    assert not lora.has_lora(merged)
    _agree(Embedder(merged, tok).encode(TEXTS), ours)


def test_peft_adapter_on_the_base_model_equals_our_lora_forward(lora_workdir):
    """`peft` loads the exported adapter on transformers' base BertModel; mean pooling and L2
    normalisation by hand in torch (what the export's sentence-transformers modules say)."""
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModel

    ours, tokenizer = _our_lora_embeddings(lora_workdir)
    adapter = lora_workdir / "export" / "lora_adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert "encoder.layer.1.attention.output.dense" in config["target_modules"]
    base = AutoModel.from_pretrained(str(lora_workdir / "base_model"))
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state  # [batch, length, embed]
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    theirs = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    _agree(theirs, ours)
    with torch.no_grad():  # the check can fail: without the adapter, the base model's embeddings
        plain = AutoModel.from_pretrained(str(lora_workdir / "base_model"))(**enc).last_hidden_state
    plain = torch.nn.functional.normalize((plain * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert np.abs(plain - ours).max() > 1e-3


def test_cli_refuses_an_unknown_lora_target_with_exit_2(tiny_model_dir, tmp_path, capsys):
    from gte_jax.cli import main

    rc = main(["train", "--config", "configs/finetune.py", "--workdir", str(tmp_path),
               f"--config.model.init_from={tiny_model_dir}", "--config.model.lora.enabled=true",
               "--config.model.lora.target_modules=query,qkv"])  # fmt: skip
    assert rc == 2
    assert "qkv" in capsys.readouterr().err


def test_plan_compiles_a_lora_step_whose_optimizer_holds_the_factors_only(tmp_path, capsys):
    """`gte-jax plan` builds the step as training does: LoRA injected, the base frozen."""
    pytest.importorskip("libtpu")
    from conftest import TINY_BERT
    from test_plan import TINY_CONFIG, _run

    from gte_jax import plan

    (tmp_path / "tiny.py").write_text(TINY_CONFIG)
    (tmp_path / "config.json").write_text(json.dumps(TINY_BERT))
    rc, out, err = _run(
        ["--config", str(tmp_path / "tiny.py"), "--topology", "v5e:2x2",
         "--model-config", str(tmp_path / "config.json"), "--config.model.lora.enabled=true",
         "--config.model.lora.rank=4", "--config.sharding.params=fsdp"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["fits"]
    # Per layer: q, k, v, o (32 -> 32), intermediate (32 -> 64), output (64 -> 32); x 2 layers.
    per_layer = 4 * (32 + 32) + (32 + 64) + (64 + 32)
    assert report["trainable_parameters"] == 2 * 4 * per_layer
    assert report["parameters"] > 100 * report["trainable_parameters"]
    # FLOPs: the frozen base has no weight gradient (4 x per token, not 6).
    trained, frozen = {"a": jnp.zeros((3, 5))}, {"w": jnp.zeros((7, 2))}
    flops = plan.model_flops(trained, 2, 8, [(4, 10)], frozen=frozen)
    assert flops == 4 * 10 * (6 * 15 + 4 * 14 + 12 * 2 * 10 * 8)


@functools.partial(jax.jit, static_argnums=0)
def _tower(graphdef, state, ids, mask, key):
    return nnx.merge(graphdef, state)(ids, mask, dropout_rng=key)  # [batch, length, embed]


def test_lora_on_a_decoder_tower_matches_peft_and_its_merged_export(tmp_path):
    """Qwen2 (QKV bias, GQA): q/k/v/o/gate/up/down projections get LoRA; the PEFT adapter on
    transformers' base model and the merged export give our LoRA hidden states; LoRA dropout keys
    reach the decoder's layers (HF decoders have no dropout of their own)."""
    peft = pytest.importorskip("peft")
    import torch
    from tiny_models import tiny_decoder_dir
    from transformers import AutoModel

    from gte_jax import hf

    path = tiny_decoder_dir(tmp_path, "qwen2")
    model, tokenizer, info = hf.load_pretrained(path)
    enc = tokenizer(["hello world", "in the beginning god created the heaven"], padding=True)
    ids, mask = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])
    base = _tower(*nnx.split(model.encoder), ids, mask, None)
    paths = lora.inject(model, lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.2), rngs=nnx.Rngs(0))
    assert {p.rsplit("/", 1)[1] for p in paths} == set(lora.LORA_TARGETS["decoder"])
    assert len(paths) == 7 * model.config.num_hidden_layers
    np.testing.assert_allclose(_tower(*nnx.split(model.encoder), ids, mask, None), base, atol=1e-6)
    _randomise_b(model)
    graphdef, state = nnx.split(model.encoder)
    ours = np.asarray(_tower(graphdef, state, ids, mask, None))
    dropped = np.asarray(_tower(graphdef, state, ids, mask, jax.random.key(0)))
    real = np.asarray(mask, bool)[..., None]
    assert np.abs(np.where(real, ours - np.asarray(base), 0)).max() > 1e-2
    assert np.abs(np.where(real, dropped - ours, 0)).max() > 1e-3  # LoRA dropout is drawn

    adapter = hf.export_lora_adapter(model, tmp_path / "adapter")
    hf.export_pretrained(model, tokenizer, tmp_path / "merged", info=info)
    torch_in = {k: torch.tensor(v) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        with_peft = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(path), str(adapter))
        merged = AutoModel.from_pretrained(tmp_path / "merged")
        for theirs in (with_peft.eval()(**torch_in), merged.eval()(**torch_in)):
            diff = np.where(real, theirs.last_hidden_state.numpy() - ours, 0)
            assert np.abs(diff).max() <= 1e-5


@pytest.mark.slow
def test_decoder_lora_gradcache_remat_packing_on_8_devices_equals_1(tmp_path):
    """A tiny Qwen2 through `gte-jax train`: LoRA, GradCache (2 chunks), per-layer remat, packed
    rows, EOS appended; 8 fake devices give 1 device's A and B (dropout off: with dropout the
    packed layout, and so the masks, depend on the data devices; docs/design.md)."""
    from test_train import REPO, _env
    from tiny_models import tiny_decoder_dir

    from gte_jax.data.pipeline import DEMO_DIR

    model_dir = tiny_decoder_dir(tmp_path, "qwen2")
    states = []
    for devices in (1, 8):
        workdir = tmp_path / f"run{devices}"
        cmd = [
            sys.executable, "-m", "gte_jax.cli", "train",
            "--config", str(REPO / "configs" / "finetune.py"), "--workdir", str(workdir),
            f"--config.model.init_from={model_dir}",
            f"--config.data.train_files={DEMO_DIR / 'bible_finetune.jsonl'}",
            "--config.data.query_max_length=32", "--config.data.doc_max_length=32",
            "--config.train.batch_size=16", "--config.train.num_steps=3",
            "--config.train.learning_rate=1e-2", "--config.train.warmup_ratio=0",
            "--config.train.gradcache=true", "--config.train.gradcache_chunk_size=8",
            "--config.model.remat=true", "--config.model.train_dropout=false",
            "--config.model.append_eos=true", "--config.model.lora.enabled=true",
            "--config.model.lora.rank=4", "--config.train.progress_bar=false",
            # float32: the sums-in-another-order bound below; bf16 (finetune.py's auto on an AMX
            # CPU) rounds those differences to bf16 steps.
            "--config.model.dtype=float32",
            "--config.export.enabled=false", "--log_level=WARNING",
        ]  # fmt: skip
        out = subprocess.run(cmd, env=_env(devices), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        states.append(_saved(workdir)[1]["params"])
    one, eight = states
    assert all(p.endswith(("/lora_a", "/lora_b")) for p in _paths(one))
    # Measured: <= 1.3e-6 apart (float32 sums in another order), the largest factor ~0.19.
    _assert_params_close(eight, one, atol=1e-5)
    b = [x for p, x in jax.tree_util.tree_flatten_with_path(one)[0] if "lora_b" in str(p)]
    assert min(float(np.abs(x).max()) for x in b) > 1e-3  # every B moved off zero
