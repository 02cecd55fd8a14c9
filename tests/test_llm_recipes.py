"""The decoder-LLM recipes (configs/e5_mistral.py, configs/gte_qwen2.py) end to end on a tiny
random Mistral (gte_jax/models/tiny_decoder.py): `gte-jax train --config e5_mistral.py:runlocal`
with LoRA on 8 fake devices equals 1 device and resumes bitwise after SIGKILL; its export loads in
sentence-transformers (last-token pooling, EOS appended, left padding, the query prompt) with
gte-jax encode's embeddings; GradCache + LoRA + remat + packing equals plain autodiff on the
decoder; an untied LM head is frozen outside MNTP stages."""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from numerics import F32_EPS, reorder_atol, reorder_rtol
from test_train import _env, _final_state, _train_log, kill_and_resume, run_train

from gte_jax import sharding as shd
from gte_jax import train
from gte_jax.config import load_config
from gte_jax.models import lora
from gte_jax.models.encoder import ModelFn

REPO = pathlib.Path(__file__).resolve().parents[1]
E5 = REPO / "configs" / "e5_mistral.py"
QWEN = REPO / "configs" / "gte_qwen2.py"
TASK = "Given a Bible verse, retrieve its modern translation"  # the runlocal source's
TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And God said, Let there be light: and there was light.",
    "Jesus wept.",
    "",
]
# 4 steps of the e5_mistral:runlocal recipe (LoRA r=16 with dropout 0.1 on every projection,
# GradCache chunks of 8, InfoNCE τ = 0.02 with the hard negative, EOS, left padding), padded rows
# (packed rows are laid out per device, so their dropout masks depend on the device count),
# every step logged and checkpointed.
RUN = (
    "--config.data.packing=false",
    "--config.train.num_steps=4",
    "--config.train.log_every=1",
    "--config.checkpoint.every_steps=1",
    "--config.checkpoint.async_save=false",
    "--log_level=WARNING",
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private GTE_JAX_CACHE holding the runlocal recipes' tiny Mistral, built once here."""
    from gte_jax.models import tiny_decoder

    directory = tmp_path_factory.mktemp("gte_jax_cache")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("GTE_JAX_CACHE", str(directory))
        model_dir = tiny_decoder.tiny_decoder_dir("mistral")
        assert load_config(f"{E5}:runlocal").model.init_from == str(model_dir)
    return directory


def _run_env(cache, devices):
    return {**_env(devices), "GTE_JAX_CACHE": str(cache)}


def _cmd(workdir, *extra):
    return [
        sys.executable, "-m", "gte_jax.cli", "train", "--config", f"{E5}:runlocal",
        "--workdir", str(workdir), *RUN, *extra,
    ]  # fmt: skip


def _train(cache, workdir, devices, *extra):
    return run_train(_cmd(workdir, *extra), _run_env(cache, devices), workdir)


@pytest.fixture(scope="module")
def one_device(cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e5_one_device")
    summary = _train(cache, workdir, 1)
    assert summary["steps"] == 4 and summary["completed"]
    return workdir


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_lora_recipe_on_8_devices_equals_1_device(cache, one_device, tmp_path):
    """Batch 16 over 8 devices (2 examples each, GradCache chunks of 8 = 1 per device): the same
    losses, gradient norms, LoRA factors and Adam moments as on 1 device, to float32 summation
    order. Measured (2026-11-30): loss / grad_norm rtol <= 9e-7; each factor's difference <= 1.8e-4
    of how far training moved it; Adam moments <= 6.7e-6 of each leaf's largest entry."""
    eight = tmp_path / "eight"
    assert _train(cache, eight, 8, "--config.export.enabled=false")["steps"] == 4
    log_1, log_8 = _train_log(one_device), _train_log(eight)
    assert sorted(log_1) == sorted(log_8) == [1, 2, 3, 4]
    for step in log_1:
        for key in ("train/loss", "train/grad_norm"):
            np.testing.assert_allclose(log_8[step][key], log_1[step][key], rtol=1e-5)
    (s1, a), (s8, b) = _final_state(one_device), _final_state(eight)
    assert s1 == s8 == 4 and set(a) == {"params", "opt_state", "step", "rng"}
    paths = {shd.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(a["params"])[0]}
    assert paths and all(p.endswith(("/lora_a", "/lora_b")) for p in paths)
    assert len(paths) == 2 * 7 * 2  # A and B x q/k/v/o/gate/up/down x 2 layers
    init = _leaves(_initial_lora(one_device))
    for x, y, x0 in zip(_leaves(a["params"]), _leaves(b["params"]), init, strict=True):
        moved = float(np.abs(x - x0).max())
        assert moved > 0
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-3 * moved)
    for x, y in zip(_leaves(a["opt_state"]), _leaves(b["opt_state"]), strict=True):
        if x.dtype.kind == "f":
            np.testing.assert_allclose(y, x, rtol=0, atol=5e-5 * float(np.abs(x).max()))


def _initial_lora(workdir):
    """The run's LoRA factors at step 0 (A from the run's seed, B = 0), rebuilt as training does."""
    from gte_jax import hf

    model, _ = hf.load_model(workdir / "base_model")
    cfg = lora.LoRAConfig.from_json((workdir / "lora.json").read_text())
    lora.inject(model, cfg, rngs=nnx.Rngs(0))  # runlocal's train.seed = 0
    model_fn, params = ModelFn.from_module(model)
    return model_fn.split_params(params)[0]


def test_lora_recipe_resumes_bitwise_after_sigkill(cache, one_device, tmp_path):
    workdir = tmp_path / "killed"
    cmd = _cmd(workdir, "--config.export.enabled=false")
    kill_and_resume(cmd, _run_env(cache, 1), workdir, kills=1, seed=14, wait=300)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["completed"] and summary["resumed_from_step"] > 0
    (s1, a), (s2, b) = _final_state(one_device), _final_state(workdir)
    assert s1 == s2 == 4
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _gte_jax_encode(model, texts, tmp_path, *flags):
    from gte_jax.cli import main

    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "out.npy"
    assert main(["encode", "--model", str(model), "--input", str(tmp_path / "in.txt"),
                 "--output", str(out), *flags]) == 0  # fmt: skip
    return np.load(out)


def _agree(a, b):
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() >= 0.99999, cos
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_export_in_sentence_transformers_equals_gte_jax_encode(one_device, tmp_path):
    """The merged export: last-token Pooling, Normalize, a tokenizer appending EOS and padding
    left, the query prompt "Instruct: {task}\\nQuery: ". Texts of different lengths in one batch
    (left pads before the short ones), with and without the prompt."""
    from sentence_transformers import SentenceTransformer

    from gte_jax import workdir as wd
    from gte_jax.encode import Embedder

    export = one_device / "export"
    st = SentenceTransformer(str(export), device="cpu")
    assert st.prompts["query"] == f"Instruct: {TASK}\nQuery: "
    pooling = json.loads((export / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_lasttoken"] and pooling["include_prompt"]
    tok = st.tokenizer
    assert tok.padding_side == "left"
    enc = tok(TEXTS[:3], padding=True)
    assert all(ids[-1] == tok.eos_token_id for ids in enc["input_ids"])  # EOS last, pads first
    assert enc["attention_mask"][2][0] == 0

    bare = st.encode(TEXTS, convert_to_numpy=True)
    prompted = st.encode(TEXTS, prompt_name="query", convert_to_numpy=True)
    _agree(bare, _gte_jax_encode(one_device, TEXTS, tmp_path))
    _agree(prompted, _gte_jax_encode(one_device, TEXTS, tmp_path, "--prompt-name", "query"))
    task = _gte_jax_encode(one_device, TEXTS, tmp_path, "--instruction", TASK, "--template", "e5")
    _agree(prompted, task)
    # As configs/e5_mistral.py documents it: no --template, the export's (e5) is used.
    _agree(prompted, _gte_jax_encode(one_device, TEXTS, tmp_path, "--instruction", TASK))
    assert np.abs(prompted - bare).max() > 1e-2  # the prompt reaches the last token
    # The merged export == our unmerged LoRA forward on the last checkpoint.
    model, tokenizer, _, _ = wd._checkpoint_model(one_device, None)
    assert lora.has_lora(model)
    _agree(bare, Embedder(model, tokenizer).encode(TEXTS))


# --------------------------------------------------------------------------------------------------
# In process: GradCache + LoRA + remat + packing on the decoder; the frozen LM head
# --------------------------------------------------------------------------------------------------

LR = 0.5


def _decoder_lora_state(model_dir, *, remat):
    from gte_jax import hf
    from gte_jax.prompts import configure_tokenizer

    model, tokenizer, _ = hf.load_pretrained(model_dir, remat=remat)
    model.pooling = "last"
    configure_tokenizer(tokenizer, padding_side="left", append_eos=True)
    lora.inject(model, lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.3), rngs=nnx.Rngs(0))
    for i, (_, layer) in enumerate(lora.lora_layers(model)):  # B != 0: gradients reach A
        key = jax.random.fold_in(jax.random.key(1), i)
        layer.lora_b[...] = 0.3 * jax.random.normal(key, layer.lora_b[...].shape)
    model_fn, params = ModelFn.from_module(model, train_lm_head=False)
    trainable, frozen = model_fn.split_params(params)
    tx = optax.sgd(LR)
    state = jax.device_get(train.init_train_state(trainable, tx, seed=0, frozen=frozen))
    return model_fn, tx, state, tokenizer


def _packed_chunked_batch(tokenizer, chunks):
    from gte_jax.data.batching import PairBatchIterator
    from gte_jax.data.pipeline import DEMO_DIR
    from gte_jax.data.sources import SourceOptions, from_files

    options = SourceOptions(query_instruction=TASK, instruction_template="e5", num_negatives=1)
    source = from_files("bible", DEMO_DIR / "bible_finetune.jsonl", options=options)
    it = PairBatchIterator(
        [source], tokenizer, global_batch_size=16, seed=0, query_max_length=128,
        doc_max_length=128, packing=True, pack_groups=2, pack_chunks=chunks,
    )  # fmt: skip
    return next(it)


@pytest.mark.numerics
def test_gradcache_lora_remat_packing_equal_plain_autodiff_on_a_decoder(cache):
    """One SGD step (params after it = init - lr x gradient) with LoRA dropout on: GradCache over
    2 chunks of the chunk-packed batch with per-layer remat == plain autodiff on the same batch
    without remat (both passes replay each chunk's dropout keys), on 2 devices (4 texts per
    device and chunk: rows hold several)."""
    model_dir = next(cache.glob("tiny-mistral-*"))
    plain_fn, tx, state, tokenizer = _decoder_lora_state(model_dir, remat=False)
    remat_fn, _, remat_state, _ = _decoder_lora_state(model_dir, remat=True)
    batch = _packed_chunked_batch(tokenizer, 2)
    assert batch["doc_input_ids"].shape[1] == 2 and "neg_input_ids" in batch  # [rows, chunk, L]
    assert all((batch[f"{r}_segment_ids"].max(-1) > 1).any() for r in ("doc", "neg"))
    mesh = shd.make_mesh(2, 1, jax.devices()[:2])
    results = {}
    for name, fn, st, cached in (
        ("plain", plain_fn, state, False),
        ("gradcache", remat_fn, remat_state, True),
    ):
        step = train.make_train_step(
            fn, tx, loss_name="infonce", loss_kwargs={"temperature": 0.02}, mesh=mesh,
            gradcache=cached, num_chunks=2,
        )  # fmt: skip
        new, metrics = jax.jit(step)(shd.shard_params(st, mesh), shd.global_batch(batch, mesh))
        results[name] = jax.device_get((new, metrics))
    (plain, m_plain), (cached, m_cached) = results["plain"], results["gradcache"]
    assert bool(m_plain["finite"]) and float(m_plain["grad_norm"]) > 1e-3
    # Each LoRA factor's gradient sums over every token of every role, in an order that chunks,
    # remat and the CPU's kernels change: float32 reordering error, n = those tokens.
    tokens = sum(batch[f"{r}_input_ids"].size for r in ("query", "doc", "neg"))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(m_cached[key], m_plain[key], rtol=reorder_rtol(tokens))
    init = _leaves(state["params"])
    for x, y, x0 in zip(_leaves(cached["params"]), _leaves(plain["params"]), init, strict=True):
        gx, gy = (x0 - x) / LR, (x0 - y) / LR
        scale = float(np.abs(gy).max())
        assert scale > 0
        # + the rounding of x0 - LR g to float32, read back through / LR
        atol = reorder_atol(scale, tokens) + 2 * F32_EPS * float(np.abs(x0).max()) / LR
        np.testing.assert_allclose(gx, gy, rtol=0, atol=atol)


def test_untied_lm_head_is_frozen_outside_mntp(cache):
    """A contrastive step never reads the LM head: it is in state["frozen"] (no gradient, no Adam
    moments: ~1.5 GB for Mistral-7B), unchanged by the step; an MNTP stage trains it."""
    from gte_jax import hf
    from gte_jax import workdir as wd
    from gte_jax.defaults import stage_config

    model_dir = next(cache.glob("tiny-mistral-*"))
    model, _ = hf.load_model(model_dir)
    assert model.encoder.lm_head is not None
    tx, _ = train.make_optimizer(stage_config().train, total_steps=4)
    for kind in ("contrastive", "mntp"):
        config = stage_config()
        config.kind = kind
        model_fn, params = ModelFn.from_module(model, train_lm_head=train.trains_lm_head(config))
        trainable, frozen = model_fn.split_params(params)
        state = jax.eval_shape(lambda p, f: train.init_train_state(p, tx, 0, f), trainable, frozen)
        moments = {
            shd.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
        }
        head_moments = [p for p in moments if "lm_head" in p]
        if kind == "mntp":
            assert "lm_head" in trainable["encoder"] and head_moments and not frozen
        else:
            assert "lm_head" not in trainable["encoder"] and not head_moments
            assert set(frozen["encoder"]) == {"lm_head"}
            assert "embed_tokens" in trainable["encoder"]
    # A checkpoint without the head (string layer keys, as orbax restores them) + base_model/.
    full = ModelFn.from_module(model)[1]
    saved = {"encoder": {"layers": {"0": {"mlp": {"up_proj": {"kernel": np.ones((32, 64))}}}}}}
    merged = wd._overlay(full, saved)
    np.testing.assert_array_equal(merged["encoder"]["layers"][0]["mlp"]["up_proj"]["kernel"], 1.0)
    assert merged["encoder"]["lm_head"] is full["encoder"]["lm_head"]


@pytest.mark.parametrize("config_file", [E5, QWEN])
def test_recipes_say_what_their_papers_say(config_file, cache, monkeypatch):
    monkeypatch.setenv("GTE_JAX_CACHE", str(cache))
    c = load_config(config_file)
    assert (c.model.pooling, c.model.append_eos, c.model.lora.enabled) == ("last", True, True)
    assert c.model.attention == ("causal" if config_file == E5 else "bidirectional")
    assert (
        c.data.sources[0]["instruction_template"] == "e5"
        and "doc_instruction" not in (c.data.sources[0])
    )
    assert c.train.gradcache and c.sharding.params == "fsdp" and c.model.remat
    if config_file == E5:
        assert (c.loss.name, c.loss.temperature, c.train.batch_size) == ("infonce", 0.02, 2048)
        assert c.model.lora.rank == 16 and len(c.model.lora.target_modules) == 7
    local = load_config(f"{config_file}:runlocal")
    assert pathlib.Path(local.model.init_from).parent == cache
