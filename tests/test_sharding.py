"""Data-parallel training on a mesh gives the single-device numbers: 8 fake devices, 2 processes.

Run as a script (``python tests/test_sharding.py worker ...``) this file is also the worker of the
two-process test.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gte_jax import losses, sharding

N, K, FEATURES, DIM = 16, 2, 10, 6


def make_problem(seed: int = 0):
    """A linear 'encoder' (features @ W, L2-normalised) and a batch with negatives, dups, padding."""
    rs = np.random.RandomState(seed)
    params = {"w": rs.randn(FEATURES, DIM).astype(np.float32), "b": np.zeros(DIM, np.float32)}
    batch = {
        "query_x": rs.randn(N, FEATURES).astype(np.float32),
        "doc_x": rs.randn(N, FEATURES).astype(np.float32),
        "neg_x": rs.randn(N, K, FEATURES).astype(np.float32),
        "query_text_id": np.arange(N, dtype=np.int32),
        "doc_text_id": N + np.arange(N, dtype=np.int32),
        "neg_text_id": (2 * N + np.arange(N * K, dtype=np.int32)).reshape(N, K),
        "valid": (np.arange(N) < N - 1).astype(np.int32),
    }
    batch["doc_text_id"][7] = batch["doc_text_id"][2]
    batch["neg_text_id"][9, 1] = batch["query_text_id"][12]
    return params, batch


def embed(params, x):
    e = x @ params["w"] + params["b"]  # [..., DIM]
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def loss_fn(params, batch, loss_impl=losses.gte_loss):
    return loss_impl(
        embed(params, batch["query_x"]),
        embed(params, batch["doc_x"]),
        neg=embed(params, batch["neg_x"]),
        q_ids=batch["query_text_id"],
        d_ids=batch["doc_text_id"],
        neg_ids=batch["neg_text_id"],
        valid=batch["valid"],
        temperature=0.05,
    )


OPTIMIZER = optax.adamw(1e-2, weight_decay=0.1)


def train_step(params, opt_state, batch):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads


def two_steps(params, batch, step):
    opt_state = OPTIMIZER.init(params)
    params, opt_state, loss, grads = step(params, opt_state, batch)
    params, opt_state, loss2, _ = step(params, opt_state, batch)
    return params, loss, loss2, grads


def single_device_reference():
    params, batch = make_problem()
    out = two_steps(params, batch, jax.jit(train_step))
    return jax.tree.map(np.asarray, out)


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = max(1.0, float(np.abs(np.asarray(y)).max()))
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol * scale)


def test_make_mesh_shapes_and_errors():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 8, "model": 1}
    assert dict(sharding.make_mesh(model=2).shape) == {"data": 4, "model": 2}
    assert dict(sharding.make_mesh(2, 1, jax.devices()[:2]).shape) == {"data": 2, "model": 1}
    for bad in (dict(data=3), dict(model=3)):
        try:
            sharding.make_mesh(**bad)
        except ValueError:
            continue
        raise AssertionError(f"make_mesh({bad}) should raise")
    layout = sharding.BatchLayout.of_mesh(mesh)
    assert layout.blocks == tuple(range(8)) and layout.rows(64).tolist() == list(range(64))


def test_data_parallel_step_on_8_devices_equals_1_device():
    ref_params, ref_loss, ref_loss2, ref_grads = single_device_reference()
    for model in (1, 2):
        mesh = sharding.make_mesh(model=model)
        params, batch = make_problem()
        g_batch = sharding.global_batch(batch, mesh)
        g_params = sharding.shard_params(params, mesh)
        assert g_batch["neg_x"].sharding.spec == jax.P("data")
        assert g_batch["neg_x"].addressable_shards[0].data.shape == (N // (8 // model), K, FEATURES)
        step = jax.jit(train_step, out_shardings=sharding.replicated(mesh))
        new_params, loss, loss2, grads = two_steps(g_params, g_batch, step)
        assert new_params["w"].sharding.is_fully_replicated
        assert_close((loss, loss2), (ref_loss, ref_loss2))
        assert_close(grads, ref_grads)
        assert_close(new_params, ref_params)
        assert float(loss2) < float(loss)


@pytest.mark.parametrize("name,kwargs", [("gte", {}), ("infonce", {"symmetric": True})])
def test_shard_map_loss_equals_global_loss(name, kwargs):
    mesh = sharding.make_mesh(model=2)
    params, batch = make_problem(1)

    def global_impl(q, d, **kw):
        return losses.contrastive_loss(name, q, d, **kwargs, **kw)

    def sharded_impl(q, d, **kw):
        return losses.sharded_contrastive_loss(name, mesh, q, d, **kwargs, **kw)

    def value_and_grad(impl):
        return jax.jit(jax.value_and_grad(functools.partial(loss_fn, loss_impl=impl), has_aux=True))

    (loss, metrics), grads = value_and_grad(global_impl)(params, batch)
    (s_loss, s_metrics), s_grads = value_and_grad(sharded_impl)(
        params, sharding.global_batch(batch, mesh)
    )
    assert_close(s_loss, loss)
    assert_close(s_metrics, metrics)
    assert_close(s_grads, grads)


def test_initialize_distributed_is_a_noop_for_one_process(monkeypatch):
    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "SLURM_JOB_ID",
        "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_COORDINATOR_ADDRESS",
        "OMPI_COMM_WORLD_SIZE",
    ):
        monkeypatch.delenv(var, raising=False)
    assert sharding.initialize_distributed() is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    assert sharding.initialize_distributed() is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    try:
        sharding.initialize_distributed()
    except ValueError as err:
        assert "coordinator_address" in str(err)
    else:
        raise AssertionError("two processes without a coordinator should raise")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_feed_their_slices_and_match_one_process(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(
        JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2"
    )
    env["PYTHONPATH"] = os.pathsep.join(
        [str(pathlib.Path(__file__).parents[1]), env.get("PYTHONPATH", "")]
    )
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", str(tmp_path)],
            env={**env, "JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(out.decode(errors="replace")[-3000:])
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(logs)

    info = json.loads((tmp_path / "info.json").read_text())
    assert info == {"process_count": 2, "devices": 4, "slices": [[0, N // 2], [N // 2, N]]}
    got = np.load(tmp_path / "result.npz")
    ref_params, ref_loss, ref_loss2, ref_grads = single_device_reference()
    assert_close((got["loss"], got["loss2"]), (ref_loss, ref_loss2))
    assert_close({"b": got["grad_b"], "w": got["grad_w"]}, ref_grads)
    assert_close({"b": got["b"], "w": got["w"]}, ref_params)


def _worker(out_dir: str) -> None:
    jax.config.update("jax_num_cpu_devices", 2)
    assert sharding.initialize_distributed()  # from the JAX_* env vars
    from jax.experimental import multihost_utils

    mesh = sharding.make_mesh()
    params, batch = make_problem()
    rows = sharding.BatchLayout.of_mesh(mesh).rows(N)
    slices = multihost_utils.process_allgather(np.array([rows[0], rows[-1] + 1]))
    local = {k: v[rows] for k, v in batch.items()}
    g_batch = sharding.global_batch(local, mesh)
    assert g_batch["query_x"].shape == (N, FEATURES)
    step = jax.jit(train_step, out_shardings=sharding.replicated(mesh))
    new_params, loss, loss2, grads = two_steps(sharding.shard_params(params, mesh), g_batch, step)

    def host(x):  # replicated: this process's first shard is the whole value
        return np.asarray(x.addressable_data(0))

    if jax.process_index() == 0:
        out = pathlib.Path(out_dir)
        np.savez(
            out / "result.npz", loss=host(loss), loss2=host(loss2), w=host(new_params["w"]),
            b=host(new_params["b"]), grad_w=host(grads["w"]), grad_b=host(grads["b"]),
        )  # fmt: skip
        info = {"process_count": jax.process_count(), "devices": len(jax.devices()),
                "slices": np.asarray(slices).tolist()}  # fmt: skip
        (out / "info.json").write_text(json.dumps(info))
    jax.distributed.shutdown()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2])
