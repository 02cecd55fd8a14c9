"""`launch/slurm_gpu.sbatch --cpu` under a real one-node Slurm cluster started by the test.

The cluster (munged + slurmctld + slurmd, everything in a temp dir) comes from
`launch/local_slurm.py`; Slurm is apt-installed first when missing (root + apt-get; otherwise the
tests skip and say why). A 2-task job runs `gte-jax train` as two jax.distributed processes that
find each other from Slurm's environment; its params equal a 1-process run of the same config,
and a job cancelled mid-run resumes from its checkpoint when submitted again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import child_cache_env, child_env, child_xla_flags

from gte_jax.checkpoint import Checkpointer
from gte_jax.data.pipeline import DEMO_DIR

REPO = pathlib.Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm_gpu.sbatch"
FINETUNE_FILE = DEMO_DIR / "bible_finetune.jsonl"

_spec = importlib.util.spec_from_file_location("local_slurm", REPO / "launch" / "local_slurm.py")
local_slurm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_slurm)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    try:
        seconds = local_slurm.ensure_installed(log=lambda m: print(m, file=sys.stderr))
    except local_slurm.SlurmUnavailable as e:
        pytest.skip(f"no Slurm on this machine: {e}")
    if seconds:
        print(f"slurm installed in {seconds:.1f}s", file=sys.stderr)
    cluster = local_slurm.LocalSlurmCluster(tmp_path_factory.mktemp("slurm"), kill_wait=30)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        leftovers = cluster.leftover_pids()
        assert not leftovers, f"processes left running: {leftovers}"


def _overrides(tiny_model_dir, num_steps):
    return [
        f"--config.model.init_from={tiny_model_dir}",
        f"--config.data.train_files={FINETUNE_FILE}",
        "--config.data.query_max_length=32",
        "--config.data.doc_max_length=32",
        "--config.train.batch_size=8",
        f"--config.train.num_steps={num_steps}",
        "--config.train.learning_rate=1e-3",
        "--config.loss.name=gte",
        "--config.checkpoint.every_steps=1",
        "--config.train.progress_bar=false",
        "--config.export.enabled=false",
        "--log_level=INFO",
    ]


def _job_env(cluster, workdir) -> dict[str, str]:
    env = {k: v for k, v in cluster.env.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(
        CONFIG=str(REPO / "configs" / "finetune.py"),
        WORKDIR=str(workdir),
        **child_cache_env(),
        XLA_FLAGS=child_xla_flags(1),  # one device per job process, the session's level
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        # `gte-jax` from this interpreter's environment, activated or not.
        PATH=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
    )
    return env


def _submit(cluster, workdir, tiny_model_dir, num_steps, *sbatch_args) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
         "--gpus-per-node=0", "--time=10", f"--output={workdir}.job-%j.out", *sbatch_args,
         str(SBATCH), "--cpu", *_overrides(tiny_model_dir, num_steps)],
        cwd=REPO, env=_job_env(cluster, workdir), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _job_state(cluster, job_id) -> str:
    out = cluster.run("scontrol", "show", "job", "-o", job_id)
    return next(w for w in out.split() if w.startswith("JobState=")).split("=", 1)[1]


def _wait_job(cluster, job_id, timeout=300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _job_state(cluster, job_id)
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {state} after {timeout}s\n{cluster.logs()}")


def _job_log(workdir, job_id) -> str:
    return pathlib.Path(f"{workdir}.job-{job_id}.out").read_text(errors="replace")


def _steps(workdir) -> list[int]:
    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    if not ckpt_dir.exists():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def _final_params(workdir):
    ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", every_steps=0)
    step, state = ckpt.restore_unsharded()
    ckpt.close()
    return step, jax.device_get(state["params"])


def _assert_params_close(a, b):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )


NUM_STEPS = 8


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """The same config in one process with 2 CPU devices, outside Slurm."""
    workdir = tmp_path_factory.mktemp("one_process")
    env = child_env(2, drop=("SLURM_",))  # the jobs' backend optimisation level (_job_env)
    out = subprocess.run(
        [sys.executable, "-m", "gte_jax.cli", "train", "--config",
         str(REPO / "configs" / "finetune.py"), "--workdir", str(workdir),
         *_overrides(tiny_model_dir, NUM_STEPS)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def _assert_two_slurm_processes(log: str) -> None:
    """Two processes, set up from Slurm's environment (no --process_id etc. on the command
    line)."""
    assert "gte-jax: 2 processes on 1 nodes" in log
    assert log.count("of 2, coordinator") == log.count("(from SlurmCluster)") == 2, log[-4000:]


# One job cancelled mid-run and submitted again (rather than also an uninterrupted job: each job
# is two processes starting jax): the resubmitted job is a 2-task job set up from Slurm's
# environment that runs to the end, and its params equal the 1-process run's, which is all that
# an uninterrupted job showed.
def test_slurm_cluster_scancel_mid_run_then_resubmit_resumes(
    slurm_cluster, tiny_model_dir, tmp_path, one_process
):
    workdir = tmp_path / "slurm_cancelled"
    job = _submit(slurm_cluster, workdir, tiny_model_dir, NUM_STEPS)
    deadline = time.monotonic() + 300
    # Once a checkpoint exists, the training loop (and its SIGTERM handler) is running.
    while not _steps(workdir) and time.monotonic() < deadline:
        state = _job_state(slurm_cluster, job)
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), _job_log(workdir, job)[-4000:]
        time.sleep(0.05)
    slurm_cluster.run("scancel", job)  # Slurm: SIGTERM to every task, SIGKILL after KillWait
    state = _wait_job(slurm_cluster, job)
    log = _job_log(workdir, job)
    assert state == "CANCELLED", f"{state}: the run ended before scancel\n{log[-4000:]}"
    assert "stopped by SIGTERM at step" in log, log[-4000:]
    _assert_two_slurm_processes(log)
    stopped_at = max(_steps(workdir))
    assert 0 < stopped_at < NUM_STEPS, _steps(workdir)
    assert not (workdir / "summary.json").exists() or not json.loads(
        (workdir / "summary.json").read_text()
    ).get("completed")

    again = _submit(slurm_cluster, workdir, tiny_model_dir, NUM_STEPS)
    state = _wait_job(slurm_cluster, again)
    log = _job_log(workdir, again)
    assert state == "COMPLETED", f"{state}\n{log[-4000:]}\n{slurm_cluster.logs()}"
    _assert_two_slurm_processes(log)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["completed"] and summary["resumed_from_step"] == stopped_at, summary
    # The whole run counted (the summary of a resumed run: tests/test_run_failures.py).
    assert summary["steps"] == NUM_STEPS and summary["examples"] == 8 * NUM_STEPS
    step_a, a = _final_params(one_process)
    step_b, b = _final_params(workdir)
    assert step_a == step_b == NUM_STEPS
    _assert_params_close(a, b)
