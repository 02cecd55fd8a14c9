"""The libtpu flags every gte-jax TPU program runs with (gte_jax/tpu_flags.py): set once by the
CLI for train and plan alike, the user's own value kept, never a flag the installed libtpu does
not know (libtpu refuses to start on one); and what the default flag changes in a program
compiled for a 64-chip slice (libtpu, no TPU needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from gte_jax import cli, tpu_flags

FLAG = "xla_tpu_prefer_async_allgather_to_allreduce"


@pytest.fixture()
def library(tmp_path):
    """A stand-in library whose bytes name the default flags (and one that names none)."""
    knows = tmp_path / "knows.so"
    knows.write_bytes(b"\0junk\0" + b"\0".join(n.encode() for n in tpu_flags.DEFAULT_FLAGS))
    blank = tmp_path / "blank.so"
    blank.write_bytes(b"\0nothing here\0")
    return knows, blank


def test_defaults_are_appended_and_a_users_value_is_kept(library):
    knows, _ = library
    env = {"LIBTPU_INIT_ARGS": "--xla_other=1"}
    added = tpu_flags.apply(env, knows)
    assert added == [f"--{n}={v}" for n, v in tpu_flags.DEFAULT_FLAGS.items()]
    assert env["LIBTPU_INIT_ARGS"].split() == ["--xla_other=1", *added]
    assert tpu_flags.apply(env, knows) == []  # idempotent
    mine = {"LIBTPU_INIT_ARGS": f"--{FLAG}=false"}
    assert tpu_flags.apply(mine, knows) == []
    assert mine["LIBTPU_INIT_ARGS"] == f"--{FLAG}=false"


def test_a_flag_the_library_does_not_name_is_not_added_and_the_opt_out_adds_none(library):
    knows, blank = library
    env: dict[str, str] = {}
    assert tpu_flags.apply(env, blank) == [] and "LIBTPU_INIT_ARGS" not in env
    empty = blank.with_name("empty.so")
    empty.write_bytes(b"")  # a truncated install: no flag added, no crash at every command
    assert (
        tpu_flags.apply(env, empty) == [] and tpu_flags.apply(env, blank.with_name("no.so")) == []
    )
    env = {"GTE_JAX_LIBTPU_DEFAULTS": "0"}
    assert tpu_flags.apply(env, knows) == [] and "LIBTPU_INIT_ARGS" not in env


@pytest.mark.parametrize("command", ["train", "plan"])
def test_the_cli_sets_the_flags_before_the_command_runs(command, monkeypatch):
    """train and plan (and every other command) start with the same LIBTPU_INIT_ARGS."""
    pytest.importorskip("libtpu")
    monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)
    monkeypatch.delenv("GTE_JAX_LIBTPU_DEFAULTS", raising=False)
    seen = {}
    fake = types.SimpleNamespace(main=lambda rest: seen.update(args=os.environ["LIBTPU_INIT_ARGS"]))
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: fake)
    monkeypatch.setattr(cli, "_enable_compilation_cache", lambda: None)
    assert cli.main([command, "--config", "x.py"]) == 0
    assert f"--{FLAG}=true" in seen["args"].split()


_GATHER = """
import json, re, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from gte_jax import plan_cost
from gte_jax.topologies import parse_topology, topology_devices
devices = topology_devices(parse_topology("v5litepod-64"), 1)
mesh = Mesh(np.array(devices), ("data",))
w = jax.ShapeDtypeStruct((768, 768), jnp.float32, sharding=NamedSharding(mesh, P("data")))
x = jax.ShapeDtypeStruct((256, 768), jnp.float32, sharding=NamedSharding(mesh, P("data")))
whole = lambda w, x: x @ jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))
hlo = jax.jit(whole).lower(w, x).compile().as_text()
print(json.dumps(sorted({op.kind for op in plan_cost.collective_ops(hlo)})))
"""


@pytest.mark.parametrize("value,kind", [("true", "all-gather"), ("false", "all-reduce")])
def test_the_default_flag_keeps_an_fsdp_weight_gather_a_gather_on_64_chips(value, kind):
    """A [768, 768] kernel split over 64 chips and gathered whole (FSDP's per-step gather):
    XLA:TPU writes it as an all-reduce of a zero-padded copy (twice the ring bytes) unless the
    flag is on. Each case in its own process: libtpu reads its flags once, at start-up."""
    pytest.importorskip("libtpu")
    env = {**os.environ, "LIBTPU_INIT_ARGS": f"--{FLAG}={value}", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", _GATHER], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [kind]
