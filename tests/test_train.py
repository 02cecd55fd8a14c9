"""The training loop with the real (tiny) BERT: mesh invariance, GradCache equality, exact resume
after SIGKILL, two processes == one, NaN handling, CLI errors."""

from __future__ import annotations

import json
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from conftest import child_env

from gte_jax import sharding as shd
from gte_jax import train
from gte_jax.checkpoint import Checkpointer
from gte_jax.data.pipeline import DEMO_DIR, build_iterator, build_sources, default_data_config

REPO = pathlib.Path(__file__).resolve().parents[1]
FINETUNE_FILE = DEMO_DIR / "bible_finetune.jsonl"  # triples: one hard negative per query
SGD_LR = 0.1


def _iterator(tokenizer, batch_size=16):
    data = default_data_config()
    data.train_files = str(FINETUNE_FILE)
    data.batch_size = batch_size
    data.query_max_length = 32
    data.doc_max_length = 32
    return build_iterator(data, tokenizer=tokenizer, sources=build_sources(data))


def _setup(tiny_model_dir, lr=SGD_LR):
    """Plain SGD at a constant rate: every update is -lr x the gradient, so the params after a step
    carry the gradient itself, scale included. (AdamW divides by the gradient's running RMS and
    global-norm clipping rescales it: either would let a gradient x8 pass as equal params.)"""
    from gte_jax import hf

    model, tokenizer, _ = hf.load_pretrained(tiny_model_dir)
    model_fn, params = train.ModelFn.from_module(model)
    tx = optax.sgd(lr)
    state = train.init_train_state(params, tx, seed=0)
    return model_fn, tx, state, tokenizer


def _run_steps(mesh, model_fn, tx, state, batches, **step_kwargs):
    step = jax.jit(
        train.make_train_step(
            model_fn,
            tx,
            loss_name="gte",
            loss_kwargs={"temperature": 0.05},
            mesh=mesh,
            **step_kwargs,
        )
    )
    state = shd.shard_params(jax.device_get(state), mesh)
    metrics = []
    for b in batches:
        state, m = step(state, shd.global_batch(b, mesh))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


def _moved_in_tolerances(new, old, rtol, atol):
    """How far the params moved, in units of the comparison's tolerance (largest element): above 1,
    a comparison with that tolerance tells an update from no update (or from a x8 gradient)."""
    return max(
        float((np.abs(np.asarray(x) - np.asarray(y)) / (atol + rtol * np.abs(np.asarray(y)))).max())
        for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True)
    )


def _assert_trees_close(a, b, rtol, atol):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


