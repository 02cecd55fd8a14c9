"""Scanned layers (gte_jax/models/scan.py): a tower with ``scan_layers`` computes what the unrolled
tower computes, forward and gradients, for BERT, T5 and the decoder (Gemma3's interleaved sliding
and full layers), with dropout, remat, packing and LoRA; HF load -> scanned -> export is still
transformers' model; sharding, LoRA export and checkpoints see the stacked layout.

The two towers run the same float32 maths in another loop structure, so they may differ by the
reordering XLA is free to do inside each layer (tests/numerics.py: n eps of the scale, n the
longest reduction times the depth); a wrong key, layer order or mask moves outputs by O(1).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from numerics import reorder_atol
from safetensors.numpy import load_file
from tiny_models import tiny_decoder_dir, tiny_tokenizer

from gte_jax import hf, sharding, workdir
from gte_jax.checkpoint import Checkpointer, CheckpointError
from gte_jax.models import lora, scan
from gte_jax.models.bert import EncoderConfig, TransformerEncoder
from gte_jax.models.decoder import DecoderConfig, DecoderTower
from gte_jax.models.t5 import T5Encoder, T5EncoderConfig

BERT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=24)  # fmt: skip
T5 = dict(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=10,
          feed_forward_proj="gated-gelu")  # fmt: skip
GEMMA_TYPES = ("sliding_attention", "full_attention")
GEMMA = dict(model_type="gemma3_text", vocab_size=64, hidden_size=16, intermediate_size=32,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
             hidden_act="gelu_pytorch_tanh", qk_norm=True, gemma=True, query_pre_attn_scalar=4.0,
             layer_types=GEMMA_TYPES, sliding_window=3, attention="bidirectional",
             rope=(("full_attention", (("rope_theta", 10000.0), ("rope_type", "default"))),
                   ("sliding_attention", (("rope_theta", 100.0), ("rope_type", "default")))))  # fmt: skip
TOWERS = {
    "bert": (EncoderConfig, TransformerEncoder, BERT),
    "t5": (T5EncoderConfig, T5Encoder, T5),
    "gemma3": (DecoderConfig, DecoderTower, GEMMA),
}
DROPOUT = {"bert": {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1},
           "t5": {"dropout_rate": 0.1}, "gemma3": {"hidden_dropout": 0.1, "attention_dropout": 0.1}}  # fmt: skip


def _towers(name: str, **overrides):
    """(unrolled, scanned) towers of one architecture, the scanned one holding the unrolled one's
    parameters stacked."""
    config_cls, tower_cls, fields = TOWERS[name]
    config = config_cls(**{**fields, **overrides})
    # Random NumPy parameters into abstract towers: no init program to compile.
    unrolled = nnx.eval_shape(lambda: tower_cls(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(unrolled)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), state)
    unrolled = nnx.merge(graphdef, state)
    scanned = nnx.eval_shape(
        lambda: tower_cls(dataclasses.replace(config, scan_layers=True), rngs=nnx.Rngs(1))
    )
    _copy_stacked(unrolled, scanned)
    return unrolled, scanned


def _pure(module) -> dict:
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def _stacked(pure: dict) -> dict:
    return {**pure, "layers": scan.stack_saved(pure["layers"])}


def _copy_stacked(unrolled, scanned) -> None:
    state = nnx.state(scanned, nnx.Param)
    state.replace_by_pure_dict(_stacked(_pure(unrolled)))
    nnx.update(scanned, state)


def _batch(packed: bool):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 64, (2, 9)), jnp.int32)
    if packed:
        segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 2, 2, 0]])
        return ids, (segments > 0).astype(jnp.int32), {"segment_ids": segments}
    mask = jnp.asarray([[1] * 9, [1] * 6 + [0] * 3], jnp.int32)
    return ids, mask, {}


def _forward_and_grads(tower, ids, mask, kwargs, weights, dropout_rng):
    graphdef, params = nnx.split(tower, nnx.Param)

    def loss(p):
        hidden = nnx.merge(graphdef, p)(ids, mask, dropout_rng=dropout_rng, **kwargs)
        return jnp.sum(hidden.astype(jnp.float32) * weights), hidden

    (_, hidden), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(hidden), nnx.to_pure_dict(grads)


def _tolerance(ref: np.ndarray, tower) -> float:
    cfg = tower.config
    width = max(getattr(cfg, "intermediate_size", 0), getattr(cfg, "d_ff", 0))
    return reorder_atol(float(np.abs(ref).max()), width * cfg.num_hidden_layers)


def _assert_same(unrolled, scanned, *, packed=False, dropout=False):
    ids, mask, kwargs = _batch(packed)
    weights = jax.random.normal(jax.random.key(7), (*ids.shape, unrolled.config.hidden_size))
    key = jax.random.key(3) if dropout else None
    h0, g0 = _forward_and_grads(unrolled, ids, mask, kwargs, weights, key)
    h1, g1 = _forward_and_grads(scanned, ids, mask, kwargs, weights, key)
    np.testing.assert_allclose(h1, h0, rtol=0, atol=_tolerance(h0, unrolled))
    flat0 = dict(nnx.to_flat_state(nnx.State(_stacked(g0))))
    flat1 = dict(nnx.to_flat_state(nnx.State(g1)))
    assert flat0.keys() == flat1.keys()
    # One scale for every gradient: a bias whose gradient cancels to ~0 (a key bias under
    # softmax) is still a sum of terms of that size.
    scale = max(np.abs(np.asarray(g)).max() for g in flat0.values())
    assert scale > 0
    for path, g in flat0.items():
        atol = _tolerance(np.asarray(scale), unrolled)
        np.testing.assert_allclose(flat1[path], g, rtol=0, atol=atol, err_msg=str(path))


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_scanned_equals_unrolled_with_dropout_remat_and_packing(name):
    """Forward and every gradient on packed rows (segment masks); dropout keys per layer as the
    unrolled loop draws them (a key given to the wrong layer moves the output by O(1)); remat
    inside the scan. Gemma3: a sliding and a full layer, each with its own mask and RoPE."""
    unrolled, scanned = _towers(name, remat=True, **DROPOUT[name])
    _assert_same(unrolled, scanned, packed=True, dropout=True)


def test_scanned_init_is_the_unrolled_init_stacked():
    config = EncoderConfig(**{**BERT, "num_hidden_layers": 3})
    unrolled = _pure(TransformerEncoder(config, rngs=nnx.Rngs(0)))
    scanned = _pure(TransformerEncoder(dataclasses.replace(config, scan_layers=True),
                                       rngs=nnx.Rngs(0)))  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, scanned, _stacked(unrolled))
    assert scanned["layers"]["query"]["kernel"].shape == (3, 16, 16)


def _lora(tower, rank=2):
    targets = ("q_proj", "o_proj", "down_proj")  # attention in and out, MLP
    lora.inject(tower, lora.LoRAConfig(rank=rank, alpha=4.0, target_modules=targets),
                rngs=nnx.Rngs(5))  # fmt: skip
    for _, layer in lora.lora_layers(tower):  # B = 0 would hide the LoRA path
        layer.lora_b[...] = jax.random.normal(jax.random.key(9), layer.lora_b.shape) * 0.1


def test_lora_scanned_equals_unrolled_and_merges_alike():
    unrolled, scanned = _towers("gemma3")
    _lora(unrolled)
    _lora(scanned)
    assert scanned.layers.self_attn.q_proj.lora_a.shape == (2, 16, 2)
    _copy_stacked(unrolled, scanned)
    _assert_same(unrolled, scanned)
    merged = _pure(lora.merge(scanned))
    reference = _stacked(_pure(lora.merge(unrolled)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), merged,
                 reference)  # fmt: skip


def test_sharding_keeps_the_layer_axis_whole():
    """Each stacked leaf (and LoRA factor) is split like one layer's leaf, its layer axis not."""
    unrolled, scanned = _towers("gemma3")
    _lora(unrolled)
    _lora(scanned)
    mesh = {"data": 2, "model": 2}
    rows = dict(nnx.to_flat_state(nnx.state(unrolled, nnx.Param)))
    for path, leaf in nnx.to_flat_state(nnx.state(scanned, nnx.Param)):
        text = "params/" + "/".join(map(str, path))
        spec = sharding.leaf_spec(text, leaf.shape, mesh, "fsdp_tp")
        if path[0] != "layers":
            continue
        row = (path[0], 0) + path[1:]
        row_spec = sharding.leaf_spec(
            "params/" + "/".join(map(str, row)), rows[row].shape, mesh, "fsdp_tp"
        )
        assert sharding.logical_axes(text, leaf.ndim)[0] == scan.LAYERS
        assert tuple(spec) == (None, *row_spec), text


