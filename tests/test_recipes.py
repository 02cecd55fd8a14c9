"""Full-size recipes checked without memory (gemma-style `jax.eval_shape`): the GTE-base stage-1
step at batch 16384 with GradCache traces end to end, with BERT-base's real parameter count; the
7B decoder recipes (E5-mistral, gte-Qwen2: LoRA, GradCache, remat) likewise."""

from __future__ import annotations

import os
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
from gte_jax.training import loop

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


# 7B decoder recipes: the published shapes (transformers' config classes, plan.KNOWN_MODELS) as
# *ForCausalLM checkpoints (untied LM head), traced abstractly.
LLM_RECIPES = [
    ("e5_mistral.py", "mistral-7b", "MistralForCausalLM"),
    ("gte_qwen2.py", "qwen2-7b", "Qwen2ForCausalLM"),
]


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("config_file, shape, architecture", LLM_RECIPES)
def test_llm_recipe_step_traces_at_full_size(config_file, shape, architecture):
    """The E5-mistral / gte-Qwen2 step (LoRA r=16 on q/k/v/o/gate/up/down, batch 2048 with one
    hard negative, seq 512, GradCache chunks of 64, bf16, remat) traces at 7B; the frozen base is
    transformers' parameter count, the trainable part is LoRA's closed form (E5-mistral: 41.9M),
    and the LM head is frozen (no Adam moments)."""
    torch = pytest.importorskip("torch")
    import transformers

    from gte_jax import plan

    cfg = load_config(CONFIGS / config_file)
    hf_config = plan._decoder_configs()[shape]
    with torch.device("meta"):
        expected = sum(
            p.numel() for p in getattr(transformers, architecture)(hf_config).parameters()
        )
    enc = plan.encoder_config({**hf_config.to_dict(), "architectures": [architecture]}, cfg.model)
    abstract = nnx.eval_shape(
        lambda: plan._with_lora(
            BiEncoder(enc, pooling=cfg.model.pooling, normalize=True, rngs=nnx.Rngs(0)), cfg
        )
    )
    model_fn, params = train.ModelFn.from_module(abstract, train_lm_head=train.trains_lm_head(cfg))
    trainable, frozen = model_fn.split_params(params)
    assert _count(frozen) == expected and "lm_head" in frozen["encoder"]
    h = hf_config.hidden_size
    head_dim = getattr(hf_config, "head_dim", None) or h // hf_config.num_attention_heads
    kv = hf_config.num_key_value_heads * head_dim
    m, r = hf_config.intermediate_size, int(cfg.model.lora.rank)
    per_layer = r * (2 * (h + h) + 2 * (h + kv) + 3 * (h + m))  # q, o; k, v; gate, up, down
    assert _count(trainable) == hf_config.num_hidden_layers * per_layer
    if shape == "mistral-7b":
        assert _count(trainable) == 41_943_040

    tx, _ = train.make_optimizer(cfg.train, 1000)
    state = jax.eval_shape(lambda p, f: train.init_train_state(p, tx, 0, f), trainable, frozen)
    b, length, k = int(cfg.train.batch_size), int(cfg.data.doc_max_length), 1
    ids = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    batch = {"query_text_id": ids(b), "doc_text_id": ids(b), "valid": ids(b)}
    batch |= {"neg_text_id": ids(b, k), "neg_valid": ids(b, k)}
    for role, extra in (("query", ()), ("doc", ()), ("neg", (k,))):
        for key in ("input_ids", "attention_mask"):
            batch[f"{role}_{key}"] = ids(b, *extra, length)
    step = train.make_train_step(
        model_fn,
        tx,
        loss_name=cfg.loss.name,
        loss_kwargs={"temperature": cfg.loss.temperature},
        gradcache=True,
        num_chunks=b // int(cfg.train.gradcache_chunk_size),
    )
    new_state, metrics = jax.eval_shape(step, state, batch)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32


def test_two_stage_recipe_runs_locally_and_points_at_the_suite(tiny_model_dir, tmp_path):
    """configs/two_stage.py: the full recipe reads the quality suite's train splits (stage 2 from
    stage 1, negatives mined into bible_ot/train_mined.jsonl); ``:weak`` is stage 1 alone; and
    ``:runlocal`` trains both stages end to end on a tiny model in seconds, stage 2 on pairs with
    negatives, its export interpolated with the base as the interpolation lever does."""
    full = load_config(CONFIGS / "two_stage.py")
    assert list(full.stages) == ["weak", "indomain"]
    suite = pathlib.Path(os.environ.get("GTE_JAX_QUALITY_DIR", "~/.cache/gte_jax_quality"))
    suite = suite.expanduser() / "full"
    assert full.weak.data.train_files == str(suite / "wiki_lead" / "train.jsonl")
    assert full.indomain.data.train_files == str(suite / "bible_ot" / "train_mined.jsonl")
    assert full.indomain.model.init_from == "stage:weak"
    assert list(load_config(f"{CONFIGS / 'two_stage.py'}:weak").stages) == ["weak"]
    with pytest.raises(ValueError, match="variants"):
        load_config(f"{CONFIGS / 'two_stage.py'}:nope")
    config = load_config(
        f"{CONFIGS / 'two_stage.py'}:runlocal",
        [f"--config.weak.model.init_from={tiny_model_dir}",
         f"--config.indomain.export.interpolate_from={tiny_model_dir}",
         "--config.indomain.export.interpolate_weight=0.5",
         # what runs, not dropout: its random bits are ~1/3 of a compile
         "--config.weak.model.dropout=0", "--config.indomain.model.dropout=0"],
    )  # fmt: skip
    weak, indomain = loop.run(config, tmp_path / "run")
    assert weak["completed"] and indomain["completed"] and indomain["steps"] == 2
    assert list(indomain["sources"]) == ["bible_finetune"]
    assert (tmp_path / "run" / "indomain" / "export" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "weak" / "export").exists()  # runlocal: stage 1 not exported
