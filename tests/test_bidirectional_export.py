"""Bidirectional Llama / Qwen2 exports (gte_jax/hf_bidirectional.py): sentence-transformers with
``trust_remote_code=True`` embeds as ``gte-jax`` does; without it, loading raises instead of
running the model causal; gte-jax reads the export back from its config alone (the shipped Python
is never run), and causal exports stay plain.

Tiny random models are built with transformers' own config classes (tests/tiny_models.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers
from tiny_models import tiny_decoder_dir

from gte_jax import hf, hf_bidirectional, plan
from gte_jax import workdir as wd
from gte_jax.encode import Embedder

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "Jesus wept.",
    "And God said, Let there be light: and there was light, and it was good.",
]
# float32 on both sides, a 2-layer model: ours and torch's agree to ~1e-7 (measured 0.99999994).
MIN_COS = 0.99999


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture
def offline(monkeypatch):
    """No network; no interactive remote-code prompt (transformers' CI setting)."""
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(dmu, "TIME_OUT_REMOTE_CODE", 0)


def _export(tmp_path, family, causal_lm, attention, **overrides):
    source = tiny_decoder_dir(tmp_path, family, causal_lm=causal_lm, **overrides)
    model, tokenizer, info = hf.load_pretrained(source, attention=attention)
    model.pooling = "last"
    model.normalize = True
    tokenizer.padding_side = "left"  # pads before the short texts: the mask matters
    # One directory name per family: transformers imports remote code by the directory's name.
    out = tmp_path / f"export_{family}_{attention}_{len(overrides)}"
    return hf.export_pretrained(model, tokenizer, out, info=info)


@pytest.mark.parametrize(
    "family,causal_lm,overrides",
    [
        ("qwen2", True, {}),
        ("llama", False, {}),
        ("qwen2", False, {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    ],
)
def test_sentence_transformers_with_remote_code_equals_gte_jax(
    tmp_path, offline, family, causal_lm, overrides
):
    from sentence_transformers import SentenceTransformer

    export = _export(tmp_path, family, causal_lm, "bidirectional", **overrides)
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == f"gte_jax_bidirectional_{family}"
    assert (export / f"{hf_bidirectional.MODULE}.py").exists()

    ours = Embedder.from_pretrained(str(export)).encode(TEXTS)
    st = SentenceTransformer(str(export), device="cpu", trust_remote_code=True)
    theirs = st.encode(TEXTS, convert_to_numpy=True)
    assert _cos(ours, theirs).min() >= MIN_COS, _cos(ours, theirs)

    # The same weights run causal embed differently: the comparison above can fail.
    causal, tok, _ = hf.load_pretrained(export, attention="causal")
    assert _cos(Embedder(causal, tok).encode(TEXTS), theirs).min() < MIN_COS

    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(export), device="cpu")
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModel.from_pretrained(export)


def test_gte_jax_reads_its_export_without_running_the_shipped_code(tmp_path):
    """encode and a later stage's ``model.init_from`` read the attention kind from config.json;
    a modeling file that would fail on import changes nothing. A foreign ``auto_map`` is still
    refused."""
    export = _export(tmp_path, "llama", False, "bidirectional")
    before = Embedder.from_pretrained(str(export)).encode(TEXTS)
    (export / f"{hf_bidirectional.MODULE}.py").write_text("raise SystemExit('never run')\n")
    model, _, info = wd.load_model(str(export))
    assert model.config.model_type == "llama" and model.config.attention == "bidirectional"
    assert plan._config_json_of(export)["model_type"] == "llama"  # `gte-jax plan` reads it too
    np.testing.assert_array_equal(Embedder.from_pretrained(str(export)).encode(TEXTS), before)

    again = hf.export_pretrained(model, hf.load_tokenizer(export), tmp_path / "again", info=info)
    assert json.loads((again / "config.json").read_text()) == json.loads(
        (export / "config.json").read_text()
    )

    config = json.loads((export / "config.json").read_text())
    config["auto_map"]["AutoModel"] = "modeling_other.OtherModel"
    (export / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="auto_map"):
        hf.load_model(export)


def test_causal_exports_stay_plain(tmp_path, offline):
    from sentence_transformers import SentenceTransformer

    export = _export(tmp_path, "mistral", True, "causal")
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "mistral" and "auto_map" not in config
    assert not (export / f"{hf_bidirectional.MODULE}.py").exists()
    theirs = SentenceTransformer(str(export), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert _cos(Embedder.from_pretrained(str(export)).encode(TEXTS), theirs).min() >= MIN_COS
