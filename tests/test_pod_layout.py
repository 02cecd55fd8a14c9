"""The batch follows the mesh on multi-host TPU layouts, proven on CPU processes.

On every multi-host TPU slice the training mesh (``jax.make_mesh``: a ring through the physical
torus) puts a host's chips at scattered places of the ``"data"`` axis (libtpu's topology
descriptions: v4-32 hosts 0,1,2,3,0,1,2,3,...; v5litepod-64 0,0,4,4,8,8,12,12,0,...). These tests
take those device->host maps from libtpu itself and check that

- each host's rows (:class:`BatchLayout`) are exactly its devices' blocks, and all hosts together
  cover the global batch once (in-process, for the real topologies, up to 64 hosts);
- 16 simulated hosts of a v5litepod-64 (threads) tokenise and pack exactly the batch one process
  does, block for block;
- real ``jax.distributed`` CPU processes whose global device order is the topology's
  (``mesh.simulate_topology``) train, are preempted (SIGTERM to one host: all stop at one step),
  resume, and end equal to one process with the same number of data devices (the tolerances of
  the existing two-process test).
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from simulated import process_tokenizer, run_processes
from test_train import (
    _assert_trees_close,
    _env,
    _final_state,
    _free_port,
    _steps,
    _train_cmd,
    _train_log,
)

from gte_jax import sharding as shd
from gte_jax import train

pytest.importorskip("libtpu")
plan = pytest.importorskip("gte_jax.plan")

TOPOLOGIES = ("v5p-16", "v4-32", "v5litepod-16", "v5litepod-64", "v5litepod-256", "v5p-128")


def _topology_mesh(name: str, **mesh):
    from ml_collections import ConfigDict

    cfg = ConfigDict({"data": -1, "model": 1, "slices": 1, "simulate_topology": "", **mesh})
    topo = plan.parse_topology(name)
    return shd.training_mesh(cfg, plan.topology_devices(topo, int(cfg.slices)))


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_pod_layout_rows_are_each_hosts_own_devices_blocks(name):
    mesh = _topology_mesh(name)
    data = mesh.shape["data"]
    batch = 4 * data
    layouts = shd.process_layouts(mesh)
    hosts = {d.process_index for d in mesh.devices.flat}
    assert set(layouts) == hosts and len(hosts) > 1
    order = [d.process_index for d in mesh.devices[:, 0]]
    # The property that made train refuse to start: no host holds one contiguous block.
    assert sum(a != b for a, b in zip(order, order[1:], strict=False)) >= len(hosts)
    seen = np.zeros(batch, dtype=int)
    for p, layout in layouts.items():
        # Independently: the data-axis index of every device of host p, from the mesh array.
        own = sorted(i for i, d in enumerate(mesh.devices[:, 0]) if d.process_index == p)
        assert list(layout.blocks) == own
        rows = layout.rows(batch)
        assert rows.tolist() == [4 * b + j for b in own for j in range(4)]
        seen[rows] += 1
    assert (seen == 1).all()  # every row of the global batch is fed by exactly one host
    assert shd.layout_problems(mesh, [batch]) == []
    assert shd.layout_problems(mesh, [batch + 1])  # a batch that does not split is refused


def test_pod_layout_multislice_spans_slices_slice_major():
    mesh = _topology_mesh("v5e:4x4", slices=2)
    assert dict(mesh.shape) == {"data": 32, "model": 1}
    slices = [d.slice_index for d in mesh.devices[:, 0]]
    assert slices == [0] * 16 + [1] * 16  # DCN only between the two halves of the data axis
    layouts = shd.process_layouts(mesh)
    assert len(layouts) == 8 and all(lay.groups == 4 for lay in layouts.values())


def test_pod_layout_v5litepod_64_sixteen_hosts_feed_the_one_process_batch(tokenizer):
    """16 simulated hosts (threads) with v5litepod-64's layout: each tokenises and packs only its
    own blocks; put back at their places, the blocks are the batch one process builds with the
    same 64 data blocks (padded and packed)."""
    from test_packing import _iterator

    mesh = _topology_mesh("v5litepod-64")
    layouts = shd.process_layouts(mesh)
    assert len(layouts) == 16
    for packing in (False, True):
        single = _iterator(
            tokenizer, global_batch_size=64, packing=packing,
            layout=shd.BatchLayout(tuple(range(64)), 64),
        )  # fmt: skip
        want = [next(single) for _ in range(2)]

        def host(p, agree, packing=packing):
            it = _iterator(
                process_tokenizer(tokenizer), global_batch_size=64, packing=packing, layout=layouts[p],
                process_index=p, process_count=16, agree_lengths=agree,
            )  # fmt: skip
            return [next(it) for _ in range(2)]

        got = run_processes(host, n=16)
        for step in range(2):
            for key, value in want[step].items():
                per = value.shape[0] // 64
                rebuilt = np.empty_like(value)
                for p, layout in layouts.items():
                    local = got[p][step][key]
                    for i, b in enumerate(layout.blocks):
                        rebuilt[b * per : (b + 1) * per] = local[i * per : (i + 1) * per]
                np.testing.assert_array_equal(rebuilt, value, err_msg=f"{key} step {step}")


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from gte_jax import hf

    return hf.load_tokenizer(minilm_dir)


# ------------------------------------------------------------------------------------------------
# Real jax.distributed processes with the topology's device order

STEPS = 3  # each 2-process step is ~9 s on 2 cores (4 gloo ranks per process): the CI budget


def _cmd(tiny_model_dir, workdir, batch, *extra):
    # Adam with eps = 1 (and a larger rate): an update linear in the gradient. With 8 or 16 data
    # devices the pod's all-reduce sums in its own device order, so gradients differ from one
    # process's by float32 reduction-order rounding (a few ulps); Adam's default eps turns that
    # into O(1) relative changes of the update wherever a gradient is near 0 (m / sqrt(v) ~ the
    # sign), which no tolerance derived from the rounding would bound. Linear updates keep each
    # parameter's difference within lr x steps x the gradients' rounding. float32 compute: in
    # bf16 (what model.dtype=auto picks on some CPUs) the reduction-order difference is bf16's.
    return _train_cmd(
        tiny_model_dir, workdir, f"--config.train.batch_size={batch}",
        f"--config.train.num_steps={STEPS}", "--config.train.adam_eps=1.0",
        "--config.train.learning_rate=0.1", "--config.model.dtype=float32", *extra,
    )  # fmt: skip


def _start(tiny_model_dir, workdir, batch, topology, processes, devices, port):
    return [
        subprocess.Popen(
            _cmd(
                tiny_model_dir,
                workdir,
                batch,
                f"--config.mesh.simulate_topology={topology}",
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={processes}",
                f"--process_id={i}",
            ),
            env=_env(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(processes)
    ]


def _pod_run_preempted_then_resumed(tiny_model_dir, workdir, batch, topology, processes, devices):
    """The run on ``processes`` x ``devices`` with ``topology``'s device order, SIGTERM to the
    last process once a checkpoint exists: every process stops at the same step (exit 3), the
    rerun resumes and finishes. Returns the step it stopped at."""
    procs = _start(tiny_model_dir, workdir, batch, topology, processes, devices, _free_port())
    deadline = time.monotonic() + 500
    while not _steps(workdir) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs]
        time.sleep(0.05)
    procs[-1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=500) for p in procs]
    codes = [p.returncode for p in procs]
    stopped = max(_steps(workdir))
    if codes != [3] * processes:  # the run ended before the notice was acted on
        assert codes == [0] * processes, [e[-3000:] for _, e in outs]
        pytest.fail(f"the run finished before SIGTERM took effect (stopped at {stopped})")
    for _, err in outs:
        assert f"at step {stopped}; rerun" in err, err[-3000:]  # all stopped at the same step
    assert 0 < stopped < STEPS
    procs = _start(tiny_model_dir, workdir, batch, topology, processes, devices, _free_port())
    outs = [p.communicate(timeout=500) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    summary = json.loads((pathlib.Path(workdir) / "summary.json").read_text())
    assert summary["completed"] and summary["resumed_from_step"] == stopped
    assert summary["steps"] == STEPS
    return stopped


def _one_process(tiny_model_dir, workdir, batch, devices):
    out = subprocess.run(
        _cmd(tiny_model_dir, workdir, batch), env=_env(devices), capture_output=True, text=True,
        timeout=500,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def _assert_equal_runs(one, pod):
    step_a, a = _final_state(one)
    step_b, b = _final_state(pod)
    assert step_a == step_b == STEPS
    log_a, log_b = _train_log(one), _train_log(pod)
    assert sorted(log_a) == sorted(log_b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("train/loss", "train/grad_norm"):
            np.testing.assert_allclose(
                log_b[step][key], log_a[step][key], rtol=1e-4, err_msg=f"{key} at step {step}"
            )
    _assert_trees_close(a["params"], b["params"], rtol=1e-4, atol=1e-6)
    moved = [
        not np.allclose(x, y, rtol=1e-4, atol=1e-6)
        for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(_initial(one)), strict=True)
    ]
    assert sum(moved) > len(moved) // 2  # the runs trained: equality is not of two no-ops


def _initial(workdir):
    from gte_jax import hf

    model, _, _ = hf.load_pretrained(pathlib.Path(workdir) / "base_model")
    return jax.device_get(train.ModelFn.from_module(model)[1])


# One topology of real processes: v5p-16's 2 hosts already sit at interleaved places of the data
# axis (the in-process test above asserts it for every topology, v4-32's 4 hosts included), so
# the multi-process run exercises the non-contiguous feeding, stop and resume code. Not run with
# real processes: more than two hosts agreeing on the stop step (a 4-host v4-32 run, 4 processes
# twice, cost ~240 s of CI); 16 hosts' feeding is checked with threads
# (test_pod_layout_v5litepod_64_sixteen_hosts_feed_the_one_process_batch).
@pytest.mark.parametrize(
    "topology,processes,devices,batch", [("v5p-16", 2, 4, 16)], ids=["v5p-16_2_hosts"]
)
def test_pod_layout_processes_train_preempt_resume_and_equal_one_process(
    tiny_model_dir, tmp_path, topology, processes, devices, batch
):
    one = _one_process(tiny_model_dir, tmp_path / "one", batch, processes * devices)
    pod = tmp_path / "pod"
    _pod_run_preempted_then_resumed(tiny_model_dir, pod, batch, topology, processes, devices)
    _assert_equal_runs(one, pod)
