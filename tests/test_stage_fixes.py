"""Regression tests for what an outside audit and a new user found in a training stage:
a plain HF encoder trains normalised, prompts pool the same tokens everywhere and reach the export,
settings that cannot work are refused at start-up, every default lives in one place, a finished
stage rerun is a no-op, every stage evaluates at step 0, the loss floor is reported, and encode
takes a workdir.

One two-stage run from a raw ``BertModel`` directory (transformers + torch, no
sentence-transformers files) is shared by most tests."""

from __future__ import annotations

import ast
import json
import math
import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from gte_jax import train
from gte_jax.data.pipeline import DEMO_DIR, build_iterator, build_sources
from gte_jax.defaults import stage_config
from gte_jax.gradcache import role_inputs
from gte_jax.training import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
QUERY_PREFIX, DOC_PREFIX = "query: ", "passage: "


@pytest.fixture(scope="module")
def raw_bert_dir(tmp_path_factory, minilm_dir) -> pathlib.Path:
    """A random BertModel saved by transformers (model.safetensors + config.json) and the MiniLM
    tokenizer: what `hf download bert-base-uncased` gives, in miniature."""
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tests.conftest import TINY_BERT

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("raw_bert")
    cfg = {k: v for k, v in TINY_BERT.items() if k != "model_type"}
    BertModel(BertConfig(**cfg)).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(out)
    assert not (out / "modules.json").exists()  # no sentence-transformers files
    return out


def _stage(name: str, init_from: str, steps: int) -> ml_collections.ConfigDict:
    c = stage_config(name)
    c.model.init_from = init_from
    c.model.include_prompt = "false"  # the prompt's tokens are not pooled
    c.data.sources = [
        {
            "name": "bible",
            "path": str(DEMO_DIR / "bible_finetune.jsonl"),
            "query_prefix": QUERY_PREFIX,
            "doc_prefix": DOC_PREFIX,
        }
    ]
    c.data.query_max_length = c.data.doc_max_length = 32
    c.data.packing = True
    c.model.dropout = 0.0  # not these tests' property: its random bits are ~1/3 of a compile
    c.train.batch_size = 8
    c.train.num_steps = steps
    c.train.learning_rate = 1e-3
    c.train.progress_bar = False
    c.loss.name = "gte"
    c.checkpoint.every_steps = 2
    c.checkpoint.async_save = False
    c.eval.sets = [
        {
            "name": "bible",
            "kind": "beir",
            "path": str(DEMO_DIR / "bible_eval"),
            "query_prefix": QUERY_PREFIX,
            "doc_prefix": DOC_PREFIX,
        }
    ]
    c.eval.batch_size = 128
    return c


def _two_stage_config(raw_bert_dir) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.stages = ["pre", "ft"]
    config.pre = _stage("pre", str(raw_bert_dir), steps=3)
    config.pre.export.enabled = False
    config.ft = _stage("ft", "stage:pre", steps=2)
    return config


@pytest.fixture(scope="module")
def two_stage(raw_bert_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_stage")
    config = _two_stage_config(raw_bert_dir)
    summaries = loop.run(config, workdir)
    assert [s["completed"] for s in summaries] == [True, True]
    return config, workdir, summaries


def _train_time_query_embeddings(stage_cfg, workdir):
    """What the loss saw for one batch's queries: the model of the stage's final checkpoint through
    training's own loading (normalisation, include_prompt), iterator (packing, pool masks) and
    embed function."""
    cfg = stage_cfg.copy_and_resolve_references()
    cfg.model.init_from = str(workdir)
    model, tokenizer, info = train.load_model_for_training(cfg.model)
    data = cfg.data.copy_and_resolve_references()
    data.batch_size = 8
    it = build_iterator(
        data, tokenizer=tokenizer, sources=build_sources(data), include_prompt=info.include_prompt
    )
    plan = it.next_plan()
    batch = it.materialize(plan)
    assert "query_pool_mask" in batch and "query_segment_ids" in batch  # packed, prompt excluded
    model_fn, params = train.ModelFn.from_module(model)
    emb = train.make_embed_fn(model_fn)(params, role_inputs(batch, "query"), None)
    return plan.queries, np.asarray(emb)


# ------------------------------------------------------------------ normalised training


def test_plain_hf_encoder_trains_and_exports_unit_norm_embeddings(two_stage):
    st = pytest.importorskip("sentence_transformers")
    config, workdir, _ = two_stage
    queries, seen = _train_time_query_embeddings(config.ft, workdir / "ft")
    np.testing.assert_allclose(np.linalg.norm(seen, axis=1), 1.0, atol=1e-5)
    export = workdir / "ft" / "export"
    modules = json.loads((export / "modules.json").read_text())
    assert modules[-1]["type"].endswith("Normalize")
    model = st.SentenceTransformer(str(export), device="cpu")
    model.max_seq_length = 32  # truncate as training did (data.query_max_length)
    got = model.encode(queries, prompt_name="query", convert_to_numpy=True)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, seen, atol=2e-5)


