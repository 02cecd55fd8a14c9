"""HF I/O against the real all-MiniLM-L6-v2: parity with sentence-transformers, export round trips
through transformers' AutoModel and SentenceTransformer, and what the loader must refuse."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st_lib = pytest.importorskip("sentence_transformers")

from gte_jax.encode import Embedder  # noqa: E402
from gte_jax.hf import (  # noqa: E402
    PretrainedInfo,
    export_pretrained,
    load_model,
    load_pretrained,
    load_safetensors,
)
from gte_jax.models import BiEncoder  # noqa: E402

LONG = (
    "The history of natural language processing generally started in the 1950s, although work "
    "can be found from earlier periods. In 1950, Alan Turing published an article titled "
    "Computing Machinery and Intelligence which proposed what is now called the Turing test as a "
    "criterion of intelligence. "
)
SENTENCES = [
    "",
    " ",
    "a",
    "Hello world!",
    "The cat sits outside.",
    "A man is playing guitar.",
    "The new movie is awesome.",
    "The new movie is so great.",
    "I love pasta.",
    "Do you like pizza?",
    "How do I reset my password?",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "In the beginning God created the heaven and the earth.",
    "And God said, Let there be light: and there was light.",
    "Machine learning models need a lot of data to generalise well.",
    "Contrastive learning pulls paraphrases together and pushes unrelated texts apart.",
    "JAX compiles NumPy-style programs with XLA for CPUs, GPUs and TPUs.",
    "UPPER CASE TEXT SHOULD BE LOWERED BY THE TOKENIZER",
    "numbers 1234567890 and 3.14159 and 2.71828",
    "mixed CaSe, punctuation!!! ??? ... ;;; ---",
    "e-mail: someone@example.com, url: https://example.org/path?q=1",
    "C'est la vie, mon ami.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El niño comió manzanas en la mañana.",
    "Ça coûte cher, n'est-ce pas ?",
    "Привет, как дела?",
    "Γειά σου κόσμε",
    "東京は日本の首都です。",
    "我喜欢学习自然语言处理。",
    "한국어 문장도 처리해야 합니다.",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "I ❤️ emoji 😀🎉🚀",
    "🙂",
    "tabs\tand\nnewlines\r\nin text",
    "    leading and trailing spaces    ",
    "repeated repeated repeated repeated repeated repeated",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "Zürich, Kraków, São Paulo, Reykjavík",
    "x" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "<html><body>markup & entities &amp; stuff</body></html>",
    "def f(x):\n    return x ** 2  # code",
    "SELECT * FROM table WHERE id = 42;",
    "The quick brown fox jumps over the lazy dog. " * 5,
    LONG,
    LONG * 3,  # beyond 256 tokens: truncated
    "word " * 400,  # beyond 256 tokens
    "短" * 600,  # CJK, beyond 256 tokens
    "🎉 " * 300,  # emoji, beyond 256 tokens
    "Final sentence, medium length, about retrieval and embeddings for search.",
]
# Short and medium texts (one or two length buckets) for the round trips: cheap to compile and run.
SUBSET = [SENTENCES[i] for i in (0, 3, 5, 11, 12, 19, 22, 24, 28, 29, 34, 40, 47)]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    model, tokenizer, info = load_pretrained(minilm_dir)
    return model, tokenizer, info


@pytest.fixture(scope="module")
def st_minilm(minilm_dir):
    return st_lib.SentenceTransformer(str(minilm_dir), device="cpu")


def _embedder(model, tokenizer, info) -> Embedder:
    return Embedder(
        model, tokenizer, max_length=info.max_seq_length, include_prompt=info.include_prompt
    )


def _assert_same_embeddings(ours, ref, *, cos=0.99999, tol=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    cosine = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cosine.min() >= cos, f"min cosine {cosine.min()}"
    assert np.abs(ours - ref).max() <= tol, f"max |diff| {np.abs(ours - ref).max():.3g}"


def test_minilm_matches_sentence_transformers(minilm, st_minilm):
    model, tokenizer, info = minilm
    assert (model.pooling, model.normalize, info.max_seq_length) == ("mean", True, 256)
    assert len(SENTENCES) >= 50
    lengths = [len(ids) for ids in tokenizer(SENTENCES)["input_ids"]]
    assert max(lengths) > 256  # some texts are truncated, by both
    ours = _embedder(model, tokenizer, info).encode(SENTENCES, batch_size=32)
    ref = st_minilm.encode(SENTENCES, batch_size=32, convert_to_numpy=True)
    _assert_same_embeddings(ours, ref)


def test_prefix_matches_sentence_transformers_prompt(minilm, st_minilm):
    model, tokenizer, info = minilm
    ours = _embedder(model, tokenizer, info).encode(SUBSET, prefix="query: ")
    _assert_same_embeddings(ours, st_minilm.encode(SUBSET, prompt="query: "))


def _torch_mean_pooled(directory, texts, max_length):
    """Reference via transformers' AutoModel: masked mean of last_hidden_state, L2-normalised."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model = transformers.AutoModel.from_pretrained(str(directory), local_files_only=True).eval()
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_export_round_trip_transformers_and_sentence_transformers(minilm, tmp_path):
    model, tokenizer, info = minilm
    card = {
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "stages": [{"name": "pre-training", "steps": 1000}, "fine-tuning"],
        "data_sources": ["bible_kjv_web_ot"],
        "metrics": {"ndcg@10": 0.5123},
    }
    out = export_pretrained(model, tokenizer, tmp_path / "export", card=card, info=info)
    ours = _embedder(model, tokenizer, info).encode(SUBSET)

    reloaded, tokenizer2, info2 = load_pretrained(out)
    _assert_same_embeddings(_embedder(reloaded, tokenizer2, info2).encode(SUBSET), ours, tol=1e-6)
    assert (reloaded.pooling, reloaded.normalize, info2.max_seq_length) == ("mean", True, 256)
    _assert_same_embeddings(_torch_mean_pooled(out, SUBSET, 256), ours)
    st = st_lib.SentenceTransformer(str(out), device="cpu")
    assert st.max_seq_length == 256
    _assert_same_embeddings(st.encode(SUBSET), ours)

    readme = (out / "README.md").read_text()
    for expected in ("all-MiniLM-L6-v2", "pre-training", "bible_kjv_web_ot", "ndcg@10", "0.5123"):
        assert expected in readme
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and pooling["include_prompt"] is True
    assert (out / "2_Normalize").is_dir()
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 256
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]


