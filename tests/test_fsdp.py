"""Sharded parameters and optimizer state (``sharding.params``): FSDP (and FSDP + tensor
parallelism) give the replicated numbers on 8 fake devices, hold 1/8 of the state per device,
restore across shardings, and 2 processes with FSDP equal 1."""

from __future__ import annotations

import json
import subprocess

import jax
import ml_collections
import numpy as np
import pytest
from test_train import _env, _final_state, _iterator, _train_cmd, run_two_processes

from gte_jax import sharding as shd
from gte_jax import train
from gte_jax.checkpoint import Checkpointer, abstract_like
from gte_jax.training import state as training_state

# Parameters after two AdamW updates agree to 1e-6 (absolute, float32). Gradients agree to 1e-5
# of each leaf's largest entry: sharded weights change how XLA splits the matmuls, so float32
# sums run in another order (measured: <= 2.1e-6 of the scale; the worst is the token-type
# embedding, whose gradient sums the gradients of all 1024 tokens of the batch), plus 1e-9: the
# key biases' gradient is zero in exact arithmetic (softmax ignores a shift shared by all keys),
# so what both runs hold there is roundoff, ~1e-12.
PARAM_TOL, GRAD_REL_TOL, GRAD_ATOL = 1e-6, 1e-5, 1e-9


def _setup(tiny_model_dir):
    from gte_jax import hf

    model, tokenizer, _ = hf.load_pretrained(tiny_model_dir)
    model_fn, params = train.ModelFn.from_module(model)
    # Constant LR from the first step (no warmup) and no clipping: the compared updates are real
    # and Adam's first moment after one step is exactly (1 - b1) * gradient. adam_eps = 1e-3
    # (gradients here are ~1e-2): the update lr * m / (sqrt(v) + eps) then scales with the
    # gradient, so a gradient-scale error shows in the params; with eps = 1e-6 Adam would hide
    # it and amplify roundoff of near-zero gradients by lr / eps = 1e3.
    tcfg = ml_collections.ConfigDict(
        {"learning_rate": 1e-3, "warmup_steps": 0, "warmup_ratio": 0.0, "schedule": "constant",
         "max_grad_norm": 0.0, "adam_eps": 1e-3}
    )  # fmt: skip
    tx, schedule = train.make_optimizer(tcfg, total_steps=10)
    state = jax.device_get(train.init_train_state(params, tx, seed=0))
    return model_fn, tx, schedule, state, tokenizer


def _placed(state, mesh, mode):
    shardings = shd.state_shardings(state, mesh, mode)
    return shd.place(state, shardings), shardings


def _adam(state):
    """optax's ScaleByAdamState (count, mu, nu) inside the train state's optimizer state."""
    found = []

    def visit(node):
        if hasattr(node, "mu") and hasattr(node, "nu"):
            found.append(node)
        elif isinstance(node, tuple):
            for child in node:
                visit(child)

    visit(state["opt_state"])
    (adam,) = found
    return adam


def _max_abs(tree) -> float:
    return max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(tree))


def _close(a, b, *, atol=0.0, rel=0.0):
    """|a - b| <= atol + rel * max|b| for each leaf."""
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        x, y = np.asarray(x), np.asarray(y)
        bound = atol + rel * float(np.abs(y).max(initial=0.0))
        np.testing.assert_allclose(x, y, rtol=0, atol=bound, err_msg=jax.tree_util.keystr(path))


