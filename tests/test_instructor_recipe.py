"""configs/instructor.py:runlocal through `gte-jax train`: MEDI (one task per batch) plus a source
with INSTRUCTOR templates, instruction tokens not pooled; the export reproduces `gte-jax encode
--instruction` in sentence-transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gte_jax import prompts
from tests.test_instructions import _cos, _texts


def test_instructor_runlocal_trains_end_to_end_and_its_export_reproduces_encode(
    tiny_model_dir, tmp_path
):
    """`gte-jax train --config configs/instructor.py:runlocal` (MEDI fixture, one task per batch,
    plus a source with instructor templates; include_prompt false), then the export in
    sentence-transformers with the source's prompt == `gte-jax encode --instruction`."""
    import os
    import pathlib
    import subprocess
    import sys

    from sentence_transformers import SentenceTransformer

    from gte_jax.commands import encode as encode_cmd

    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(repo))
    workdir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "gte_jax.cli", "train",
        "--config", f"{repo / 'configs' / 'instructor.py'}:runlocal",
        "--workdir", str(workdir), f"--config.model.init_from={tiny_model_dir}",
        "--log_level=WARNING",
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 6 and np.isfinite(summary["final_loss"])
    assert summary["skipped_records"] == 3  # the fixture's bad records that name their task
    assert "medi-data.json[17]" in out.stderr  # no task_name: skipped, named in the log
    export = workdir / "export"
    pooling = json.loads((export / "1_Pooling" / "config.json").read_text())
    assert pooling["include_prompt"] is False
    st_config = json.loads((export / "config_sentence_transformers.json").read_text())
    task = "Bible verse for retrieving its modern translation"
    prompt = prompts.instruction_prompt("instructor", task)
    assert st_config["prompts"]["bible_query"] == prompt
    queries, _ = _texts(6)
    (tmp_path / "q.txt").write_text("\n".join(queries) + "\n")
    rc = encode_cmd.main(
        ["--model", str(workdir), "--input", str(tmp_path / "q.txt"), "--output",
         str(tmp_path / "q.npy"), "--instruction", task, "--template", "instructor"]
    )  # fmt: skip
    assert rc == 0
    st = SentenceTransformer(str(export), device="cpu")
    theirs = st.encode(queries, prompt_name="bible_query", convert_to_numpy=True)
    assert _cos(np.load(tmp_path / "q.npy"), theirs).min() >= 0.99999


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model.padding_side=middle", "model.padding_side='middle': use auto, left"),
        ("--config.model.padding_side=left", "absolute position embeddings"),
        ("--config.model.append_eos=true", "no eos_token"),
        ("--config.data.sources=[{'path': 'x.jsonl', 'instruction_template': '{t}'}]", "{task}"),
    ],
)
def test_impossible_instruction_settings_exit_2_at_start_up(
    tiny_model_dir, tmp_path, capsys, override, message
):
    import pathlib

    from gte_jax.commands import train as train_cmd

    repo = pathlib.Path(__file__).resolve().parents[1]
    rc = train_cmd.main(
        ["--config", f"{repo / 'configs' / 'instructor.py'}:runlocal",
         "--workdir", str(tmp_path / "run"), f"--config.model.init_from={tiny_model_dir}",
         "--log_level=WARNING", override]
    )  # fmt: skip
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("checkpoints/*"))  # refused before any step