def _perturbed(model: BiEncoder, seed: int) -> None:
    """Move every parameter a little, as training would."""
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(
        model,
        jax.tree_util.tree_map(
            lambda x: x + 0.02 * rng.standard_normal(x.shape, np.float32), params
        ),
    )


def test_trained_params_survive_export_to_sentence_transformers(minilm, st_minilm, tmp_path):
    base, tokenizer, info = minilm
    model = nnx.clone(base)
    _perturbed(model, seed=0)
    ours = _embedder(model, tokenizer, info).encode(SUBSET)
    assert np.abs(ours - st_minilm.encode(SUBSET)).max() > 1e-3  # really moved
    out = export_pretrained(model, tokenizer, tmp_path / "trained", info=info)
    st = st_lib.SentenceTransformer(str(out), device="cpu")
    _assert_same_embeddings(st.encode(SUBSET), ours)


def test_projection_last_token_and_excluded_prompt_export(minilm, tmp_path):
    """Dense projection (tanh), last-token pooling, include_prompt=False: ST agrees with us."""
    base, tokenizer, info = minilm
    model = nnx.clone(base)
    model.pooling, model.projection_activation = "last", "tanh"
    model.projection = nnx.Linear(base.config.hidden_size, 48, rngs=nnx.Rngs(0))
    info = PretrainedInfo(
        source="test",
        hf_config=info.hf_config,
        max_seq_length=128,
        include_prompt=False,
        prompts={"query": "query: "},
        extra_tensors=info.extra_tensors,
    )
    out = export_pretrained(model, tokenizer, tmp_path / "dense", info=info)
    ours = Embedder(model, tokenizer, max_length=128, include_prompt=False).encode(
        SUBSET, prefix="query: "
    )
    assert ours.shape == (len(SUBSET), 48)
    st = st_lib.SentenceTransformer(str(out), device="cpu")
    _assert_same_embeddings(st.encode(SUBSET, prompt_name="query"), ours)
    reloaded, _, info2 = load_pretrained(out)
    assert (reloaded.pooling, reloaded.projection_activation, info2.include_prompt) == (
        "last",
        "tanh",
        False,
    )
    assert info2.prompts == {"query": "query: "}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_files_follow_the_umask(minilm_dir, tmp_path, umask):
    """Every exported file, the weights included, gets the mode a plain open() gives (safetensors'
    own save_file made model.safetensors 600 whatever the umask)."""
    from conftest import TINY_BERT

    from gte_jax.hf import load_tokenizer
    from gte_jax.models.bert import EncoderConfig

    model = BiEncoder(EncoderConfig.from_hf(TINY_BERT), projection_dim=8, rngs=nnx.Rngs(0))
    old = os.umask(umask)
    try:
        out = pathlib.Path(
            export_pretrained(model, load_tokenizer(minilm_dir), tmp_path / "export")
        )
    finally:
        os.umask(old)
    modes = {
        str(f.relative_to(out)): oct(stat.S_IMODE(f.stat().st_mode))
        for f in out.rglob("*")
        if f.is_file()
    }
    assert {"model.safetensors", "2_Dense/model.safetensors"} <= modes.keys()
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))


# ----------------------------------------------------------------------------- refusals, formats