# No plain-step "fsdp" case of its own (it cost two train-step compiles): the "fsdp" mode is
# "fsdp_gradcache_blocked"'s, the plain (non-GradCache) step on sharded weights is "fsdp_tp"'s
# (fsdp's data-axis split plus the model axis), and the plain step under "fsdp" alone runs in
# test_two_processes_with_fsdp_equal_one_process (the `gte-jax train` default).
VARIANTS = {
    # GradCache in 2 chunks and the loss scored in row blocks of 4 (16 rows: 4 blocks).
    "fsdp_gradcache_blocked": dict(mesh_model=1, gradcache=True, num_chunks=2, block_size=4),
    "fsdp_tp": dict(mesh_model=2, gradcache=False, num_chunks=1, block_size=None),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sharded_step_equals_replicated_step(tiny_model_dir, variant):
    v = VARIANTS[variant]
    mode = variant.split("_gradcache")[0]
    model_fn, tx, schedule, host_state, tok = _setup(tiny_model_dir)
    it = _iterator(tok)
    batches = [next(it) for _ in range(2)]
    mesh = shd.make_mesh(model=v["mesh_model"])
    loss_kwargs = {"temperature": 0.05}
    if v["block_size"]:
        loss_kwargs["block_size"] = v["block_size"]
    step_fn = train.make_train_step(
        model_fn, tx, loss_name="gte", loss_kwargs=loss_kwargs, num_chunks=v["num_chunks"],
        gradcache=v["gradcache"], mesh=mesh, schedule=schedule,
    )  # fmt: skip
    out = {}
    for m in ("replicate", mode):
        state, shardings = _placed(host_state, mesh, m)
        step = jax.jit(step_fn, out_shardings=(shardings, None))
        state, m1 = step(state, shd.global_batch(batches[0], mesh))
        # Dropout on; no clipping: Adam's mu after the first update is (1 - b1) * gradient.
        grads = jax.tree.map(lambda mu: mu / (1 - 0.9), jax.device_get(_adam(state).mu))
        state, m2 = step(state, shd.global_batch(batches[1], mesh))
        assert jax.tree.map(lambda x: x.sharding, state) == shardings  # kept by the step
        out[m] = grads, jax.device_get(state), jax.device_get((m1, m2))
    placed, _ = _placed(host_state, mesh, mode)
    assert not placed["params"]["encoder"]["layers"][0]["intermediate"][
        "kernel"
    ].sharding.is_fully_replicated

    (g_r, s_r, m_r), (g_s, s_s, m_s) = out["replicate"], out[mode]
    for a, b in zip(m_s, m_r, strict=True):
        assert b["learning_rate"] == pytest.approx(1e-3)  # a real update at both steps
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-6)
    _close(g_s, g_r, atol=GRAD_ATOL, rel=GRAD_REL_TOL)
    _close(s_s["params"], s_r["params"], atol=PARAM_TOL)
    _close(_adam(s_s).nu, _adam(s_r).nu, atol=GRAD_ATOL**2, rel=2 * GRAD_REL_TOL)
    # Not vacuous: the gradients are not zero and two updates moved the parameters.
    assert _max_abs(g_r) > 1e-2
    moved = jax.tree.map(lambda a, b: a - b, s_r["params"], host_state["params"])
    assert _max_abs(moved) > 5e-4


def test_fsdp_holds_an_eighth_of_every_matrix_per_device(tiny_model_dir):
    _, tx, _, host_state, _ = _setup(tiny_model_dir)
    mesh = shd.make_mesh()
    state, shardings = _placed(host_state, mesh, "fsdp")
    # The same shardings from abstract values (what an AOT compile for a TPU topology passes).
    abstract = jax.eval_shape(lambda s: s, host_state)
    assert shd.state_shardings(abstract, mesh, "fsdp") == shardings

    params, adam = state["params"], _adam(state)
    total = per_device = 0
    for tree in (params, adam.mu, adam.nu):
        for x in jax.tree.leaves(tree):
            shard = x.addressable_shards[0].data.nbytes
            total, per_device = total + x.nbytes, per_device + shard
            if x.ndim >= 2:  # matrices (every one of the tiny model has a dim divisible by 8)
                assert shard * 8 == x.nbytes, (x.shape, x.sharding.spec)
            else:  # vectors stay replicated: a collective each would cost more than they weigh
                assert shard == x.nbytes
    assert per_device / total < 0.13  # 1/8 = 0.125, plus the replicated vectors
    # Adam's moments live where their parameter lives.
    for p, mu, nu in zip(*map(jax.tree.leaves, (params, adam.mu, adam.nu)), strict=True):
        assert p.sharding == mu.sharding == nu.sharding
    assert state["step"].sharding.is_fully_replicated and adam.count.sharding.is_fully_replicated
    # What in-training eval evaluates: the full values, on one local device.
    local = shd.local_copy(params)
    for x, y in zip(jax.tree.leaves(local), jax.tree.leaves(host_state["params"]), strict=True):
        assert len(x.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(x), y)
    # The largest divisible dim: [vocab 30522 (not divisible by 8), 32] -> split on 32.
    word = params["encoder"]["embeddings"]["word_embeddings"]["embedding"]
    assert word.sharding.spec == jax.P(None, "data")
    ffn = params["encoder"]["layers"][0]["intermediate"]["kernel"]  # [32, 64]
    assert ffn.sharding.spec == jax.P(None, "data")
    # A user rule wins over the mode and reaches the moments too.
    cfg = ml_collections.ConfigDict({"params": "fsdp", "rules": (("word_embeddings", ()),)})
    ruled = shd.state_shardings(abstract, mesh, cfg)
    assert ruled["params"]["encoder"]["embeddings"]["word_embeddings"]["embedding"].spec == jax.P()
    assert _adam(ruled).mu["encoder"]["embeddings"]["word_embeddings"]["embedding"].spec == jax.P()
    bad = ml_collections.ConfigDict({"params": "fsdp", "rules": (("word_emb", ("data",)),)})
    with pytest.raises(ValueError, match="sharding.rules"):
        shd.state_shardings(abstract, mesh, bad)  # 30522 rows do not split over 8
    with pytest.raises(ValueError, match="sharding.params"):
        shd.state_shardings(abstract, mesh, "zero3")


