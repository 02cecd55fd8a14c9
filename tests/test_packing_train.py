"""Sequence packing in the train step: packed == unpacked on the 8-device mesh."""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from gte_jax import sharding as shd
from gte_jax import train
from gte_jax.data.batching import PairBatchIterator
from gte_jax.data.pipeline import DEMO_DIR
from gte_jax.data.sources import PairRecord, from_files, from_records
from gte_jax.models.bert import EncoderConfig
from gte_jax.models.encoder import BiEncoder


@pytest.fixture(scope="module")
def setup(minilm_dir):
    """One model, state and jitted step for the module: a batch shape another test already ran
    does not trace or compile again."""
    return _setup(minilm_dir)


def _setup(minilm_dir):
    """A 1-layer, 32-wide random BERT with the real MiniLM tokenizer (short compiles), its
    AdamW state and the 8-device mesh."""
    from gte_jax import hf

    assert len(jax.devices()) == 8
    config = EncoderConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    model = BiEncoder(config, pooling="mean", normalize=True, rngs=nnx.Rngs(0))
    tok = hf.load_tokenizer(minilm_dir)
    model_fn, params = train.ModelFn.from_module(model)
    # Plain SGD: params after the step = init - lr x gradient. AdamW's first step is ~lr x sign(g)
    # and clipping rescales, so equal params after them would not mean equal gradients.
    tx = optax.sgd(0.1)
    state = train.init_train_state(params, tx, seed=0)
    mesh = shd.make_mesh()

    step = jax.jit(  # one jit: a batch of an already seen shape does not compile again
        train.make_train_step(
            model_fn,
            tx,
            loss_name="gte",
            loss_kwargs={"temperature": 0.05},
            dropout=False,
            mesh=mesh,
        )
    )

    def run(batch):
        s, m = step(shd.shard_params(jax.device_get(state), mesh), shd.global_batch(batch, mesh))
        return jax.device_get(s), jax.device_get(m)

    return tok, params, run


@pytest.mark.parametrize("rows", ["max_length", "fitted"])
def test_packed_train_step_equals_unpacked_on_8_devices(setup, rows):
    """Dropout off: its masks are drawn per [rows, length] layout, so they differ by layout.
    ``fitted``: rows as long as the primed texts (data.packing_row_length=0), shorter than the
    max length 128 and no multiple of 16."""
    tok, params, run = setup
    max_length = 32 if rows == "max_length" else 128
    kw = dict(global_batch_size=16, seed=0, query_max_length=max_length, doc_max_length=max_length)
    src = [from_files("bible_hn", DEMO_DIR / "bible_finetune.jsonl")]
    padded = PairBatchIterator(src, tok, **kw)
    fit = {"pack_row_length": 0} if rows == "fitted" else {}
    packed = PairBatchIterator(src, tok, packing=True, pack_row_multiple=8, **fit, **kw)
    if rows == "fitted":
        packed.prime_row_floor(1, run_batches=1)
        assert all(n < 128 and n % 16 for n in packed.row_length.values()), packed.row_length

    s_ref, m_ref = run(next(padded))
    s_got, m_got = run(next(packed))
    np.testing.assert_allclose(m_got["loss"], m_ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_got["grad_norm"], m_ref["grad_norm"], rtol=1e-4)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(s_ref["params"]),
        jax.tree.leaves(s_got["params"]),
        strict=True,
    ):
        np.testing.assert_allclose(
            np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )
    # One real update, far beyond the comparison's tolerance (largest element, in tolerances).
    moved = max(
        float((np.abs(np.asarray(x) - np.asarray(y)) / (1e-6 + 1e-4 * np.abs(np.asarray(y)))).max())
        for x, y in zip(jax.tree.leaves(s_got["params"]), jax.tree.leaves(params), strict=True)
    )
    assert moved > 100


def test_train_step_with_records_short_of_negatives(setup):
    """A batch with records short of K negatives trains (padded and packed
    layouts agree), and what stands in for a missing negative does not matter: other token ids
    in the masked slots give the same loss and update."""
    tok, _, run = setup
    rows = [json.loads(x) for x in (DEMO_DIR / "bible_finetune.jsonl").read_text().splitlines()]
    records = [
        PairRecord(r["query"], r["positive"], tuple(r["negatives"]) if i % 3 else ())
        for i, r in enumerate(rows[:16])
    ]  # K = 1 (auto); a third of the records have no negative
    src = [from_records("short", records)]
    assert src[0].num_negatives == 1 and src[0].stats()["records_short_of_negatives"] == 6
    kw = dict(global_batch_size=16, seed=0, query_max_length=32, doc_max_length=32)
    batch = next(PairBatchIterator(src, tok, **kw))
    assert batch["neg_valid"].sum() == 10
    s_ref, m_ref = run(batch)
    assert np.isfinite(m_ref["loss"]) and m_ref["finite"]

    other = dict(batch, neg_input_ids=batch["neg_input_ids"].copy())
    masked = batch["neg_valid"] == 0
    other["neg_input_ids"][masked] = batch["doc_input_ids"][np.nonzero(masked)[0]]  # a positive!
    other["neg_attention_mask"] = np.where(
        masked[..., None], batch["doc_attention_mask"][:, None, :], batch["neg_attention_mask"]
    )
    s_other, m_other = run(other)
    np.testing.assert_allclose(m_other["loss"], m_ref["loss"], rtol=1e-6)
    for x, y in zip(
        jax.tree.leaves(s_ref["params"]), jax.tree.leaves(s_other["params"]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-7)

    packed = next(PairBatchIterator(src, tok, packing=True, pack_row_multiple=8, **kw))
    _, m_packed = run(packed)
    np.testing.assert_allclose(m_packed["loss"], m_ref["loss"], rtol=1e-5)
