"""What goes wrong around a run, not inside its math: settings outside their range are refused at
start-up with nothing written; a write that fails mid-way (full disk, kill) never leaves a workdir
that a rerun cannot finish; a resumed run's summary counts the whole run; a read-only, full or
unreachable workdir is one line and exit 2 (gte_jax/ranges.py, gte_jax/storage.py)."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from etils import epath

from gte_jax import storage, train
from gte_jax.data.pipeline import DEMO_DIR, SOURCE_DEFAULTS
from gte_jax.defaults import stage_config
from gte_jax.ranges import RANGES, Range, range_problems
from gte_jax.training import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
FINETUNE_FILE = DEMO_DIR / "bible_finetune.jsonl"


# ------------------------------------------------------------------ settings refused at start-up


def _numeric_schema_keys() -> dict[str, float]:
    """Every numeric key of a training stage's schema with its default (sources' fields as
    ``data.sources[].<field>``)."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{prefix}{key}"] = value

    walk(stage_config(), "")
    for key, value in SOURCE_DEFAULTS.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"data.sources[].{key}"] = value
    return out


def test_every_numeric_key_of_the_schema_has_a_range_that_admits_its_default():
    keys = _numeric_schema_keys()
    assert len(keys) > 40  # the walk found the schema (train, data, model.lora, sources, ...)
    missing = sorted(set(keys) - set(RANGES))
    assert not missing, f"numeric config keys without a range in gte_jax/ranges.py: {missing}"
    stale = sorted(set(RANGES) - set(keys))
    assert not stale, f"ranges for keys the schema does not have: {stale}"
    for key, default in keys.items():
        assert RANGES[key].admits(default), (key, default, RANGES[key].describe())
        assert RANGES[key].why, key


def _just_outside(rule: Range) -> list[float]:
    """Values on the wrong side of each finite bound (the bound itself where it is open)."""
    out = []
    if rule.low != -np.inf:
        below = rule.low if rule.low_open else rule.low - 1
        while below in rule.also:  # -1 as a sentinel: the next one below
            below -= 1
        out.append(below)
    if rule.high != np.inf:
        out.append(rule.high if rule.high_open else rule.high + 0.5)
    return out


def test_each_range_refuses_values_past_its_bounds_and_names_key_and_range():
    for key, rule in RANGES.items():
        bad = _just_outside(rule)
        assert bad, f"{key}: a range with no bound refuses nothing"
        for value in bad:
            assert not rule.admits(value), (key, value)
        assert not rule.admits(float("nan")), key
    config = stage_config()
    config.train.num_steps = -1
    config.data.sources = [{"path": "x.jsonl", "num_negatives": -2}]
    problems = range_problems(config)
    assert problems == [
        "data.sources[0].num_negatives=-2: must be -1 or >= 0 (-1: as many as the records have)",
        "train.num_steps=-1: must be >= 0 (0: derived from train.epochs)",
    ]


def _train_main(workdir, *overrides, model="/no/such/model"):
    from gte_jax.cli import main

    return main(["train", "--config", str(REPO / "configs" / "finetune.py"), "--workdir",
                 str(workdir), f"--config.model.init_from={model}",
                 f"--config.data.train_files={FINETUNE_FILE}", *overrides])  # fmt: skip


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.num_steps=-1", "train.num_steps=-1: must be >= 0"),
        ("train.learning_rate=-1e-5", "train.learning_rate=-1e-05: must be >= 0"),
        ("train.warmup_ratio=-0.1", "train.warmup_ratio=-0.1: must be in [0, 1]"),
        ("train.batch_size=0", "train.batch_size=0: must be >= 1"),
        ("train.epochs=-1", "train.epochs=-1.0: must be >= 0"),
        ("data.min_bucket=0", "data.min_bucket=0: must be >= 1"),
        ("checkpoint.max_to_keep=0", "checkpoint.max_to_keep=0: must be >= 1"),
        ("model.dropout=1.5", "model.dropout=1.5: must be -1 or in [0, 1)"),
        ("mesh.data=0", "mesh.data=0: must be -1 or >= 1"),
    ],
)
def test_out_of_range_setting_exits_2_with_one_line_and_writes_nothing(
    tmp_path, capsys, override, message
):
    workdir = tmp_path / "w"
    assert _train_main(workdir, f"--config.{override}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gte-jax train: error: this config cannot run: {message} (")
    assert len(err.splitlines()) == 1 and "/no/such/model" not in err
    assert not workdir.exists()


