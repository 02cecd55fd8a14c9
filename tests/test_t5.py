"""The T5 encoder tower against transformers + torch: bucket rule, hidden states (v1.0 and v1.1,
padded), full T5 checkpoints, packed == unpacked, bf16, remat, and the sentence-transformers
GTR / INSTRUCTOR layout (T5 + mean pooling + bias-free Dense + Normalize) both ways."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import child_env
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import TINY_T5_V11, tiny_t5_dir  # noqa: E402

from gte_jax import hf  # noqa: E402
from gte_jax.encode import Embedder  # noqa: E402
from gte_jax.models import t5  # noqa: E402
from gte_jax.models.encoder import BiEncoder, ModelFn  # noqa: E402

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And God said, Let there be light: and there was light.",
    "Amen.",
    "And the evening and the morning were the first day; and God divided the light from the "
    "darkness, and called the light Day, and the darkness he called Night, and it was so.",
    "Thus the heavens and the earth were finished, and all the host of them.",
]


@pytest.fixture(scope="module")
def t5_v10(tmp_path_factory):
    return tiny_t5_dir(tmp_path_factory.mktemp("t5_v10"))


@pytest.fixture(scope="module")
def t5_v11(tmp_path_factory):
    return tiny_t5_dir(tmp_path_factory.mktemp("t5_v11"), **TINY_T5_V11, seed=1)


@pytest.fixture(scope="module")
def mt5(tmp_path_factory):
    return tiny_t5_dir(
        tmp_path_factory.mktemp("mt5"), **TINY_T5_V11, model_class="MT5EncoderModel", seed=3
    )


def _tokens(tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


@nnx.jit
def _hidden(model, ids, mask, segment_ids=None):
    return model.encoder(ids, mask, segment_ids=segment_ids)


@nnx.jit
def _vectors(model, ids, mask, key=None):
    return model(ids, mask, dropout_rng=key)


@nnx.jit
def _packed_vectors(model, ids, mask, segment_ids, position_ids, slot_index):
    return model.embed(
        ids, mask, segment_ids=segment_ids, position_ids=position_ids, slot_index=slot_index
    )


def _torch_hidden(directory, ids, mask, model_class="T5EncoderModel"):
    model = getattr(transformers, model_class).from_pretrained(str(directory)).eval()
    encoder = model if model_class.endswith("EncoderModel") else model.get_encoder()
    with torch.no_grad():
        out = encoder(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)
        )
    return out.last_hidden_state.numpy()


def test_relative_position_bucket_matches_transformers():
    relative = np.arange(-700, 701)
    for buckets, distance in [(32, 128), (8, 20), (16, 32), (64, 256), (32, 64)]:
        ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            torch.tensor(relative), bidirectional=True, num_buckets=buckets, max_distance=distance
        ).numpy()
        ours = t5.relative_position_bucket(
            jnp.asarray(relative), num_buckets=buckets, max_distance=distance
        )
        np.testing.assert_array_equal(np.asarray(ours), ref)
        # Every bucket reached but buckets // 2 ("distance 0, looking right": never drawn).
        assert set(np.unique(ref)) == set(range(buckets)) - {buckets // 2}


@pytest.mark.parametrize("version", ["t5_v10", "t5_v11", "mt5"])
def test_hidden_states_match_transformers_with_padding(version, request):
    directory = request.getfixturevalue(version)
    model, tokenizer, info = hf.load_pretrained(directory)
    assert isinstance(model.encoder, t5.T5Encoder)
    assert model.config.is_gated == (version != "t5_v10")
    assert info.max_seq_length == 512
    ids, mask = _tokens(tokenizer, TEXTS)
    # Padded rows, and distances beyond max_distance (20): every bucket in play.
    assert mask.sum(1).min() < ids.shape[1] and mask.sum(1).max() > 20
    ours = np.asarray(_hidden(model, jnp.asarray(ids), jnp.asarray(mask)))
    architecture = "MT5EncoderModel" if version == "mt5" else "T5EncoderModel"
    assert t5.hf_architecture(model.config) == architecture  # what export writes
    ref = _torch_hidden(directory, ids, mask, architecture)
    # Pad rows too: they attend to the real keys in both.
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_full_t5_checkpoint_loads_its_encoder(tmp_path, caplog):
    directory = tiny_t5_dir(tmp_path, model_class="T5ForConditionalGeneration", seed=2)
    with caplog.at_level("WARNING", logger="gte_jax.hf"):
        model, tokenizer, _ = hf.load_pretrained(directory)
    assert "unexpected" not in caplog.text  # decoder.* / lm_head are known and ignored
    ids, mask = _tokens(tokenizer, TEXTS[:3])
    ours = np.asarray(_hidden(model, jnp.asarray(ids), jnp.asarray(mask)))
    ref = _torch_hidden(directory, ids, mask, "T5ForConditionalGeneration")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def _pack(ids, mask, rows):
    """Texts laid end to end in the given rows (lists of text indices) -> packed arrays."""
    length = ids.shape[1] * 2
    out = {k: np.zeros((len(rows), length), np.int32) for k in ("ids", "mask", "seg", "pos")}
    slots = np.zeros(ids.shape[0], np.int32)
    for r, texts in enumerate(rows):
        start = 0
        for s, i in enumerate(texts):
            n = int(mask[i].sum())
            out["ids"][r, start : start + n] = ids[i, :n]
            out["mask"][r, start : start + n] = 1
            out["seg"][r, start : start + n] = s + 1
            out["pos"][r, start : start + n] = np.arange(n)
            slots[i] = r * length + s
            start += n
    return out, slots


def test_packed_rows_equal_texts_alone(t5_v11):
    model, tokenizer, _ = hf.load_pretrained(t5_v11)
    ids, mask = _tokens(tokenizer, TEXTS)
    packed, slots = _pack(ids, mask, [[0, 3], [2, 1, 4]])
    hidden = np.asarray(
        _hidden(
            model,
            jnp.asarray(packed["ids"]),
            jnp.asarray(packed["mask"]),
            jnp.asarray(packed["seg"]),
        )
    )
    alone = np.asarray(_hidden(model, jnp.asarray(ids), jnp.asarray(mask)))
    length = packed["ids"].shape[1]
    for i in range(len(TEXTS)):
        row, seg = divmod(int(slots[i]), length)
        tokens = hidden[row][packed["seg"][row] == seg + 1]
        np.testing.assert_allclose(tokens, alone[i, : mask[i].sum()], rtol=0, atol=1e-5)
    # Through the bi-encoder: per-segment pooling and the slot gather give the unpacked vectors.
    pooled = _packed_vectors(
        model, *(jnp.asarray(packed[k]) for k in ("ids", "mask", "seg", "pos")), slots
    )
    unpacked = _vectors(model, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(pooled, unpacked, atol=1e-6)


def test_bf16_compute_stays_close_to_float32(t5_v11):
    model, tokenizer, _ = hf.load_pretrained(t5_v11)
    bf16, _, _ = hf.load_pretrained(t5_v11, dtype=jnp.bfloat16)
    ids, mask = (jnp.asarray(x) for x in _tokens(tokenizer, TEXTS))
    ref = np.asarray(_hidden(model, ids, mask), np.float64)
    hidden = _hidden(bf16, ids, mask)
    assert hidden.dtype == jnp.bfloat16
    assert bf16.encoder.layers[0].query.kernel.value.dtype == jnp.float32  # params stay float32
    real = np.asarray(mask, bool)
    error = np.abs(np.asarray(hidden, np.float64) - ref)[real].max()
    # Measured 0.023-0.036 on states up to |h| = 3.8 (bf16 keeps 8 mantissa bits: 0.4 % per
    # rounding; the float32 residual stream keeps them from compounding over the layers).
    assert error < 0.1, error
    ours, low = (np.asarray(_vectors(m, ids, mask), np.float64) for m in (model, bf16))
    cosine = (ours * low).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(low, axis=1)
    assert cosine.min() > 0.9995, cosine.min()  # measured 0.99997


def test_remat_and_dropout(t5_v10):
    model, tokenizer, _ = hf.load_pretrained(t5_v10)
    remat, _, _ = hf.load_pretrained(t5_v10, remat=True)
    ids, mask = (jnp.asarray(x) for x in _tokens(tokenizer, TEXTS[:3]))
    key = jax.random.key(3)
    plain = _vectors(model, ids, mask, key)
    assert np.abs(np.asarray(plain - _vectors(model, ids, mask))).max() > 1e-3  # dropout is on
    np.testing.assert_array_equal(plain, _vectors(model, ids, mask, key))  # same key, same masks

    def grads(m):
        model_fn, params = ModelFn.from_module(m)
        loss = lambda p: model_fn.module(p)(ids, mask, dropout_rng=key).sum()  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        grads(model),
        grads(remat),
    )
    off, _, _ = hf.load_pretrained(t5_v10, dropout=0.0)
    np.testing.assert_allclose(_vectors(off, ids, mask, key), _vectors(model, ids, mask), atol=1e-6)


def _cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_sentence_transformers_gtr_layout_both_ways(t5_v11, tmp_path):
    """GTR / sentence-t5 / INSTRUCTOR ship T5 + mean Pooling + Dense(bias=False, identity) +
    Normalize: built here with sentence-transformers' own modules, loaded by gte-jax, and our
    export (of changed weights) loaded back by sentence-transformers."""
    st_lib = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer import modules

    transformer = modules.Transformer(str(t5_v11), max_seq_length=64)
    dense = modules.Dense(32, 24, bias=False, activation_function=torch.nn.Identity())
    st = st_lib.SentenceTransformer(
        modules=[transformer, modules.Pooling(32, "mean"), dense, modules.Normalize()],
        device="cpu",
    )
    st.save(str(tmp_path / "st"))
    assert json.loads((tmp_path / "st" / "2_Dense" / "config.json").read_text())["bias"] is False

    model, tokenizer, info = hf.load_pretrained(tmp_path / "st")
    assert model.projection is not None and model.projection.bias is None
    assert (model.pooling, model.normalize, info.max_seq_length) == ("mean", True, 64)
    texts = TEXTS + ["word " * 100]  # truncated at 64 tokens by both
    ours = Embedder.from_loaded(model, tokenizer, info).encode(texts)
    ref = st.encode(texts, convert_to_numpy=True)
    assert _cosines(ours, ref).min() >= 0.99999
    np.testing.assert_allclose(ours, ref, atol=1e-5)

    model_fn, params = ModelFn.from_module(model)
    keys = iter(jax.random.split(jax.random.key(7), 100))
    moved = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), params)
    model = model_fn.module(moved)
    hf.export_pretrained(model, tokenizer, tmp_path / "export", info=info)
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["architectures"] == ["T5EncoderModel"]
    assert exported["feed_forward_proj"] == "gated-gelu"
    assert (
        json.loads((tmp_path / "export" / "2_Dense" / "config.json").read_text())["bias"] is False
    )
    ours = Embedder.from_loaded(model, tokenizer, info).encode(texts)
    reloaded = st_lib.SentenceTransformer(str(tmp_path / "export"), device="cpu")
    assert type(reloaded[0].auto_model).__name__ == "T5EncoderModel"
    ref = reloaded.encode(texts, convert_to_numpy=True)
    assert _cosines(ours, ref).min() >= 0.99999
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert np.abs(ref - st.encode(texts, convert_to_numpy=True)).max() > 1e-2  # weights moved


# ----------------------------------------------------------------------------- training


def test_gte_jax_train_packs_t5_and_exports_for_sentence_transformers(t5_v11, tmp_path):
    """`gte-jax train` with configs/finetune.py (packed rows, dropout on) on T5 v1.1, with
    GradCache chunks and remat, then its export loaded by sentence-transformers equals our
    embedding of the trained checkpoint."""
    import pathlib
    import subprocess
    import sys

    st_lib = pytest.importorskip("sentence_transformers")
    from gte_jax.data.pipeline import DEMO_DIR

    repo = pathlib.Path(__file__).resolve().parents[1]
    workdir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "gte_jax.cli", "train",
        "--config", str(repo / "configs" / "finetune.py"), "--workdir", str(workdir),
        f"--config.model.init_from={t5_v11}",
        f"--config.data.train_files={DEMO_DIR / 'bible_finetune.jsonl'}",
        "--config.data.query_max_length=32", "--config.data.doc_max_length=32",
        "--config.train.batch_size=8", "--config.train.num_steps=3",
        "--config.train.learning_rate=1e-3", "--config.train.warmup_ratio=0",
        "--config.train.log_every=1", "--config.train.progress_bar=false",
        "--config.train.gradcache=true", "--config.train.gradcache_chunk_size=4",
        "--config.model.remat=true", "--log_level=WARNING",
    ]  # fmt: skip
    env = child_env(1)  # one device, the session's backend optimisation level
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3
    logged = [json.loads(line) for line in (workdir / "logs" / "metrics.jsonl").open()]
    losses = [r["train/loss"] for r in logged if "train/loss" in r]
    assert len(losses) == 3 and np.isfinite(losses).all()

    texts = TEXTS[:3]
    ours = Embedder.from_pretrained(workdir).encode(texts)
    st = st_lib.SentenceTransformer(str(workdir / "export"), device="cpu")
    np.testing.assert_allclose(st.encode(texts, convert_to_numpy=True), ours, atol=1e-5)
    base = Embedder.from_pretrained(t5_v11).encode(texts)
    assert np.abs(base - ours).max() > 1e-4  # the export carries the training


# ----------------------------------------------------------------------------- sharding, plan


def test_sharding_rules_and_plan_flops_see_t5_parameters():
    from jax.sharding import PartitionSpec as P

    from gte_jax import plan
    from gte_jax import sharding as shd

    config = t5.T5EncoderConfig(
        vocab_size=400, d_model=32, d_kv=6, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
    )  # fmt: skip
    abstract = nnx.eval_shape(
        lambda: BiEncoder(config, projection_dim=16, projection_bias=False, rngs=nnx.Rngs(0))
    )
    _, params = ModelFn.from_module(abstract)
    mesh = shd.make_mesh(data=4, model=2)
    specs = {
        shd.path_str(path): s.spec
        for path, s in jax.tree_util.tree_leaves_with_path(
            shd.state_shardings({"params": params}, mesh, "fsdp_tp")
        )
    }
    layer = "params/encoder/layers/0/"
    assert specs[layer + "query/kernel"] == P("data", "model")  # heads split over "model"
    assert specs[layer + "attention_output/kernel"] == P("model", "data")
    assert (
        specs[layer + "gate/kernel"] == specs[layer + "intermediate/kernel"] == P("data", "model")
    )
    assert specs[layer + "output/kernel"] == P("model", "data")  # Megatron's row split
    assert specs["params/encoder/relative_attention_bias/embedding"][1] == "model"
    assert specs["params/encoder/word_embeddings/embedding"] == P("model", "data")
    assert specs[layer + "mlp_layer_norm/scale"] == P(None)

    # Matmul parameters per layer: q, k, v, o (32 x 24 each), gate, intermediate, output (32 x 64).
    matmul = 2 * (4 * 32 * 24 + 3 * 32 * 64) + 5 * 32 + 32 * 16  # + norms + the Dense
    towers = [(8, 16)]
    attention = 12 * 2 * 16 * (4 * 6)  # width heads x d_kv = 24, not d_model = 32
    assert plan.model_flops(params, 2, 24, towers) == 8 * 16 * (6 * matmul + attention)


def test_configs_that_are_not_t5_encoders_are_refused():
    with pytest.raises(ValueError, match="gated-ACT"):
        t5.T5EncoderConfig.from_hf({"model_type": "t5", "feed_forward_proj": "gelu-gated"})
    with pytest.raises(ValueError, match="not supported"):
        t5.T5EncoderConfig.from_hf({"model_type": "t5", "feed_forward_proj": "gated-mish"})
    with pytest.raises(ValueError, match="decoder"):
        t5.T5EncoderConfig.from_hf({"model_type": "t5", "is_decoder": True})
    with pytest.raises(ValueError, match="bidirectional only"):
        t5.T5EncoderConfig.from_hf({"model_type": "t5"}, attention="causal")
    config = t5.T5EncoderConfig.from_hf(
        {"model_type": "t5", "dropout_rate": 0.1}, dropout=0.0, attention_dropout=0.2, remat=True
    )
    assert (config.dropout_rate, config.attention_dropout, config.remat) == (0.0, 0.2, True)
    assert t5.T5EncoderConfig.from_hf(config.to_hf()) == dataclasses.replace(
        config, attention_dropout_rate=None, remat=False
    )  # to_hf writes HF's fields only
