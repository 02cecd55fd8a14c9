"""Ctrl-C during training: a checkpoint at the next step, one line, exit 130; the rerun resumes
and the summary counts the whole run."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from test_train import _env, _steps, _train_cmd


def test_ctrl_c_saves_a_checkpoint_exits_130_with_one_line_then_resumes(tiny_model_dir, tmp_path):
    workdir = tmp_path / "run"
    # No periodic checkpoint before step 40 (rather than one every step, 40 saves per run): the
    # checkpoint of the step it stopped at can only be the one Ctrl-C asked for. No dropout: signals
    # are what is checked, and dropout's random bits are ~1/3 of the step's compile.
    cmd = _train_cmd(
        tiny_model_dir, workdir, "--config.train.num_steps=40",
        "--config.checkpoint.every_steps=40", "--config.model.dropout=0",
    )  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    # Once a step is logged (log_every=1), the training loop and its SIGINT handler run.
    while not _logged(workdir) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert not _steps(workdir)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.startswith("gte-jax train:")]
    assert len(last) == 1 and "interrupted (Ctrl-C) at step" in last[0], err[-3000:]
    stopped = int(last[0].split("at step ")[1].split(":")[0])
    assert max(_steps(workdir)) == stopped < 40  # the checkpoint of the step it stopped at
    assert json.loads(out.strip().splitlines()[-1])["steps"] == stopped  # the stage's line

    again = subprocess.run(cmd, env=_env(2), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["completed"] and summary["resumed_from_step"] == stopped
    assert summary["steps"] == 40 and summary["examples"] == 40 * 8


def _logged(workdir) -> bool:
    log = workdir / "logs" / "metrics.jsonl"
    return log.exists() and '"train/loss"' in log.read_text()