def test_a_later_stage_out_of_range_is_refused_before_the_first_stage_runs(tmp_path):
    config = ml_collections.ConfigDict()
    config.stages = ["pre", "ft"]
    config.pre = stage_config("pre")
    config.ft = stage_config("ft")
    config.ft.train.learning_rate = -1.0
    with pytest.raises(train.TrainingError, match=r"ft\.train\.learning_rate=-1\.0: must be >= 0"):
        loop.run(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------ runs that the disk stops


# A tiny run through the CLI (which also turns on the persistent XLA cache: a rerun recompiles
# nothing).
_TINY = [
    "--config.data.query_max_length=32", "--config.data.doc_max_length=32",
    "--config.train.batch_size=8", "--config.model.dtype=float32",
    "--config.train.progress_bar=false", "--config.checkpoint.every_steps=1",
    "--config.checkpoint.async_save=false", "--config.data.packing=false", "--log_level=WARNING",
    # what these tests are about is the workdir, not the step: without dropout's random bits the
    # tiny step on 8 devices compiles ~35 % faster (12.5 s against 18-20 s, loaded 2-core CPU)
    "--config.model.dropout=0",
]  # fmt: skip


class _FullDisk:
    """Makes the ``nth`` write of a file matching ``match(path)`` write half of its bytes, then
    raise ENOSPC, as a full disk does; every other write goes through. Whole-file writes
    (``write_bytes`` / ``write_text``) and streamed ones (``open("wb")``: the safetensors writer
    writes tensor by tensor) alike."""

    def __init__(self, monkeypatch, match, nth: int = 1):
        self.match, self.nth, self.seen, self.failed = match, nth, 0, None
        cls = type(epath.Path("/"))
        for name in ("write_bytes", "write_text"):
            monkeypatch.setattr(cls, name, self._wrap(getattr(cls, name)))
        monkeypatch.setattr(cls, "open", self._wrap_open(cls.open))

    def _wrap_open(self, real_open):
        disk = self

        class _Failing:
            """A file whose first write writes half of its bytes, then raises ENOSPC."""

            def __init__(self, f, path):
                self.f, self.path = f, path

            def write(self, data):
                data = memoryview(data).cast("B")
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self.path))

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()
                return False

            def __getattr__(self, name):
                return getattr(self.f, name)

        def open_(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            if "w" in mode and disk.failed is None and disk.match(path):
                disk.seen += 1
                if disk.seen == disk.nth:
                    disk.failed = path
                    return _Failing(f, path)
            return f

        return open_

    def _wrap(self, real):
        def write(path, data, *args, **kwargs):
            if self.failed is None and self.match(path):
                self.seen += 1
                if self.seen == self.nth:
                    self.failed = path
                    real(path, data[: len(data) // 2], *args, **kwargs)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
            return real(path, data, *args, **kwargs)

        return write


@pytest.mark.parametrize(
    "where, as_on_gcs",
    [
        ("base_model weights", False),
        ("base_model config.json", False),
        ("export weights", False),
        ("summary.json", False),
        ("base_model weights", True),
        ("export weights", True),
    ],
)
def test_a_write_failing_mid_way_exits_2_and_the_rerun_finishes(
    tiny_model_dir, tmp_path, monkeypatch, capsys, where, as_on_gcs
):
    """The first run dies on an injected ENOSPC (one line, exit 2); the rerun, with space again,
    finishes and every directory it wrote loads. ``as_on_gcs``: written as on a bucket (no
    rename: files go to their final names, the completion marker alone says a directory is
    whole), so the half-written directory is there for the rerun to find."""
    from gte_jax import hf
    from gte_jax.workdir import inference_path

    workdir = tmp_path / "w"
    if as_on_gcs:
        monkeypatch.setattr(storage, "is_local", lambda path: False)
        workdir.mkdir()  # a bucket has no directories to create; here the probe needs one

    match = {
        "base_model weights": lambda p: p.name == "model.safetensors",
        "base_model config.json": lambda p: (
            p.name == "config.json" and "base_model" in p.parent.name
        ),
        "export weights": lambda p: p.name == "model.safetensors" and "export" in p.parent.name,
        "summary.json": lambda p: "summary.json" in p.name,
    }[where]
    overrides = [*_TINY, "--config.train.num_steps=2"]
    with monkeypatch.context() as mp:
        disk = _FullDisk(mp, match)
        assert _train_main(workdir, *overrides, model=tiny_model_dir) == 2
    assert disk.failed is not None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"gte-jax train: error: {disk.failed}: No space left on device (ENOSPC); free some "
        "space (or use another --workdir) and rerun: the run resumes"
    ]
    if as_on_gcs:  # the directory is there, half-written, and not marked complete
        assert disk.failed.parent.exists() and not storage.is_complete(disk.failed.parent)
    else:  # no final name holds a half-written model: what is there is whole
        for name in ("base_model", "export"):
            assert not (workdir / name).exists() or storage.is_complete(workdir / name), name
        assert not (workdir / "summary.json").exists()

    assert _train_main(workdir, *overrides, model=tiny_model_dir) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 2
    assert storage.is_complete(workdir / "base_model") and storage.is_complete(workdir / "export")
    assert inference_path(workdir) == epath.Path(workdir / "export")
    # base_model/ is the initial model, export/ the final checkpoint's: compare with both sources.
    base, _, _ = hf.load_pretrained(workdir / "base_model")
    init, _, _ = hf.load_pretrained(tiny_model_dir)
    _assert_same_params(base, init)
    exported, _, _ = hf.load_pretrained(workdir / "export")
    from gte_jax.workdir import _checkpoint_model

    trained, _, _, step = _checkpoint_model(epath.Path(workdir), None)
    assert step == 2
    _assert_same_params(exported, trained)
    assert not list(workdir.glob(".*.partial"))  # no leftovers of the failed attempt


def _assert_same_params(a, b):
    from gte_jax.models.encoder import ModelFn

    pa, pb = ModelFn.from_module(a)[1], ModelFn.from_module(b)[1]
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------ a resumed run's summary


def test_summary_of_a_stopped_then_resumed_run_counts_the_whole_run(
    tiny_model_dir, tmp_path, monkeypatch
):
    steps, stop_after, batch = 6, 2, 8
    workdir = tmp_path / "w"
    overrides = [*_TINY, f"--config.train.num_steps={steps}", "--config.export.enabled=false"]
    calls = []

    def due(self, step):  # the stop check of each step: "stopped" after step `stop_after`
        calls.append(1)
        return len(calls) == stop_after

    from gte_jax.checkpoint import PreemptionFlag

    with monkeypatch.context() as mp:
        mp.setattr(PreemptionFlag, "due", due)
        assert _train_main(workdir, *overrides, model=tiny_model_dir) == 3  # stopped early
    first = json.loads((workdir / "summary.json").read_text())
    assert not first["completed"] and first["steps"] == stop_after
    assert first["examples"] == stop_after * batch
    assert _train_main(workdir, *overrides, model=tiny_model_dir) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["completed"] and summary["resumed_from_step"] == stop_after
    # One source, one batch size: an uninterrupted run trains on steps x batch examples.
    assert summary["steps"] == steps and summary["examples"] == steps * batch


# ------------------------------------------------------------------ unwritable workdirs


def test_workdir_under_a_file_exits_2_naming_the_path_and_errno(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    workdir = tmp_path / "file" / "w"
    assert _train_main(workdir) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"gte-jax train: error: {workdir}: Not a directory (ENOTDIR); choose a --workdir this "
        "process can write"
    ]


def test_read_only_workdir_exits_2_naming_the_path_and_errno(tmp_path, capsys):
    """A read-only file system (root ignores permission bits, not a read-only mount)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {made.stderr.decode().strip()}")
    try:
        assert _train_main(mount / "w") == 2
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"gte-jax train: error: {mount / 'w'}: Read-only file system (EROFS); choose a "
        "--workdir this process can write"
    ]


# ------------------------------------------------------------------ gs:// that cannot work


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_gs_workdir_without_gcsfs_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` fails as if not installed
    assert _train_main("gs://some-bucket/run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "gte-jax train: error: --workdir gs://some-bucket/run needs gcsfs: "
        "pip install 'gte-jax[gcs]'"
    ]


def test_unreachable_gs_workdir_exits_2_within_seconds(monkeypatch, capsys):
    pytest.importorskip("gcsfs")
    import gcsfs
    from etils.epath import backend

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

    def fresh():  # epath and gcsfs cache their filesystem: build one for this environment
        gcsfs.core.GCSFileSystem.clear_instance_cache()
        backend.fsspec_backend._get_filesystem.cache_clear()

    fresh()
    capsys.readouterr()  # what importing gcsfs logged (its experimental-features notice)
    try:
        t0 = time.monotonic()
        assert _train_main("gs://some-bucket/run") == 2
        elapsed = time.monotonic() - t0
    finally:
        fresh()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "gte-jax train: error: --workdir gs://some-bucket"
    ), "\n".join(err)
    # gcsfs alone retries a refused connection for ~50 s; the probe gives up after its limit.
    assert elapsed < storage.GCS_PROBE_SECONDS + 5, elapsed


def test_unreachable_gs_workdir_is_one_line_from_a_fresh_process():
    """What a user sees: the CLI in its own process (gcsfs imported there, logging set up by the
    CLI), one line on stderr and exit 2."""
    pytest.importorskip("gcsfs")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "GCSFS_"))}
    env.update(JAX_PLATFORMS="cpu", STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{_closed_port()}")
    out = subprocess.run(
        [sys.executable, "-m", "gte_jax.cli", "train", "--config",
         str(REPO / "configs" / "finetune.py"), "--workdir", "gs://some-bucket/run"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"gte-jax train: error: --workdir gs://some-bucket/run: no answer from the storage "
        f"within {storage.GCS_PROBE_SECONDS:.0f} s (no network, no credentials, or "
        "STORAGE_EMULATOR_HOST pointing nowhere?); check `gcloud auth application-default "
        "login` and the bucket name"
    ]
