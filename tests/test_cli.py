"""The `gte-jax` dispatcher and every subcommand's surface: --help names the key flags, usage and
input errors exit 2 with a message on stderr, nothing writes its output on failure.

Happy paths and most file-format errors live beside each command (test_train.py,
test_encode_cli.py, test_evaluation.py, test_mining.py, test_data_cli.py); this file fills the
gaps: argument validation, missing files and directories, and the dispatcher itself."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

import pytest

from gte_jax import __version__, cli
from gte_jax.data.pipeline import DEMO_DIR

REPO = pathlib.Path(__file__).resolve().parents[1]
FINETUNE_CONFIG = REPO / "configs" / "finetune.py"
DATA_CONFIG = REPO / "configs" / "demo_data.py"
PAIRS = DEMO_DIR / "bible_finetune.jsonl"

# subcommand argv -> flags its --help must mention
HELP_FLAGS = {
    ("train",): ["--config", "--workdir", "--coordinator_address", "--num_processes",
                 "--process_id", "--config.a.b"],
    ("export",): ["--workdir", "--step", "--output", "--model-name"],
    ("encode",): ["--model", "--input", "--output", "--batch-size", "--max-length", "--prefix",
                  "--pooling", "--no-normalize"],
    ("eval",): ["--model", "--beir", "--sts", "--prefix-query", "--prefix-doc", "--split",
                "--batch-size", "--max-length"],
    ("mine",): ["--model", "--pairs", "--corpus", "--output", "--num-negatives", "--skip-top",
                "--max-similarity", "--candidates", "--query-prefix", "--doc-prefix"],
    ("data",): ["inspect", "build"],
    ("data", "inspect"): ["--config", "--steps", "--show"],
    ("data", "build"): ["--config", "--builder", "--data_dir", "--manual_dir"],
    ("synth",): ["brainstorm", "generate"],
    ("synth", "brainstorm"): ["--endpoint", "--model", "--out", "--rounds", "--api-key-env",
                              "--concurrency", "--max-requests"],
    ("synth", "generate"): ["--endpoint", "--model", "--out", "--examples-per-task",
                            "--languages", "--max-retries", "--timeout", "--max-chars"],
    ("plan",): ["--config", "--topology", "--model-config", "--mfu", "--stage", "v5litepod-64",
                "--config.a.b"],
}  # fmt: skip


def _run(argv, capsys):
    """cli.main in-process -> (exit code, stdout, stderr); argparse's SystemExit is an exit code."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------- the dispatcher