def test_model_normalize_false_trains_raw_embeddings(raw_bert_dir):
    cfg = _stage("raw", str(raw_bert_dir), steps=1)
    cfg.model.normalize = False
    model, _, _ = train.load_model_for_training(cfg.model)
    assert model.normalize is False
    cfg.model.normalize = True
    model, _, _ = train.load_model_for_training(cfg.model)
    assert model.normalize is True


# ------------------------------------------------------------------ one prompt rule


def test_prompts_train_encode_and_sentence_transformers_agree(two_stage, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from gte_jax.cli import main

    config, workdir, _ = two_stage
    export = workdir / "ft" / "export"
    st_cfg = json.loads((export / "config_sentence_transformers.json").read_text())
    assert st_cfg["prompts"] == {"query": QUERY_PREFIX, "document": DOC_PREFIX}
    assert json.loads((export / "1_Pooling" / "config.json").read_text())["include_prompt"] is False

    queries, seen = _train_time_query_embeddings(config.ft, workdir / "ft")
    texts = tmp_path / "q.jsonl"
    texts.write_text("".join(json.dumps({"text": q}) + "\n" for q in queries))
    out = tmp_path / "q.npy"
    # Training truncated queries to 32 tokens (data.query_max_length): encode the same way.
    assert main(["encode", "--model", str(workdir / "ft"), "--input", str(texts),
                 "--output", str(out), "--prompt-name", "query", "--max-length", "32"]) == 0  # fmt: skip
    ours = np.load(out)
    model = st.SentenceTransformer(str(export), device="cpu")
    model.max_seq_length = 32
    ref = model.encode(queries, prompt_name="query", convert_to_numpy=True)
    np.testing.assert_allclose(ours, seen, atol=2e-5)
    np.testing.assert_allclose(ref, seen, atol=2e-5)
    # The rule matters: pooling the prompt's tokens gives other embeddings.
    model[1].include_prompt = True
    other = model.encode(queries, prompt_name="query", convert_to_numpy=True)
    assert np.abs(other - seen).max() > 1e-3


def test_old_per_source_pool_switch_is_refused_with_the_replacement():
    from gte_jax.config import ConfigError

    data = stage_config().data
    data.sources = [{"path": str(DEMO_DIR / "chat_qa.jsonl"), "pool_query_prefix": False}]
    with pytest.raises(ConfigError, match="model.include_prompt"):
        build_sources(data)


# ------------------------------------------------------------------ summaries


def _strict_json(path: pathlib.Path):
    def no_nan(name):
        raise AssertionError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=no_nan)


def test_every_stage_evaluates_at_step_0_and_reports_the_loss_floor(two_stage):
    _, workdir, summaries = two_stage
    for s in summaries:
        saved = _strict_json(workdir / s["stage"] / "summary.json")
        assert saved["eval_at_start"]["step"] == 0
        assert saved["eval"]["step"] == saved["steps"] > 0
        assert saved["loss_floor"] == pytest.approx(math.log(2))
        assert saved["loss_above_floor"] == pytest.approx(saved["final_loss"] - math.log(2))
        assert 0.0 <= saved["final_accuracy"] <= 1.0
    # Stage 2 starts from stage 1's final parameters: its "before" is stage 1's "after".
    pre, ft = summaries
    assert ft["eval_at_start"]["bible/ndcg@10"] == pytest.approx(pre["eval"]["bible/ndcg@10"])


def test_rerunning_a_finished_stage_is_a_no_op(two_stage, raw_bert_dir):
    _, workdir, _ = two_stage
    files = [workdir / s / "summary.json" for s in ("pre", "ft")]
    files += [workdir / "ft" / "export" / "README.md", workdir / "ft" / "card.json"]
    before = {f: f.read_bytes() for f in files}
    again = loop.run(_two_stage_config(raw_bert_dir), workdir)
    assert all(s["already_complete"] and s["completed"] for s in again)
    assert {f: f.read_bytes() for f in files} == before
    assert "## Evaluation" in (workdir / "ft" / "export" / "README.md").read_text()


def test_summary_json_has_no_nan():
    assert train.json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"}) == {
        "a": None,
        "b": [1.0, None],
        "c": "x",
    }


# ------------------------------------------------------------------ encode takes a workdir


def test_encode_accepts_a_workdir_and_an_offline_model_name(two_stage, tmp_path):
    from gte_jax.cli import main
    from gte_jax.encode import Embedder

    _, workdir, _ = two_stage
    texts = tmp_path / "t.txt"
    texts.write_text("In the beginning\nLet there be light\n")
    for model in (workdir / "ft", workdir / "pre", "all-MiniLM-L6-v2"):
        out = tmp_path / "e.npy"
        assert main(["encode", "--model", str(model), "--input", str(texts),
                     "--output", str(out)]) == 0  # fmt: skip
        ref = Embedder.from_pretrained(model).encode(["In the beginning", "Let there be light"])
        np.testing.assert_allclose(np.load(out), ref, atol=1e-6)