def test_fsdp_never_splits_the_layer_axis():
    """A stack deeper than its layers are wide: FSDP picks the widest dim, never the stack's."""
    spec = sharding.leaf_spec("params/encoder/layers/query/kernel", (64, 16, 8), {"data": 4,
                              "model": 1}, "fsdp")  # fmt: skip
    assert tuple(spec) == (None, "data", None)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return tiny_decoder_dir(
        tmp_path_factory.mktemp("scan"), "gemma3_text", causal_lm=False,
        num_hidden_layers=3, layer_types=[*GEMMA_TYPES, "sliding_attention"],
    )  # fmt: skip


def test_hf_load_scanned_export_is_transformers_model(gemma_dir, tmp_path):
    """HF weights -> scanned tower == transformers' hidden states; the export writes back the
    very tensors, and its LoRA adapter names every layer's modules as the unrolled one does."""
    model, info = hf.load_model(gemma_dir, scan_layers=True)
    assert model.encoder.layers.self_attn.q_proj.kernel.shape[0] == 3  # the layers are stacked
    tok = tiny_tokenizer()
    batch = tok(["What is AI?", "A new blaze near Goulburn closed the Hume Highway."],
                padding=True, return_tensors="np")  # fmt: skip
    ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
    got = np.asarray(model.encoder(jnp.asarray(ids), jnp.asarray(mask)))
    torch_model = transformers.AutoModel.from_pretrained(gemma_dir, attn_implementation="eager")
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0) * mask
    with torch.no_grad():
        ref = torch_model.eval()(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).last_hidden_state.numpy()  # fmt: skip
    real = mask.astype(bool)
    assert np.abs(got - ref)[real].max() <= 1e-5
    out = hf.export_pretrained(model, tok, tmp_path / "export", info=info, lm_head=False)
    source, written = (
        load_file(gemma_dir / hf.SAFETENSORS_FILE),
        load_file(out / hf.SAFETENSORS_FILE),
    )
    assert source.keys() == written.keys()
    for name, tensor in source.items():
        np.testing.assert_array_equal(written[name], tensor, err_msg=name)
    plain, _ = hf.load_model(gemma_dir)
    for m in (plain, model):
        lora.inject(m, lora.LoRAConfig(rank=2, alpha=4.0, target_modules=("q_proj",)),
                    rngs=nnx.Rngs(0))  # fmt: skip
    a = hf.export_lora_adapter(plain, tmp_path / "plain_adapter")
    b = hf.export_lora_adapter(model, tmp_path / "scan_adapter")
    shapes = {k: v.shape for k, v in load_file(a / hf.PEFT_WEIGHTS_FILE).items()}
    assert {k: v.shape for k, v in load_file(b / hf.PEFT_WEIGHTS_FILE).items()} == shapes
    assert len(shapes) == 2 * 3


def test_checkpoints_convert_for_export_and_refuse_a_mixed_resume(tmp_path):
    unrolled, scanned = _towers("bert")
    saved = _pure(unrolled)
    saved = {**saved, "layers": {str(k): v for k, v in saved["layers"].items()}}  # as restored
    over = workdir._overlay(_pure(scanned), saved)
    jax.tree.map(np.testing.assert_array_equal, over, _stacked(_pure(unrolled)))
    back = workdir._overlay(_pure(unrolled), _pure(scanned))
    jax.tree.map(np.testing.assert_array_equal, back, _pure(unrolled))
    ckpt = Checkpointer(tmp_path / "ckpt", every_steps=1)
    ckpt.save(1, {"params": _pure(unrolled)}, {"seen": 1}, force=True)
    ckpt.wait()
    with pytest.raises(CheckpointError, match="scan_layers=false.*scan_layers=true"):
        ckpt.restore({"params": _pure(scanned)})
    ckpt.close()