def _copy_model_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_refuses_remote_code_config(minilm_dir, tmp_path):
    directory = _copy_model_dir(minilm_dir, tmp_path / "remote")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="auto_map"):
        load_pretrained(directory)


def test_refuses_pickle_only_directory(minilm_dir, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    shutil.copy(minilm_dir / "config.json", directory / "config.json")
    # Not even a valid pickle: the loader must refuse before opening it.
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04 not loaded")
    with pytest.raises(ValueError, match=r"pickle.*safetensors|safetensors.*pickle"):
        load_model(directory)


def test_sharded_index_loads_like_single_file(minilm_dir, tmp_path):
    from safetensors.numpy import save_file

    directory = _copy_model_dir(minilm_dir, tmp_path / "sharded")
    tensors = load_safetensors(directory)
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for filename, shard_names in shards.items():
        save_file(
            {n: tensors[n] for n in shard_names}, directory / filename, metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(shard_names, filename))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )

    sharded, _ = load_model(directory)
    single, _ = load_model(minilm_dir)
    a = jax.tree_util.tree_leaves(nnx.state(sharded, nnx.Param))
    b = jax.tree_util.tree_leaves(nnx.state(single, nnx.Param))
    assert len(a) == len(b) == 6 * 16 + 5
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def _small_masked_lm(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
    )
    ref = transformers.BertForMaskedLM(config).eval()
    ref.save_pretrained(str(tmp_path), safe_serialization=True)
    return ref


def test_prefixed_task_checkpoint_loads_encoder_and_notes_heads(tmp_path, caplog):
    ref = _small_masked_lm(tmp_path)
    assert any(k.startswith("bert.") for k in load_safetensors(tmp_path))
    with caplog.at_level(logging.INFO, logger="gte_jax.hf"):
        model, _ = load_model(tmp_path)
    assert "cls.predictions" in caplog.text  # the MLM head is named as ignored
    ids = np.random.default_rng(0).integers(3, 99, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = ref.bert(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state
    ours = model.encoder(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    assert np.abs(np.asarray(ours) - expected.numpy()).max() <= 1e-5


def test_xlmr_export_loads_in_transformers(minilm, tmp_path):
    """An XLM-R tower (positions offset by padding_idx + 1) exports as XLMRobertaModel."""
    torch.manual_seed(0)
    config = transformers.XLMRobertaConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=66,
        type_vocab_size=1,
        pad_token_id=1,
    )
    transformers.XLMRobertaModel(config).save_pretrained(
        str(tmp_path / "src"), safe_serialization=True
    )
    model, info = load_model(tmp_path / "src")
    # The tokenizer only has to be written; transformers' model load does not use it.
    out = export_pretrained(model, minilm[1], tmp_path / "out", info=info)
    ref = transformers.AutoModel.from_pretrained(str(out), local_files_only=True).eval()
    assert type(ref).__name__ == "XLMRobertaModel"
    ids = np.random.default_rng(0).integers(3, 99, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ids[1, :3] = 1
    with torch.no_grad():
        expected = ref(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state
    ours = model.encoder(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    real = mask.astype(bool)
    assert np.abs(np.asarray(ours) - expected.numpy())[real].max() <= 1e-5


def test_missing_tensors_are_listed(tmp_path):
    from safetensors.numpy import save_file

    _small_masked_lm(tmp_path)
    tensors = load_safetensors(tmp_path)
    del tensors["bert.encoder.layer.1.output.dense.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.output\.dense\.weight"):
        load_model(tmp_path)


def test_model_card_names_no_local_directory(tiny_model_dir, tmp_path):
    """A card travels with the model: local absolute paths and bucket URLs (base model, data,
    the workdir it came from) appear by their last component; Hub ids stay as given."""
    from gte_jax import hf

    model, _, info = hf.load_pretrained(tiny_model_dir)
    assert str(info.source).startswith("/")
    secret = "/home/alice/private"
    card = {
        "stages": [{"name": "pretrain", "data": [f"{secret}/pairs.jsonl", "bible"]}],
        "data_sources": [f"{secret}/pairs.jsonl", "gs://alice-bucket/x/news.jsonl", "bible"],
    }
    text = hf.model_card(model, info, card, 128)
    assert str(tiny_model_dir) not in text and secret not in text and "alice" not in text, text
    assert f"base_model: {json.dumps(tiny_model_dir.name)}" in text
    for name in ("pairs.jsonl", "news.jsonl", "bible"):
        assert f"- {json.dumps(name)}" in text
    hub = hf.model_card(model, info, {"base_model": "sentence-transformers/all-MiniLM-L6-v2"}, 8)
    assert 'base_model: "sentence-transformers/all-MiniLM-L6-v2"' in hub
    assert hf.card_ref("C:\\Users\\bob\\model") == "model" and hf.card_ref("runs/a") == "runs/a"