def test_every_subcommand_is_dispatched_and_has_a_help_test():
    assert {argv[0] for argv in HELP_FLAGS} == set(cli.SUBCOMMANDS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_top_level_help_lists_every_command(flag, capsys):
    rc, out, err = _run([flag], capsys)
    assert rc == 0 and not err
    for name, (_, help_) in cli.SUBCOMMANDS.items():
        assert f"  {name}" in out and help_ in out


def test_no_command_is_a_usage_error(capsys):
    rc, out, err = _run([], capsys)
    assert rc == 2
    assert "usage: gte-jax <command>" in err and not out


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_matches_the_installed_distribution(flag, capsys):
    rc, out, _ = _run([flag], capsys)
    assert rc == 0 and out.strip() == __version__
    try:
        installed = importlib.metadata.version("gte-jax")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gte-jax is not installed (pip install -e .)")
    assert installed == __version__


def test_unknown_command_exits_2_and_names_it(capsys):
    rc, out, err = _run(["frobnicate", "--help"], capsys)
    assert rc == 2 and not out
    assert "'frobnicate'" in err and "commands:" in err


def test_exit_codes_reach_the_shell():
    """The console script and `python -m gte_jax.cli` pass main's return value to the shell."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    base = [sys.executable, "-m", "gte_jax.cli"]
    ok = subprocess.run([*base, "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == __version__
    bad = subprocess.run([*base, "nope"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
    # A subcommand's usage error (argparse, inside the subcommand module) is 2 as well.
    usage = subprocess.run(
        [*base, "encode", "--model", "m"], capture_output=True, text=True, env=env, timeout=60
    )
    assert usage.returncode == 2 and "--input" in usage.stderr


def test_no_libtpu_probe_line_on_a_cpu_machine(tmp_path):
    """JAX_PLATFORMS unset (as for a user): JAX's "Unable to initialize backend 'tpu'" INFO line
    does not reach the console, nor libtpu's start-up lines; the command's own error does. (libtpu
    stays silent by chance while another process holds its lock file: the rule itself is pinned by
    test_tpu_backend_is_probed_only_where_a_tpu_can_be.)"""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    argv = ["train", "--config", str(FINETUNE_CONFIG), "--workdir", str(tmp_path / "w")]
    run = subprocess.run(
        [sys.executable, "-m", "gte_jax.cli", *argv],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "no data sources" in run.stderr
    assert "Unable to initialize backend" not in run.stderr, run.stderr
    # libtpu's own start-up lines (written by C++ to fd 2 when the TPU backend is probed)
    for line in ("Failed to find host bounds", "unexpected worker hostname", "libtpu"):
        assert line not in run.stderr, run.stderr


@pytest.mark.parametrize(
    "env,tpu_chips,nvidia,skipped",
    [({}, 0, False, True), ({}, 4, False, False), ({}, 0, True, False),
     ({"JAX_PLATFORMS": ""}, 0, False, False), ({"JAX_FORCE_TPU_INIT": "1"}, 0, False, False)],
)  # fmt: skip
def test_tpu_backend_is_probed_only_where_a_tpu_can_be(
    monkeypatch, env, tpu_chips, nvidia, skipped
):
    """A TPU VM (TPU chips on the PCI bus), a GPU machine, a user's JAX_PLATFORMS (even empty) or
    JAX_FORCE_TPU_INIT keep JAX's backend discovery as it is; elsewhere the CLI asks for the CPU."""
    import jax
    from jax._src import hardware_utils

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.delenv("JAX_FORCE_TPU_INIT", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(
        hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (tpu_chips, None)
    )
    monkeypatch.setattr(hardware_utils, "has_visible_nvidia_gpu", lambda: nvidia)
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # this process's backends stay
    assert cli._skip_absent_tpu() is skipped
    assert os.environ.get("JAX_PLATFORMS") == ("cpu" if skipped else env.get("JAX_PLATFORMS"))


@pytest.mark.parametrize("tpu_chips,level,kept", [(0, "INFO", False), (4, "INFO", True),
                                                  (0, "WARNING", True)])  # fmt: skip
def test_backend_probe_filter_keeps_what_matters(monkeypatch, tpu_chips, level, kept):
    import logging

    from jax._src import hardware_utils

    monkeypatch.setattr(
        hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (tpu_chips, None)
    )
    record = logging.LogRecord(
        "jax._src.xla_bridge", getattr(logging, level), __file__, 1,
        "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so", None, None,
    )  # fmt: skip
    other = logging.LogRecord(
        "jax._src.xla_bridge", logging.INFO, __file__, 1, "anything else", None, None
    )
    probe = cli._QuietBackendProbe()
    assert probe.filter(record) is kept and probe.filter(other)


# ----------------------------------------------------------------------------- --help


@pytest.mark.parametrize("argv", list(HELP_FLAGS), ids=" ".join)
def test_subcommand_help_names_its_flags(argv, capsys):
    rc, out, err = _run([*argv, "--help"], capsys)
    assert rc == 0 and not err
    assert f"usage: gte-jax {' '.join(argv)}" in out
    missing = [flag for flag in HELP_FLAGS[argv] if flag not in out]
    assert not missing, f"`gte-jax {' '.join(argv)} --help` does not mention {missing}"


@pytest.mark.parametrize(
    "argv, missing",
    [
        (["train", "--workdir", "w"], "--config"),
        (["export", "--workdir", "w"], "--output"),
        (["encode", "--model", "m", "--input", "i.txt"], "--output"),
        (["eval", "--model", "m"], "--beir"),
        (["mine", "--model", "m", "--pairs", "p", "--corpus", "c", "--output", "o"],
         "--num-negatives"),
        (["data"], "command"),
        (["data", "inspect"], "--config"),
        (["synth", "generate", "--model", "m", "--out", "o"], "--endpoint"),
    ],
    ids=["train", "export", "encode", "eval", "mine", "data", "data inspect", "synth generate"],
)  # fmt: skip
def test_missing_required_argument_exits_2(argv, missing, capsys):
    rc, out, err = _run(argv, capsys)
    assert rc == 2 and not out
    assert "required" in err and missing in err


# ----------------------------------------------------------------------------- bad input


def test_train_bad_config_inputs_exit_2(tmp_path, capsys):
    common = ["train", "--workdir", str(tmp_path / "w")]
    rc, _, err = _run([*common, "--config", str(tmp_path / "nope.py")], capsys)
    assert rc == 2 and "nope.py" in err and "not found" in err
    rc, _, err = _run(
        [*common, "--config", str(FINETUNE_CONFIG), "--config.train.num_steps=many"], capsys
    )
    assert rc == 2 and "train.num_steps" in err and "integer" in err
    rc, _, err = _run([*common, "--config", str(FINETUNE_CONFIG), "--learning_rate=1"], capsys)
    assert rc == 2 and "--config.a.b=v" in err
    assert not (tmp_path / "w").exists()  # nothing ran


def test_train_without_data_sources_fails_before_training(tiny_model_dir, tmp_path, capsys):
    # configs/finetune.py leaves data.train_files empty on purpose.
    workdir = tmp_path / "w"
    argv = ["train", "--config", str(FINETUNE_CONFIG), "--workdir", str(workdir)]
    rc, out, err = _run([*argv, f"--config.model.init_from={tiny_model_dir}"], capsys)
    assert rc == 2 and not out  # bad input: exit 2, like every other subcommand
    assert "no data sources" in err and "data.train_files" in err
    assert not (workdir / "checkpoints").exists()
    assert not (workdir / "base_model").exists()  # the data config is checked before the model


def test_export_workdir_without_checkpoints_exits_2(tiny_model_dir, tmp_path, capsys):
    workdir = tmp_path / "w"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "base_model").symlink_to(tiny_model_dir, target_is_directory=True)
    out_dir = tmp_path / "export"
    rc, out, err = _run(["export", "--workdir", str(workdir), "--output", str(out_dir)], capsys)
    assert rc == 2 and not out
    assert "no checkpoint" in err and str(workdir / "checkpoints") in err
    assert not out_dir.exists()


@pytest.fixture
def texts_file(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("first\nsecond\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("what", ["input", "output_dir", "model"])
def test_encode_missing_paths_exit_2(what, tiny_model_dir, texts_file, tmp_path, capsys):
    paths = {
        "input": texts_file,
        "output": tmp_path / "out.npy",
        "model": tiny_model_dir,
    }
    if what == "input":
        paths["input"] = tmp_path / "absent.txt"
    elif what == "output_dir":
        paths["output"] = tmp_path / "absent_dir" / "out.npy"
    else:
        paths["model"] = tmp_path / "absent_model"
    argv = ["encode", *(f"--{k}={v}" for k, v in paths.items())]
    rc, out, err = _run(argv, capsys)
    assert rc == 2 and not out
    assert err.startswith("gte-jax encode: error:") and "absent" in err
    assert not paths["output"].exists()


def test_encode_rejects_batch_size_0(tiny_model_dir, texts_file, tmp_path, capsys):
    output = tmp_path / "out.npy"
    argv = ["encode", "--model", str(tiny_model_dir), "--input", str(texts_file)]
    rc, _, err = _run([*argv, "--output", str(output), "--batch-size", "0"], capsys)
    assert rc == 2 and "--batch-size" in err
    rc, _, err = _run([*argv, "--output", str(output), "--max-length", "-3"], capsys)
    assert rc == 2 and "--max-length" in err
    assert not output.exists()
    assert not output.exists()


def test_eval_argument_errors_exit_2(tiny_model_dir, capsys):
    beir = DEMO_DIR / "bible_eval"
    model = ["eval", "--model", str(tiny_model_dir)]
    rc, out, err = _run([*model, "--beir", str(beir), "--batch-size", "0"], capsys)
    assert rc == 2 and not out and "--batch-size" in err and "must be >= 1" in err
    rc, out, err = _run([*model, "--beir", str(beir), "--sts", "x.jsonl"], capsys)
    assert rc == 2 and not out and "not allowed with" in err


def test_eval_missing_beir_dir_exits_2(tiny_model_dir, tmp_path, capsys):
    rc, out, err = _run(
        ["eval", "--model", str(tiny_model_dir), "--beir", str(tmp_path / "absent")], capsys
    )
    assert rc == 2 and not out
    assert "absent" in err and "BEIR" in err


@pytest.mark.parametrize(
    "option, message",
    [
        (["--num-negatives", "0"], "--num-negatives"),
        (["--num-negatives", "1", "--batch-size", "0"], "--batch-size"),
        (["--num-negatives", "1", "--skip-top", "-1"], "--skip-top"),
    ],
)
def test_mine_rejects_bad_numbers(option, message, tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "mined.jsonl"
    argv = ["mine", "--model", str(tiny_model_dir), "--pairs", str(PAIRS), "--corpus", str(PAIRS)]
    rc, out, err = _run([*argv, "--output", str(output), *option], capsys)
    assert rc == 2 and not out and message in err
    assert not output.exists()


@pytest.mark.parametrize("what", ["pairs", "output_dir"])
def test_mine_missing_paths_exit_2(what, tiny_model_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "a verse"}) + "\n", encoding="utf-8")
    pairs = tmp_path / "absent.jsonl" if what == "pairs" else PAIRS
    output = tmp_path / ("absent_dir/mined.jsonl" if what == "output_dir" else "mined.jsonl")
    argv = ["mine", "--model", str(tiny_model_dir), "--pairs", str(pairs), "--corpus", str(corpus)]
    rc, out, err = _run([*argv, "--output", str(output), "--num-negatives", "1"], capsys)
    assert rc == 2 and not out
    assert err.startswith("gte-jax mine: error:") and "absent" in err
    assert not output.exists()


def test_data_inspect_bad_inputs_exit_2(minilm_dir, tmp_path, capsys):
    tok = f"--config.data.tokenizer={minilm_dir}"
    rc, out, err = _run(["data", "inspect", "--config", str(DATA_CONFIG), "--bogus"], capsys)
    assert rc == 2 and not out and "--bogus" in err
    rc, out, err = _run(["data", "inspect", "--config", str(tmp_path / "absent.py")], capsys)
    assert rc == 2 and not out and "absent.py" in err
    rc, out, err = _run(["data", "inspect", "--config", str(DATA_CONFIG), "--steps", "0", tok], capsys)  # fmt: skip
    assert rc == 2 and not out and "--steps" in err
    # A training config without data sources (finetune.py leaves data.train_files empty).
    rc, out, err = _run(["data", "inspect", "--config", str(FINETUNE_CONFIG), tok], capsys)
    assert rc == 2 and not out and "no data sources" in err


def test_data_build_without_target_or_data_dir_exits_2(capsys):
    rc, out, err = _run(["data", "build"], capsys)
    assert rc == 2 and not out and "nothing to build" in err
    rc, out, err = _run(["data", "build", "--builder", "local_pairs"], capsys)
    assert rc == 2 and not out and "no data dir" in err
    # A config whose sources are all local files has nothing to build either.
    rc, out, err = _run(["data", "build", "--config", str(DATA_CONFIG)], capsys)
    assert rc == 2 and not out and "nothing to build" in err


_TORCHLESS_ENCODE = """
import sys
from gte_jax import cli
logdir = sys.argv[-1]
sys.argv = ["gte-jax", *sys.argv[1:-1]]
rc = cli.main()
from gte_jax.metrics import MetricWriter  # tensorboardX imports torch when it can
writer = MetricWriter(logdir)
writer.write(1, {"loss": 0.5})
writer.close()
print("TORCH_IMPORTED", sys.modules.get("torch") is not None)
sys.exit(rc)
"""


@pytest.mark.parametrize(
    "family,keep_torch", [("bert", ""), ("bert", "1"), ("t5", ""), ("qwen2", "")]
)
def test_command_line_keeps_torch_out_and_embeds_the_same(
    family, keep_torch, tiny_model_dir, tmp_path
):
    """`gte-jax encode` (as a shell runs it: main() without argv) keeps torch out of the process:
    transformers and tensorboardX import it only because it is installed, ~3 s of start-up and exit
    (measured on 2 cores). For a BERT (WordPiece), a T5 (SentencePiece, mean pooling) and a Qwen2 decoder
    (last-token pooling), with an instruction prompt, the embeddings are bitwise those of a process
    with torch (opt-out GTE_JAX_TRANSFORMERS_TORCH=1 gives the same); the metric writer still
    writes its TensorBoard file."""
    import numpy as np
    from tiny_models import tiny_decoder_dir, tiny_t5_dir

    model = {
        "bert": lambda: tiny_model_dir,
        "t5": lambda: tiny_t5_dir(tmp_path),
        "qwen2": lambda: tiny_decoder_dir(tmp_path, "qwen2"),
    }[family]()
    texts = tmp_path / "texts.txt"
    texts.write_text("In the beginning God created the heaven and the earth.\nAnd God said\n")
    out = tmp_path / "emb.npy"
    logs = tmp_path / "logs"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "GTE_JAX_TRANSFORMERS_TORCH": keep_torch}
    argv = ["encode", "--model", str(model), "--input", str(texts), "--instruction",
            "Find the verse that continues this one", "--template", "e5", "--output", str(out)]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", _TORCHLESS_ENCODE, *argv, str(logs)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"TORCH_IMPORTED {bool(keep_torch)}" in run.stdout
    assert "PyTorch was not found" not in run.stderr
    assert list(logs.glob("events.out.tfevents.*")) and (logs / "metrics.jsonl").exists()
    # The reference: main([...]) in this pytest process, whose transformers has torch (the
    # in-process call must leave it so: a caller's modules are its own).
    reference = tmp_path / "reference.npy"
    assert cli.main([*argv[:-1], str(reference)]) == 0
    assert sys.modules.get("torch", "absent") is not None
    np.testing.assert_array_equal(np.load(out), np.load(reference))


def test_a_misspelt_torch_opt_out_exits_2():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "GTE_JAX_TRANSFORMERS_TORCH": "ture"}
    run = subprocess.run(
        [sys.executable, "-m", "gte_jax.cli", "encode", "--model", "m", "--input", "i",
         "--output", "o"], capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "GTE_JAX_TRANSFORMERS_TORCH='ture'" in run.stderr