def test_8_device_mesh_equals_1_device_with_dropout_and_negatives(tiny_model_dir):
    assert len(jax.devices()) == 8
    model_fn, tx, state, tok = _setup(tiny_model_dir)
    it = _iterator(tok)
    batches = [next(it) for _ in range(2)]
    assert batches[0]["neg_input_ids"].shape[:2] == (16, 1)
    one = shd.make_mesh(devices=jax.devices()[:1])
    eight = shd.make_mesh()
    s1, m1 = _run_steps(one, model_fn, tx, state, batches)
    s8, m8 = _run_steps(eight, model_fn, tx, state, batches)
    for a, b in zip(m1, m8, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    _assert_trees_close(s1["params"], s8["params"], rtol=1e-4, atol=1e-6)
    # SGD moved the params far beyond that tolerance: the comparison above is not between two
    # copies of the init, and a gradient off by any factor would fail it.
    assert _moved_in_tolerances(s1["params"], state["params"], rtol=1e-4, atol=1e-6) > 100


def test_gradcache_step_equals_plain_step(tiny_model_dir):
    model_fn, tx, state, tok = _setup(tiny_model_dir)
    batches = [next(_iterator(tok))]
    mesh = shd.make_mesh()
    plain, mp = _run_steps(mesh, model_fn, tx, state, batches, num_chunks=2, gradcache=False)
    cached, mc = _run_steps(mesh, model_fn, tx, state, batches, num_chunks=2, gradcache=True)
    np.testing.assert_allclose(mp[0]["loss"], mc[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(mp[0]["grad_norm"], mc[0]["grad_norm"], rtol=1e-5)
    _assert_trees_close(plain["params"], cached["params"], rtol=1e-5, atol=1e-7)
    # One SGD step at a nonzero rate: params = init - lr x gradient, moved far beyond the tolerance.
    assert _moved_in_tolerances(plain["params"], state["params"], rtol=1e-5, atol=1e-7) > 100


# ----------------------------------------------------------------------------- CLI runs


# The CLI persists XLA executables (gte_jax.cli) in the session's cache (conftest): the processes
# of one run, a rerun and a restart after a kill reuse them.


_env = child_env  # the name the other test modules import


def _train_cmd(tiny_model_dir, workdir, *extra):
    return [
        sys.executable,
        "-m",
        "gte_jax.cli",
        "train",
        "--config",
        str(REPO / "configs" / "finetune.py"),
        "--workdir",
        str(workdir),
        f"--config.model.init_from={tiny_model_dir}",
        f"--config.data.train_files={FINETUNE_FILE}",
        "--config.data.query_max_length=32",
        "--config.data.doc_max_length=32",
        "--config.train.batch_size=8",
        "--config.train.num_steps=8",
        "--config.train.learning_rate=1e-3",
        # A nonzero rate from step 1 (no warmup step at rate 0), and every step's loss and
        # gradient norm in logs/metrics.jsonl: AdamW + clipping would hide a gradient scale error
        # in the params, the logged grad_norm does not.
        "--config.train.warmup_ratio=0",
        "--config.train.schedule=constant",
        "--config.train.log_every=1",
        "--config.loss.name=gte",
        "--config.checkpoint.every_steps=1",
        "--config.train.progress_bar=false",
        "--config.export.enabled=false",
        "--log_level=WARNING",
        *extra,
    ]


def run_two_processes(tiny_model_dir, workdir, *extra: str) -> None:
    """`gte-jax train` as two jax.distributed processes (1 CPU device each) on 127.0.0.1."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            _train_cmd(
                tiny_model_dir,
                workdir,
                *extra,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]


def _final_state(workdir):
    ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", every_steps=0)
    step, state = ckpt.restore_unsharded()
    ckpt.close()
    return step, jax.device_get(state)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    out = subprocess.run(
        _train_cmd(tiny_model_dir, workdir),
        env=_env(2),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 8 and summary["examples"] == 64
    saved = json.loads((workdir / "summary.json").read_text())
    assert (
        np.isfinite(summary["smoothed_loss"]) and summary["smoothed_loss"] == saved["smoothed_loss"]
    )
    return workdir


def kill_and_resume(cmd, env, workdir, *, kills: int, seed: int, wait: float = 120) -> None:
    """Runs ``cmd`` (a `gte-jax train` into ``workdir``) until it completes, SIGKILLing it
    ``kills`` times at random moments, each once the run has written a new checkpoint since its
    last start (and while it is still running, so there is a next start to resume)."""
    rng = random.Random(seed)
    done = 0
    for _attempt in range(4 * kills + 1):
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        if done < kills:
            before, deadline = set(_steps(workdir)), time.monotonic() + wait
            while proc.poll() is None and time.monotonic() < deadline:
                if set(_steps(workdir)) - before:
                    # Anywhere within the next step or two (a warm step takes ~0.1-0.5 s here).
                    time.sleep(rng.uniform(0.0, 0.3))
                    break
                time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                done += 1
                continue
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        break
    assert done == kills


def run_train(cmd, env, workdir) -> dict:
    """`gte-jax train` in a child process; its summary.json."""
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((pathlib.Path(workdir) / "summary.json").read_text())


def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(
    tiny_model_dir, tmp_path, uninterrupted
):
    workdir = tmp_path / "killed"
    # A cache of its own: the session's (conftest) also holds the in-process tests' programs.
    cache = tmp_path / "xla"
    env = dict(_env(2), GTE_JAX_COMPILATION_CACHE=str(cache))
    kill_and_resume(_train_cmd(tiny_model_dir, workdir), env, workdir, kills=3, seed=1234)
    assert any(cache.iterdir())  # executables persisted for the restarts
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["completed"] and summary["resumed_from_step"] > 0
    step_a, a = _final_state(uninterrupted)
    step_b, b = _final_state(workdir)
    assert step_a == step_b == 8
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _steps(workdir):
    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    if not ckpt_dir.exists():
        return []
    return [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tiny_model_dir, tmp_path, uninterrupted):
    """The uninterrupted run used one process with 2 devices; here 2 processes x 1 device each
    read their own half of every global batch."""
    run_two_processes(tiny_model_dir, tmp_path / "two")
    step_a, a = _final_state(uninterrupted)
    step_b, b = _final_state(tmp_path / "two")
    assert step_a == step_b == 8
    # Per step, the global loss and the global gradient norm (before clipping): a gradient summed
    # instead of averaged over processes, or taken from one process's half, changes grad_norm.
    log_a, log_b = _train_log(uninterrupted), _train_log(tmp_path / "two")
    assert sorted(log_a) == sorted(log_b) == list(range(1, 9))
    for step in range(1, 9):
        for key in ("train/loss", "train/grad_norm"):
            np.testing.assert_allclose(
                log_b[step][key], log_a[step][key], rtol=1e-4, err_msg=f"{key} at step {step}"
            )
    _assert_trees_close(a["params"], b["params"], rtol=1e-4, atol=1e-6)
    init = _initial_params(uninterrupted)
    assert _moved_in_tolerances(a["params"], init, rtol=1e-4, atol=1e-6) > 100


def _train_log(workdir) -> dict[int, dict]:
    rows = [json.loads(x) for x in (pathlib.Path(workdir) / "logs" / "metrics.jsonl").open()]
    return {r["step"]: r for r in rows if "train/grad_norm" in r}


def _initial_params(workdir):
    from gte_jax import hf

    model, _, _ = hf.load_pretrained(pathlib.Path(workdir) / "base_model")
    return jax.device_get(train.ModelFn.from_module(model)[1])


def test_nonfinite_loss_skips_updates_then_stops_with_advice(tiny_model_dir, tmp_path):
    out = subprocess.run(
        _train_cmd(
            tiny_model_dir,
            tmp_path / "nan",
            # An absurd step size: after the first real update the activations overflow, so the
            # loss is NaN on every later step (a skipped update leaves the params as they were).
            "--config.train.learning_rate=1e30",
            "--config.train.schedule=linear",  # a decaying rate: skipped steps must not move it
            "--config.train.log_every=1",
            "--config.train.max_consecutive_nonfinite=3",
        ),
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "NaN/Inf for 3 steps in a row" in out.stderr
    assert "learning_rate" in out.stderr
    # The logged learning rate is the one the update used: skipped steps do not advance optax's
    # schedule, so it is schedule(updates applied before this step), not schedule(step - 1).
    rows = [
        json.loads(line)
        for line in (tmp_path / "nan" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    finite = [r["train/finite"] for r in rows]
    assert finite[-3:] == [0.0, 0.0, 0.0] and 1.0 in finite
    from gte_jax.config import load_config

    cmd = _train_cmd(
        tiny_model_dir,
        tmp_path / "nan",
        "--config.train.learning_rate=1e30",
        "--config.train.schedule=linear",
    )
    cfg = load_config(
        REPO / "configs" / "finetune.py", [a for a in cmd if a.startswith("--config.")]
    )
    _, schedule = train.make_optimizer(cfg.train, total_steps=8)
    applied = 0
    for r in rows:
        assert r["train/learning_rate"] == pytest.approx(float(schedule(applied)), rel=1e-6)
        applied += int(r["train/finite"])
    assert rows[-1]["train/learning_rate"] != pytest.approx(float(schedule(rows[-1]["step"] - 1)))


def test_cli_rejects_unknown_override_and_missing_model(tiny_model_dir, tmp_path):
    from gte_jax.cli import main

    assert main(["train", "--config", str(REPO / "configs/finetune.py"), "--workdir",
                 str(tmp_path), "--config.train.no_such_field=1"]) == 2  # fmt: skip
    rc = main(["train", "--config", str(REPO / "configs/finetune.py"), "--workdir",
               str(tmp_path), "--config.model.init_from=/nonexistent/model",
               f"--config.data.train_files={FINETUNE_FILE}"])  # fmt: skip
    assert rc == 2


def test_export_cli_writes_what_sentence_transformers_loads(uninterrupted, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    from gte_jax import hf
    from gte_jax.cli import main
    from gte_jax.encode import Embedder

    out = tmp_path / "exported"
    assert main(["export", "--workdir", str(uninterrupted), "--output", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 8  # the newest checkpoint, by number
    # Reference: the trained params straight from the checkpoint, in our own model.
    model, tokenizer, _ = hf.load_pretrained(uninterrupted / "base_model")
    model_fn, _ = train.ModelFn.from_module(model)
    _, state = _final_state(uninterrupted)
    trained = Embedder(model_fn.module(state["params"]), tokenizer)
    texts = ["In the beginning God created the heaven and the earth.", "", "naïve café ☕"]
    ours = trained.encode(texts)
    st = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(st, ours, atol=1e-5)
    base = Embedder(model, tokenizer).encode(texts)
    assert np.abs(base - ours).max() > 1e-3  # the export carries the training, not the init

    assert main(["export", "--workdir", str(tmp_path / "nothing"), "--output", str(out)]) == 2
