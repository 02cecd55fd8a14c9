"""`--dim` (Matryoshka truncation) in gte-jax encode / eval and sentence-transformers'
``truncate_dim`` in the export: one rule, checked against SentenceTransformer on real text."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gte_jax import cli, hf
from gte_jax.encode import Embedder

TEXTS = [
    "The cat sat quietly on the warm windowsill.",
    "Stock markets fell sharply after the announcement.",
    "A recipe for sourdough needs flour, water, salt and time.",
    "ünïcödé 東京 🎉",
    "How do I reset my password?",
]
DIM = 16  # the tiny model (conftest) is 32 wide


def _cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def _encode_cli(model, tmp_path, *extra) -> np.ndarray:
    source, output = tmp_path / "texts.txt", tmp_path / "out.npy"
    source.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    argv = ["encode", "--model", str(model), "--input", str(source), "--output", str(output)]
    assert cli.main(argv + list(extra)) == 0
    return np.load(output)


@pytest.fixture(scope="module")
def truncated_export(tiny_model_dir, tmp_path_factory):
    """The tiny model re-exported with ``truncate_dim`` = DIM (what ``gte-jax export --dim``
    writes through ``workdir.export_workdir``)."""
    model, tokenizer, info = hf.load_pretrained(tiny_model_dir)
    info.truncate_dim = DIM
    return hf.export_pretrained(model, tokenizer, tmp_path_factory.mktemp("dim"), info=info)


def test_encode_dim_agrees_with_sentence_transformers_truncate_dim(tiny_model_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    ours = _encode_cli(tiny_model_dir, tmp_path, "--dim", str(DIM))
    assert ours.shape == (len(TEXTS), DIM)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    st = SentenceTransformer(str(tiny_model_dir), device="cpu", truncate_dim=DIM)
    theirs = st.encode(TEXTS, convert_to_numpy=True)
    assert theirs.shape == ours.shape
    assert np.all(_cosines(ours, theirs) >= 1 - 1e-6)
    # Not a trivially equal prefix: the full embeddings' cosine with their prefixes is below 1.
    full = _encode_cli(tiny_model_dir, tmp_path)
    assert full.shape == (len(TEXTS), 32)
    assert np.all(_cosines(full[:, :DIM], ours) >= 1 - 1e-6)
    assert np.linalg.norm(full[:, :DIM], axis=1).max() < 1 - 1e-3


def test_the_export_writes_truncate_dim_and_both_sides_read_it(
    tiny_model_dir, truncated_export, tmp_path
):
    from sentence_transformers import SentenceTransformer

    config = json.loads((truncated_export / "config_sentence_transformers.json").read_text())
    assert config["truncate_dim"] == DIM
    theirs = SentenceTransformer(str(truncated_export), device="cpu").encode(TEXTS)
    ours = _encode_cli(truncated_export, tmp_path)  # no --dim: the export's truncate_dim
    assert ours.shape == theirs.shape == (len(TEXTS), DIM)
    assert np.all(_cosines(ours, theirs) >= 1 - 1e-6)
    # The untruncated export with truncate_dim given to SentenceTransformer says the same.
    st = SentenceTransformer(str(tiny_model_dir), device="cpu", truncate_dim=DIM)
    assert np.all(_cosines(ours, st.encode(TEXTS)) >= 1 - 1e-6)
    # A re-export keeps it; an explicit --dim overrides it.
    assert Embedder.from_pretrained(truncated_export).truncate_dim == DIM
    assert _encode_cli(truncated_export, tmp_path, "--dim", "8").shape == (len(TEXTS), 8)


def test_a_dim_the_model_does_not_have_exits_2(tiny_model_dir, tmp_path, capsys):
    source = tmp_path / "t.txt"
    source.write_text("a\n", encoding="utf-8")
    argv = ["encode", "--model", str(tiny_model_dir), "--input", str(source)]
    assert cli.main(argv + ["--output", str(tmp_path / "o.npy"), "--dim", "64"]) == 2
    assert "--dim 64: must be in [1, 32]" in capsys.readouterr().err


def test_eval_dim_scores_the_truncated_embeddings(tiny_model_dir, tmp_path, capsys):
    """gte-jax eval --dim: STS Spearman of the truncated embeddings' cosines (the same rule)."""
    from scipy.stats import spearmanr

    rows = [(TEXTS[i], TEXTS[(i + 1) % 5], float(i)) for i in range(5)]
    sts = tmp_path / "sts.jsonl"
    sts.write_text(
        "".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in rows)
    )
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--sts", str(sts), "--dim", "8"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    emb = Embedder.from_pretrained(tiny_model_dir).encode(TEXTS)[:, :8]
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = [float(emb[i] @ emb[(i + 1) % 5]) for i in range(5)]
    want = spearmanr(cos, [s for *_, s in rows]).statistic
    assert abs(line["spearman"] - want) < 1e-6
