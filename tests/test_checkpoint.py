"""Checkpoints: exact round trip of state + data state, shardings kept, damaged steps skipped."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gte_jax.checkpoint import Checkpointer, CheckpointError, abstract_like


def _state(seed: int, mesh):
    rng = np.random.default_rng(seed)
    rep = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P("data"))
    return {
        "params": {"w": jax.device_put(rng.normal(size=(8, 4)).astype(np.float32), rep)},
        "opt": {"mu": jax.device_put(rng.normal(size=(16, 3)).astype(np.float32), sharded)},
        "step": jax.device_put(np.int32(seed), rep),
        "rng": jax.device_put(np.asarray(jax.random.PRNGKey(seed)), rep),
    }


@pytest.fixture
def mesh():
    return jax.make_mesh((len(jax.devices()),), ("data",))


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.sharding.is_equivalent_to(y.sharding, x.ndim)


def test_round_trip_keeps_values_shardings_and_data_state(tmp_path, mesh):
    ckpt = Checkpointer(tmp_path / "ckpt", every_steps=2)
    assert ckpt.restore(abstract_like(_state(0, mesh))) is None
    assert not ckpt.save(1, _state(1, mesh), {"cursor": 1})  # not due
    for step in (2, 4):
        assert ckpt.save(step, _state(step, mesh), {"cursor": step, "epochs": [0, step]})
    ckpt.wait()
    step, state, data = ckpt.restore(abstract_like(_state(0, mesh)))
    assert step == 4 and data == {"cursor": 4, "epochs": [0, 4]}
    _assert_equal(state, _state(4, mesh))
    step, state, data = ckpt.restore(abstract_like(_state(0, mesh)), step=2)
    _assert_equal(state, _state(2, mesh))
    # Unsharded: on one device, or in host memory (a later stage places a big model per shard).
    for host in (False, True):
        step, state = ckpt.restore_unsharded(host=host)
        assert step == 4
        for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(_state(4, mesh)), strict=True):
            assert isinstance(x, np.ndarray) == host
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ckpt.close()


def test_damaged_latest_step_falls_back_to_previous(tmp_path, mesh, caplog):
    ckpt = Checkpointer(tmp_path / "ckpt", every_steps=1)
    for step in (1, 2):
        ckpt.save(step, _state(step, mesh), {"cursor": step})
    ckpt.close()
    # Damage every data file of step 2's state (a truncated copy / bit rot).
    damaged = 0
    for f in (tmp_path / "ckpt" / "2" / "state").rglob("*"):
        if f.is_file() and not f.name.startswith("_"):
            f.write_bytes(b"garbage")
            damaged += 1
    assert damaged
    ckpt = Checkpointer(tmp_path / "ckpt", every_steps=1)
    with caplog.at_level(logging.WARNING):
        step, state, data = ckpt.restore(abstract_like(_state(0, mesh)))
    ckpt.close()
    assert step == 1 and data == {"cursor": 1}
    _assert_equal(state, _state(1, mesh))
    assert "unreadable" in caplog.text and "/2" in caplog.text


def test_all_damaged_raises_with_instructions(tmp_path, mesh):
    ckpt = Checkpointer(tmp_path / "ckpt", every_steps=1)
    ckpt.save(1, _state(1, mesh), {"cursor": 1})
    ckpt.close()
    for f in (tmp_path / "ckpt" / "1" / "state").rglob("*"):
        if f.is_file() and not f.name.startswith("_"):
            f.write_bytes(b"garbage")
    ckpt = Checkpointer(tmp_path / "ckpt", every_steps=1)
    with pytest.raises(CheckpointError, match="fresh --workdir"):
        ckpt.restore(abstract_like(_state(0, mesh)))
    ckpt.close()


def test_relative_directory_works(tmp_path, mesh, monkeypatch):
    """`gte-jax train --workdir runs/demo`: orbax needs absolute paths, the Checkpointer makes them."""
    monkeypatch.chdir(tmp_path)
    ckpt = Checkpointer("runs/demo/checkpoints", every_steps=1)
    ckpt.save(1, _state(1, mesh), {"cursor": 1})
    ckpt.close()
    assert (tmp_path / "runs" / "demo" / "checkpoints" / "1").is_dir()
    ckpt = Checkpointer("runs/demo/checkpoints", every_steps=1)
    step, state, _ = ckpt.restore(abstract_like(_state(0, mesh)))
    ckpt.close()
    assert step == 1
    _assert_equal(state, _state(1, mesh))