# ------------------------------------------------------------------ refused at start-up


@pytest.mark.parametrize(
    "override, source, message",
    [
        ("--config.loss.temperature=0", {}, "loss.temperature=0.0: must be > 0"),
        ("--config.loss.temperature=-0.05", {}, "loss.temperature=-0.05: must be > 0"),
        ("--config.mesh.model=2", {}, "mesh.model=2"),
        (
            "--config.train.gradcache=true --config.train.gradcache_chunk_size=24",
            {},
            "gradcache_chunk_size=24 must divide",
        ),
        (
            "--config.train.gradcache=true --config.train.gradcache_chunk_size=16",
            {"batch_size": 24},
            "batch_size=24 is not divisible by 16",
        ),
        ("", {"batch_size": 12}, "batch_size=12 is not divisible by 8"),
        ("--config.data.packing_row_length=-8", {}, "data.packing_row_length=-8: must be >= 0"),
        (
            "--config.data.packing_row_length=96 --config.train.gradcache=true "
            "--config.train.gradcache_chunk_size=8",
            {},
            "data.packing_row_length=96 with 4 GradCache chunks",
        ),
        ("--config.data.packing_estimate_batches=-1", {}, "packing_estimate_batches=-1"),
        ("--config.data.prefetch=-1", {}, "data.prefetch=-1: must be >= 0"),
        (
            "--config.data.max_direct_file_bytes=1000",
            {},
            "> data.max_direct_file_bytes=1000: every process would parse it whole",
        ),
    ],
)
def test_settings_that_cannot_work_exit_2_at_start_up(tmp_path, capsys, override, source, message):
    """Refused before the model is read (the model path does not even exist)."""
    from gte_jax.cli import main

    source = {"path": str(DEMO_DIR / "bible_finetune.jsonl"), **source}
    rc = main(["train", "--config", str(REPO / "configs" / "finetune.py"), "--workdir",
               str(tmp_path / "w"), "--config.model.init_from=/no/such/model",
               "--config.train.batch_size=32", f"--config.data.sources=[{source!r}]",
               *override.split()])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "/no/such/model" not in err


# ------------------------------------------------------------------ one place for defaults

_CONFIG_NAMES = {  # variable name in gte_jax/ -> the config group it holds
    "tcfg": "train",
    "train_cfg": "train",
    "lcfg": "loss",
    "model_cfg": "model",
    "eval_cfg": "eval",
    "data_cfg": "data",
    "data": "data",
}


def _reads(tree: ast.AST):
    """(group, field) of every ``config.<group>.<field>`` / ``<alias>.<field>`` read."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, cur = [node.attr], node.value
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if not isinstance(cur, ast.Name):
            continue
        chain.append(cur.id)
        chain.reverse()  # e.g. ["config", "train", "batch_size"]
        if chain[0] in ("config", "cfg") and len(chain) >= 3:
            yield chain[1], chain[2]
        elif chain[0] == "st" and len(chain) >= 4 and chain[1] == "config":
            yield chain[2], chain[3]
        elif chain[0] in _CONFIG_NAMES and len(chain) >= 2:
            yield _CONFIG_NAMES[chain[0]], chain[1]


def test_every_config_key_the_training_code_reads_has_a_default():
    defaults = stage_config()
    methods = set(dir(ml_collections.ConfigDict))
    missing = []
    for path in ("train.py", "workdir.py", "data/pipeline.py"):
        tree = ast.parse((REPO / "gte_jax" / path).read_text())
        for group, field in _reads(tree):
            if group not in defaults or field in methods:
                continue
            if field not in defaults[group]:
                missing.append(f"{path}: {group}.{field}")
    assert not missing, f"read by the code but not in gte_jax/defaults.py: {missing}"


def test_no_fallback_defaults_in_the_training_code():
    """``cfg.get(key, fallback)`` would be a second default: the config is read strictly."""
    offenders = []
    training = sorted(
        p.relative_to(REPO / "gte_jax") for p in (REPO / "gte_jax" / "training").glob("*.py")
    )
    assert len(training) >= 8  # the training package: the loop, setup, checks, step, ...
    for path in ("train.py", "workdir.py", *map(str, training)):
        tree = ast.parse((REPO / "gte_jax" / path).read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and isinstance(node.func.value, (ast.Name, ast.Attribute))
                and any(w in ast.unparse(node.func.value) for w in ("cfg", "config", "data"))
            ):
                offenders.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders


def test_adam_settings_are_overridable(tmp_path):
    from gte_jax.config import load_config

    config = load_config(REPO / "configs" / "finetune.py", ["--config.train.adam_b1=0.95"])
    assert config.train.adam_b1 == 0.95
    tx, _ = train.make_optimizer(config.train, total_steps=4)
    state = tx.init({"w": jax.numpy.ones((2, 2))})
    assert state is not None
