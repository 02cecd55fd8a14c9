"""`gte-jax data inspect` on the bundled demo config."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from gte_jax.data import cli

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo_data.py"


def test_inspect_reports_mixture(capsys, minilm_dir):
    rc = cli.main(
        [
            "inspect",
            "--config",
            str(CONFIG),
            "--steps",
            "40",
            "--config.data.batch_size=8",
            "--config.data.alpha=1.0",
            "--config.data.sources.2.batch_size=8",
            f"--config.data.tokenizer={minilm_dir}",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0
    report = json.loads(out)  # exactly one JSON object on stdout
    assert report["steps"] == 40 and report["alpha"] == 1.0 and report["skipped_records"] == 0
    # Sizes and α = 1 shares computed independently from the bundled files.
    files = {"bible": "bible_kjv_web_ot", "chat_qa": "chat_qa", "news": "news_lead_body"}
    demo = CONFIG.parents[1] / "gte_jax" / "resources" / "demo"
    sizes = {
        name: sum(1 for line in (demo / f"{stem}.jsonl").read_text().splitlines() if line.strip())
        for name, stem in files.items()
    }
    total = sum(sizes.values())
    assert set(report["sources"]) == set(sizes)
    for name, rec in report["sources"].items():
        assert rec["size"] == sizes[name] and rec["skipped"] == 0
        assert np.isclose(rec["expected_share"], sizes[name] / total, atol=1e-6)
        assert np.isclose(rec["observed_share"] * 40, round(rec["observed_share"] * 40), atol=1e-3)
    assert np.isclose(sum(r["observed_share"] for r in report["sources"].values()), 1.0)
    assert "examples" in err  # decoded batches on stderr


def test_unknown_key_exits_2(capsys):
    rc = cli.main(["inspect", "--config", str(CONFIG), "--config.data.nope=1"])
    assert rc == 2
    assert "unknown config key 'data.nope'" in capsys.readouterr().err


def test_inspect_reads_a_stage_of_a_training_config(capsys):
    """configs/demo.py is a two-stage training config: inspect follows `stage:` references to the
    model's tokenizer and uses train.batch_size as the global batch."""
    import pathlib

    from gte_jax.cli import main

    demo = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py")
    assert main(["data", "inspect", "--config", demo, "--stage", "finetune", "--steps", "3",
                 "--show", "1"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert list(report["sources"]) == ["bible_hn"]
    shown = json.loads(next(x for x in captured.err.splitlines() if x.startswith("{")))
    assert shown["shapes"]["valid"] == [16]  # the finetune stage's train.batch_size
    # One hard negative per example, in the padded ([B, K, L] ids) or packed ([B, K] slots) layout.
    neg = shown["shapes"].get("neg_slot_index", shown["shapes"]["neg_input_ids"])
    assert neg[:2] == [16, 1]
    assert main(["data", "inspect", "--config", demo, "--stage", "nope"]) == 2
    assert "pretrain" in capsys.readouterr().err


def test_build_files_then_read_them_as_a_tfds_source(tmp_path, capsys):
    """`data build --files` makes a local file a TFDS source that opens from its counts, with
    the records a direct read of the file gives."""
    from gte_jax.data.pipeline import DEMO_DIR
    from gte_jax.data.sources import COUNTS_FILE, from_files, from_tfds

    src_file = DEMO_DIR / "chat_qa.jsonl"
    rc = cli.main(["build", "--files", str(src_file), "--name", "chat", "--data_dir",
                   str(tmp_path)])  # fmt: skip
    assert rc == 0
    built = pathlib.Path(json.loads(capsys.readouterr().out.splitlines()[-1])["path"])
    assert (built / COUNTS_FILE).exists()
    direct = from_files("chat", src_file)
    tfds_src = from_tfds("chat", "local_pairs/chat", data_dir=str(tmp_path))
    assert len(tfds_src) == len(direct)
    key = lambda r: (r.query, r.positive, r.negatives)  # noqa: E731
    assert sorted(map(key, (tfds_src[i] for i in range(len(tfds_src))))) == sorted(
        map(key, (direct[i] for i in range(len(direct))))
    )


def test_unprepared_tfds_source_is_one_short_error(capsys, minilm_dir, tmp_path):
    """TFDS's "not found" message lists its whole catalogue (~250 lines): the error keeps its
    first line, names the dataset and where it looked, and says how to build it."""
    recipe = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "gte_base_pretrain.py")
    argv = ["inspect", "--config", recipe, "--steps", "2", f"--config.data.data_dir={tmp_path}"]
    rc = cli.main([*argv, f"--config.model.init_from={minilm_dir}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) <= 5, err[:3000]
    assert "'msmarco_triples'" in err and str(tmp_path) in err and "gte-jax data build" in err
