"""Sequence packing in the train step: packed == unpacked on the 8-device mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gte_jax import sharding as shd
from gte_jax import train
from gte_jax.data.batching import PairBatchIterator
from gte_jax.data.pipeline import DEMO_DIR
from gte_jax.data.sources import from_files
from gte_jax.models.bert import EncoderConfig
from gte_jax.models.encoder import BiEncoder


def test_packed_train_step_equals_unpacked_on_8_devices(minilm_dir):
    """Dropout off: its masks are drawn per [rows, length] layout, so they differ by layout.

    A 1-layer, 32-wide random BERT with the real MiniLM tokenizer: short compiles."""
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
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(0)),
    }
    mesh = shd.make_mesh()
    kw = dict(global_batch_size=16, seed=0, query_max_length=32, doc_max_length=32)
    src = [from_files("bible_hn", DEMO_DIR / "bible_finetune.jsonl")]
    padded = PairBatchIterator(src, tok, **kw)
    packed = PairBatchIterator(src, tok, packing=True, pack_row_multiple=8, **kw)

    def run(iterator):
        step = jax.jit(
            train.make_train_step(
                model_fn,
                tx,
                loss_name="gte",
                loss_kwargs={"temperature": 0.05},
                dropout=False,
                mesh=mesh,
            )
        )
        s, m = step(
            shd.shard_params(jax.device_get(state), mesh), shd.global_batch(next(iterator), mesh)
        )
        return jax.device_get(s), jax.device_get(m)

    s_ref, m_ref = run(padded)
    s_got, m_got = run(packed)
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
