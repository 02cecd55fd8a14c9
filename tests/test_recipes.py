"""Full-size recipes checked without memory (gemma-style `jax.eval_shape`): the GTE-base stage-1
step at batch 16384 with GradCache traces end to end, with BERT-base's real parameter count."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gte_jax import train
from gte_jax.config import load_config
from gte_jax.models.bert import EncoderConfig
from gte_jax.models.encoder import BiEncoder

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
BERT_BASE = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
)


def _abstract_bert_base(dtype, remat):
    config = EncoderConfig(**BERT_BASE, dtype=jnp.dtype(dtype), remat=remat)
    return nnx.eval_shape(lambda: BiEncoder(config, rngs=nnx.Rngs(0)))


def test_bert_base_parameter_count_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        ref = BertModel(BertConfig(**BERT_BASE), add_pooling_layer=False)
    expected = sum(p.numel() for p in ref.parameters())
    _, params = train.ModelFn.from_module(_abstract_bert_base("float32", False))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == expected


@pytest.mark.parametrize(
    "config_file, with_negatives",
    [("gte_base_pretrain.py", False), ("gte_base_finetune.py", True)],
)
def test_gte_base_recipe_step_traces_at_full_size(config_file, with_negatives):
    cfg = load_config(CONFIGS / config_file)
    model_fn, params = train.ModelFn.from_module(
        _abstract_bert_base(cfg.model.dtype, cfg.model.remat)
    )
    tx, _ = train.make_optimizer(cfg.train, int(cfg.train.num_steps))
    state = jax.eval_shape(lambda p: train.init_train_state(p, tx, seed=0), params)
    b, lq, ld = (
        int(cfg.train.batch_size),
        int(cfg.data.query_max_length),
        int(cfg.data.doc_max_length),
    )
    ids = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    chunk = int(cfg.train.gradcache_chunk_size)
    chunks = b // chunk if cfg.train.gradcache and chunk else 1
    k = 1 if with_negatives else 0
    batch = {"query_text_id": ids(b), "doc_text_id": ids(b), "valid": ids(b)}
    if with_negatives:
        batch |= {"neg_text_id": ids(b, k), "neg_valid": ids(b, k)}
    roles = [("query", lq, ()), ("doc", ld, ())] + ([("neg", ld, (k,))] if k else [])
    for role, length, extra in roles:
        if not cfg.data.packing:  # padded: [B, (K,) L]
            for key in ("input_ids", "attention_mask"):
                batch[f"{role}_{key}"] = ids(b, *extra, length)
            continue
        # Packed (docs/design.md): the worst case of the layout, one text per row.
        n = b * max(k, 1) if role == "neg" else b
        if chunks > 1:  # chunked: rows [R, C, L], slots [S, C], chunk_index in example order
            rows, slots = (n // chunks, chunks, length), (n // chunks, chunks)
        else:
            rows, slots = (n, length), (n,)
        for key in ("input_ids", "attention_mask", "segment_ids", "position_ids"):
            batch[f"{role}_{key}"] = ids(*rows)
        if chunks > 1:
            batch[f"{role}_slot_index"] = ids(*slots)
            batch[f"{role}_chunk_index"] = ids(b, *extra)
        else:
            batch[f"{role}_slot_index"] = ids(b, *extra)
    step = train.make_train_step(
        model_fn,
        tx,
        loss_name=cfg.loss.name,
        loss_kwargs={"temperature": cfg.loss.temperature},
        gradcache=bool(cfg.train.gradcache),
        num_chunks=chunks,
    )
    new_state, metrics = jax.eval_shape(step, state, batch)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for new, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
        assert (new.shape, new.dtype) == (old.shape, old.dtype)
    assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
