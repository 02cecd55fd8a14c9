"""Unsupervised SimCSE (stage kind "simcse"): a text batch is a pair batch of identical texts whose
two views differ only by dropout. Checked here: dropout 0 gives identical views and the loss of
the closed form for identical pairs (NumPy float64, duplicates masked by their strings); with
dropout the views differ, GradCache reuses each view's masks (== plain autodiff), and the masks
are a function of (seed, step) only (1 device == 8 devices); `gte-jax train` with
configs/simcse.py trains a tiny BERT end to end and its export loads in sentence-transformers."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from conftest import child_env
from flax import nnx

from gte_jax import gradcache as gc
from gte_jax import sharding as shd
from gte_jax import train
from gte_jax.data.batching import PairBatchIterator
from gte_jax.data.pipeline import DEMO_DIR
from gte_jax.data.sources import from_texts
from gte_jax.models.bert import EncoderConfig
from gte_jax.models.encoder import BiEncoder

REPO = pathlib.Path(__file__).resolve().parents[1]
TAU = 0.05  # SimCSE's temperature
BATCH = 16


def _texts() -> list[str]:
    """12 distinct news sentences and 4 repeats of some of them: one batch of 16 holds them all,
    so identical strings meet in a batch (they must not be each other's negatives)."""
    lines = (DEMO_DIR / "news_lead_body.jsonl").read_text().splitlines()[:12]
    distinct = [json.loads(line)["query"] for line in lines]
    return distinct + [distinct[0], distinct[0], distinct[5], distinct[11]]


@pytest.fixture(scope="module")
def tok(minilm_dir):
    from gte_jax import hf

    return hf.load_tokenizer(minilm_dir)


def _model(dropout: float):
    """A 1-layer, 32-wide random BERT (short compiles), mean pooling, unit-norm embeddings."""
    config = EncoderConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    return train.ModelFn.from_module(
        BiEncoder(config, pooling="mean", normalize=True, rngs=nnx.Rngs(0))
    )


def _batch(tok, *, packing=False, chunks=1, devices=8):
    it = PairBatchIterator(
        [from_texts("news", _texts())], tok, global_batch_size=BATCH, query_max_length=32,
        doc_max_length=32, packing=packing, pack_groups=devices, pack_chunks=chunks,
    )  # fmt: skip
    plan = it.next_plan()
    return plan, it.materialize(plan)


def _embed(model_fn, mesh, chunks):
    """Both views of a global batch (jitted: one program, not op by op on 8 devices)."""
    embed_fn = train.make_embed_fn(model_fn)
    return jax.jit(
        lambda params, batch, key: gc.embed_batch(embed_fn, params, batch, key, chunks, mesh=mesh)
    )


def _step(model_fn, mesh, **kwargs):
    """The real train step under plain SGD (params after a step carry the gradient itself)."""
    tx = optax.sgd(0.1)
    kwargs = {"loss_name": "infonce", "loss_kwargs": {"temperature": TAU}, **kwargs}
    step = jax.jit(train.make_train_step(model_fn, tx, mesh=mesh, **kwargs))

    def run(params, batches, seed=0):
        state = shd.shard_params(train.init_train_state(params, tx, seed), mesh)
        metrics = []
        for b in batches:
            state, m = step(state, shd.global_batch(b, mesh))
            metrics.append(jax.device_get(m))
        return jax.device_get(state), metrics

    return run


def closed_form(emb: np.ndarray, texts: list[str], loss: str) -> float:
    """The loss of identical views, in float64. With q_i = d_i = e_i (unit), S = E Eᵀ and K_i the
    texts j ≠ i whose string differs from text i (identical strings are masked):
    InfoNCE: L_i = log(e^{1/τ} + Σ_{K_i} e^{S_ij/τ}) − 1/τ; GTE: each of its four sums holds
    Σ_{K_i}, and q→d and d→q the positive too: L_i = log(2e^{1/τ} + 4 Σ_{K_i} e^{S_ij/τ}) − 1/τ."""
    e = emb.astype(np.float64)
    s = e @ e.T
    n = len(texts)
    rows = []
    for i in range(n):
        others = np.exp(s[i, [j for j in range(n) if texts[j] != texts[i]]] / TAU).sum()
        pos = np.exp(s[i, i] / TAU)
        z = pos + others if loss == "infonce" else 2 * pos + 4 * others
        rows.append(np.log(z) - s[i, i] / TAU)
    return float(np.mean(rows))


@pytest.mark.parametrize(
    "loss, packing, chunks",
    [("gte", False, 1), ("infonce", True, 2)],
    ids=["gte-padded", "infonce-packed-gradcache"],
)
def test_dropout_0_gives_identical_views_and_the_closed_form_loss(tok, loss, packing, chunks):
    model_fn, params = _model(dropout=0.0)
    mesh = shd.make_mesh()
    plan, batch = _batch(tok, packing=packing, chunks=chunks)
    assert plan.queries == plan.docs == [plan.queries[i] for i in range(BATCH)]
    assert len(set(plan.queries)) == 12  # the repeats are in this batch
    # Dropout keys are drawn (dropout=True) but the rates are 0: the views must be equal.
    emb = _embed(model_fn, mesh, chunks)(params, shd.global_batch(batch, mesh), jax.random.key(3))
    q, d = np.asarray(emb["query"]), np.asarray(emb["doc"])
    np.testing.assert_array_equal(q, d)
    run = _step(model_fn, mesh, loss_name=loss, num_chunks=chunks, gradcache=chunks > 1)
    _, (m,) = run(params, [batch])
    expected = closed_form(q, plan.queries, loss)
    np.testing.assert_allclose(m["loss"], expected, rtol=2e-6)
    # The masking matters: treating the repeats as negatives gives another number.
    unmasked = closed_form(q, [f"{i}" for i in range(BATCH)], loss)
    assert abs(unmasked - expected) > 1e-3
    assert m["accuracy"] == 1.0  # each view finds its twin: a repeat never outranks it


def test_dropout_views_differ_and_gradcache_keeps_each_views_masks(tok):
    """Dropout 0.3 (LLM2Vec's): the query and doc views of one text get different masks; pass 2
    of GradCache sees pass 1's masks, so it equals plain autodiff on the same chunks (packed
    GradCache layout, 8 devices)."""
    model_fn, params = _model(dropout=0.3)
    mesh = shd.make_mesh()
    _, batch = _batch(tok, packing=True, chunks=2)
    gbatch, embed = shd.global_batch(batch, mesh), _embed(model_fn, mesh, 2)
    key = jax.random.key(0)
    views, again = embed(params, gbatch, key), embed(params, gbatch, key)
    q, d = np.asarray(views["query"]), np.asarray(views["doc"])
    np.testing.assert_array_equal(q, np.asarray(again["query"]))  # same key, same masks
    np.testing.assert_array_equal(d, np.asarray(again["doc"]))
    cos = np.sum(q * d, axis=1)
    assert np.all(cos < 1 - 1e-4), cos  # every text's two views differ: dropout, distinct keys

    plain, mp = _step(model_fn, mesh, num_chunks=2, gradcache=False)(params, [batch])
    cached, mc = _step(model_fn, mesh, num_chunks=2, gradcache=True)(params, [batch])
    np.testing.assert_allclose(mc[0]["loss"], mp[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(mc[0]["grad_norm"], mp[0]["grad_norm"], rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(cached["params"]), jax.tree.leaves(plain["params"]), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert mp[0]["grad_norm"] > 0 and mp[0]["loss"] > 0


def test_dropout_masks_are_a_function_of_seed_and_step_on_1_and_8_devices(tok):
    """Two SimCSE GradCache steps with dropout on 1 device and on 8 give the same losses and
    params: the masks depend on (seed, step), not on the device count (GradCache == plain with
    the same masks: the test above). Another seed gives other numbers."""
    model_fn, params = _model(dropout=0.3)
    _, b0 = _batch(tok)
    it_batches = [b0, _batch(tok)[1]]
    kw = dict(num_chunks=2, gradcache=True)
    one = shd.make_mesh(devices=jax.devices()[:1])
    s1, m1 = _step(model_fn, one, **kw)(params, it_batches)
    run8 = _step(model_fn, shd.make_mesh(), **kw)
    s8, m8 = run8(params, it_batches)
    for a, b in zip(m1, m8, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s8["params"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert m8[0]["loss"] != m8[1]["loss"]  # the same batch, the next step: new masks
    _, other_seed = run8(params, it_batches, seed=1)
    assert abs(float(other_seed[0]["loss"]) - float(m8[0]["loss"])) > 1e-4


@pytest.mark.slow  # a `gte-jax train` process: ~30 s of CPU
def test_gte_jax_train_simcse_end_to_end_and_export_round_trip(tiny_model_dir, tmp_path):
    """`gte-jax train --config configs/simcse.py:runlocal` on a tiny BERT with a TXT file and the
    bundled news sentences (a JSONL text field): the loss goes down, the summary counts both
    sources, and the export loads in sentence-transformers with gte-jax's embeddings."""
    from sentence_transformers import SentenceTransformer

    from gte_jax import hf
    from gte_jax.encode import Embedder

    lines = (DEMO_DIR / "bible_kjv_web_ot.jsonl").read_text().splitlines()[:400]
    corpus = tmp_path / "verses.txt"
    corpus.write_text("".join(json.loads(line)["query"] + "\n" for line in lines) + "\n\n")
    workdir = tmp_path / "run"
    # One CPU device (a shorter compile than 8 fake ones): its own process.
    env = {**child_env(1), "GTE_JAX_COMPILATION_CACHE": ""}
    out = subprocess.run(
        [sys.executable, "-m", "gte_jax.cli", "train",
         "--config", str(REPO / "configs" / "simcse.py") + ":runlocal",
         "--workdir", str(workdir), f"--config.model.init_from={tiny_model_dir}",
         f"--config.data.text_files={corpus}", "--config.train.num_steps=24",
         "--config.train.learning_rate=2e-3", "--config.train.progress_bar=false",
         "--log_level=WARNING"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 24
    assert summary["sources"]["verses"]["used"] == 400
    assert summary["sources"]["news"]["used"] == 150
    logged = [json.loads(x) for x in (workdir / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in logged if "train/loss" in r]
    assert len(losses) == 24
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < first - 0.3, losses

    export = pathlib.Path(summary["export"])
    texts = ["In the beginning God created the heaven and the earth.", "naïve café ☕", "x"]
    model, tokenizer, _ = hf.load_pretrained(export)
    ours = Embedder(model, tokenizer).encode(texts)
    st = SentenceTransformer(str(export), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(st, ours, atol=1e-5)
    base, base_tok, _ = hf.load_pretrained(tiny_model_dir)
    assert np.abs(Embedder(base, base_tok).encode(texts) - ours).max() > 1e-3  # it trained