@pytest.mark.parametrize("save_mode,restore_mode", [("replicate", "fsdp"), ("fsdp", "replicate")])
def test_checkpoint_restores_across_shardings(tiny_model_dir, tmp_path, save_mode, restore_mode):
    _, _, _, host_state, _ = _setup(tiny_model_dir)
    mesh = shd.make_mesh()
    saved, _ = _placed(host_state, mesh, save_mode)
    ckpt = Checkpointer(tmp_path, every_steps=1, async_save=False)
    ckpt.save(1, saved, {"pos": 3}, force=True)
    ckpt.wait()
    target, shardings = _placed(jax.tree.map(np.zeros_like, host_state), mesh, restore_mode)
    step, state, data = ckpt.restore(abstract_like(target))
    ckpt.close()
    assert step == 1 and data == {"pos": 3}
    assert jax.tree.map(lambda x: x.sharding, state) == shardings
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(host_state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_check_config_allows_the_model_axis_only_with_tensor_parallelism():
    from gte_jax.defaults import stage_config

    config = stage_config()
    config.mesh.model = 2
    mesh = shd.make_mesh(model=2)
    with pytest.raises(train.TrainingError, match="fsdp_tp"):
        train.check_config(config, mesh)
    config.sharding.params = "fsdp_tp"
    assert train.check_config(config, mesh) == 1
    config.sharding.params = "zero3"
    with pytest.raises(train.TrainingError, match="sharding.params"):
        train.check_config(config, mesh)


def test_two_processes_with_fsdp_equal_one_process(tiny_model_dir, tmp_path):
    """`gte-jax train --config.sharding.params=fsdp`: 1 process x 2 devices vs 2 processes x 1
    device (each holds half of every matrix), packed batches, dropout on, 4 steps."""
    fsdp = ("--config.sharding.params=fsdp", "--config.train.num_steps=4")
    one = subprocess.run(
        _train_cmd(tiny_model_dir, tmp_path / "one", *fsdp),
        env=_env(2),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads(one.stdout.strip().splitlines()[-1])["steps"] == 4
    run_two_processes(tiny_model_dir, tmp_path / "two", *fsdp)
    step_a, a = _final_state(tmp_path / "one")
    step_b, b = _final_state(tmp_path / "two")
    assert step_a == step_b == 4
    _close(b["params"], a["params"], atol=PARAM_TOL)
    _close(b["opt_state"], a["opt_state"], atol=PARAM_TOL)


def test_training_state_is_built_on_its_shards(tiny_model_dir, monkeypatch):
    """A 7B model must start on chips that cannot hold it whole: ``train.initial_state`` takes
    host (NumPy) parameters straight to their FSDP shards and makes the Adam moments with a
    jitted init, so no device ever holds a whole matrix; the values equal the one-device init."""
    import gc

    from gte_jax import hf

    model, _ = hf.load_model(tiny_model_dir, host=True)
    model_fn, params = train.ModelFn.from_module(model)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
    _, tx, _, host_state, _ = _setup(tiny_model_dir)
    mesh = shd.make_mesh()
    gc.collect()
    before = {id(x) for x in jax.live_arrays()}
    # The optimizer state is only ever made inside jit (traced: its output lands on its shards);
    # an eager init would build every Adam moment whole on one device first.
    eager = []
    real_init = train.init_train_state

    def spy(p, *args):
        eager.extend(not isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(p))
        return real_init(p, *args)

    monkeypatch.setattr(training_state, "init_train_state", spy)
    state = train.initial_state(params, tx, 0, mesh, "fsdp")
    assert eager and not any(eager)
    gc.collect()
    matrices = {x.shape for x in jax.tree.leaves(params) if x.ndim >= 2}
    for x in jax.live_arrays():
        if id(x) in before or x.shape not in matrices:
            continue
        # Every live array shaped like a weight matrix is split 8 ways: 1/8 per device.
        assert x.addressable_shards[0].data.nbytes * 8 == x.nbytes, (x.shape, x.sharding)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(host_state), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert state["params"]["encoder"]["layers"][0]["intermediate"]["kernel"].sharding.spec == (
        jax.P(None, "data")
    )
