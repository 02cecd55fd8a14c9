"""The decoder tower (gte_jax/models/decoder.py) against transformers + torch on tiny random models.

Every family (Llama, Mistral, Qwen2, Qwen3, Gemma3 text) is built with transformers' own config
class and random torch weights (tests/tiny_models.py), saved with save_pretrained (``*ForCausalLM``
sharded with an index, plain ``*Model`` in one file) and loaded through gte_jax.hf.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tiny_models import FAMILIES, tiny_decoder_dir, tiny_tokenizer

from gte_jax import hf, sharding
from gte_jax.models import decoder, registry
from gte_jax.models.encoder import BiEncoder, ModelFn

TEXTS = [
    "What is AI?",
    "A new blaze near Goulburn, south-west of Sydney, has forced the closure of the Hume Highway.",
    "Are you sentient? By the strictest dictionary definition of the word, I may be.",
]
SHARD_BYTES = 40_000  # a tiny model's LM checkpoint is ~150 kB: several shards and an index
TOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    cache: dict[str, object] = {}

    def get(family: str, causal_lm: bool = True, **overrides):
        key = json.dumps([family, causal_lm, overrides], sort_keys=True)
        if key not in cache:
            cache[key] = tiny_decoder_dir(
                root,
                family,
                causal_lm=causal_lm,
                max_shard_size=SHARD_BYTES if causal_lm else None,
                name=f"{family}_{len(cache)}",
                **overrides,
            )
        return cache[key]

    return get


def batch(side: str, texts=TEXTS):
    tok = tiny_tokenizer()
    tok.padding_side = side
    b = tok(texts, padding=True, return_tensors="np")
    return b["input_ids"].astype(np.int32), b["attention_mask"].astype(np.int32)


def mask_positions(mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(mask, 1) - 1, 0) * mask


def ours(model: BiEncoder, ids, mask, **kwargs) -> np.ndarray:
    return np.asarray(model.encoder(jnp.asarray(ids), jnp.asarray(mask), **kwargs), np.float32)


def torch_base(path, causal_lm: bool):
    cls = transformers.AutoModelForCausalLM if causal_lm else transformers.AutoModel
    model = cls.from_pretrained(path, attn_implementation="eager").eval()
    return model, (model.model if causal_lm else model)


def torch_hidden(base, ids, mask, positions=None) -> np.ndarray:
    with torch.no_grad():
        out = base(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=None if positions is None else torch.tensor(positions, dtype=torch.long),
        )
    return out.last_hidden_state.float().numpy()


def max_err(a, b, mask) -> float:
    return float(np.abs(a - b)[mask.astype(bool)].max())


CASES = [(f, lm) for f in FAMILIES for lm in (True, False)] + [
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 64}}),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
               "attention_bias": True, "mlp_bias": True}),
    ("gemma3_text", {"attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}),
]  # fmt: skip


@pytest.mark.parametrize("family,variant", CASES)
def test_hidden_states_and_logits_match_transformers(model_dir, family, variant):
    """Causal hidden states (left and right padding) and LM logits == transformers (<= 1e-5)."""
    causal_lm = variant is not False
    overrides = variant if isinstance(variant, dict) else {}
    path = model_dir(family, causal_lm, **overrides)
    if causal_lm:
        assert (path / hf.SAFETENSORS_INDEX).exists() and not (path / hf.SAFETENSORS_FILE).exists()
    model, _ = hf.load_model(path)
    assert model.config.attention == "causal" and model.config.causal_lm == causal_lm
    torch_model, base = torch_base(path, causal_lm)
    for side in ("right", "left"):
        ids, mask = batch(side)
        got = ours(model, ids, mask)
        assert max_err(got, torch_hidden(base, ids, mask, mask_positions(mask)), mask) <= TOL
        # transformers' own default positions (arange, pads counted): RoPE is relative.
        assert max_err(got, torch_hidden(base, ids, mask), mask) <= TOL
    if causal_lm:
        logits = np.asarray(model.encoder.lm_logits(jnp.asarray(got)))
        with torch.no_grad():
            ref = torch_model(
                input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(mask_positions(mask), dtype=torch.long),
            ).logits.numpy()
        assert logits.shape == ref.shape
        assert max_err(logits, ref, mask) <= TOL


def test_sliding_window_bites(model_dir):
    """Mistral's window of 5 matters on these texts: without it the states differ."""
    path = model_dir("mistral")
    ids, mask = batch("right")
    _, base = torch_base(path, True)
    ref = torch_hidden(base, ids, mask, mask_positions(mask))
    wide, _ = hf.load_model(path, sliding_window=10**6)
    assert max_err(ours(wide, ids, mask), ref, mask) > 1e-3


def test_gemma3_bidirectional_matches_transformers(model_dir):
    """EmbeddingGemma's switch: use_bidirectional_attention=True, sliding window included."""
    path = model_dir("gemma3_text", True, use_bidirectional_attention=True)
    model, _ = hf.load_model(path)
    assert model.config.attention == "bidirectional"
    _, base = torch_base(path, True)
    for side in ("right", "left"):
        ids, mask = batch(side)
        got = ours(model, ids, mask)
        assert max_err(got, torch_hidden(base, ids, mask, mask_positions(mask)), mask) <= TOL
    causal, _ = hf.load_model(path, attention="causal")
    assert max_err(ours(causal, ids, mask), got, mask) > 1e-3


@pytest.mark.parametrize("family", ["gemma3_text", "llama"])
def test_bidirectional_at_batch_size_one(model_dir, family):
    """A later token changes an earlier token's state iff attention is bidirectional — with one
    unpadded sequence, where transformers' mask shortcuts used to turn masks causal."""
    path = model_dir(family)
    ids, mask = batch("right", TEXTS[1:2])
    changed = ids.copy()
    changed[0, -2] = (changed[0, -2] + 7) % 300 + 3
    for attention, expect_change in [("causal", False), ("bidirectional", True)]:
        model, _ = hf.load_model(path, attention=attention)
        before, after = ours(model, ids, mask), ours(model, changed, mask)
        early = np.abs(before[0, :-2] - after[0, :-2]).max()
        assert (early > 1e-3) == expect_change, (attention, early)


@pytest.mark.parametrize(
    "family,attention",
    [("mistral", "causal"), ("gemma3_text", "bidirectional"), ("qwen3", "causal")],
)
def test_packed_rows_equal_unpacked_texts(model_dir, family, attention):
    """Three texts in one row (segment ids, positions restarting) == each text alone; jitted."""
    model, _ = hf.load_model(model_dir(family), attention=attention)
    fn, params = ModelFn.from_module(model)
    run = jax.jit(
        lambda p, ids, mask, seg: fn.module(p).encoder(ids, mask, segment_ids=seg)
    )  # fmt: skip
    tok = tiny_tokenizer()
    pieces = [tok(t)["input_ids"] for t in TEXTS]
    length = sum(map(len, pieces)) + 3
    ids = np.zeros((1, length), np.int32)
    seg = np.zeros((1, length), np.int32)
    start = 0
    for s, piece in enumerate(pieces, 1):
        ids[0, start : start + len(piece)] = piece
        seg[0, start : start + len(piece)] = s
        start += len(piece)
    packed = np.asarray(run(params, ids, (seg > 0).astype(np.int32), seg))
    start = 0
    for piece in pieces:
        alone = ours(model, np.asarray([piece], np.int32), np.ones((1, len(piece)), np.int32))
        np.testing.assert_allclose(packed[0, start : start + len(piece)], alone[0], atol=TOL)
        start += len(piece)


def test_bf16_error_is_within_measured_bound(model_dir):
    """bf16 compute vs float32, ours next to transformers' own bf16 model on the same weights.

    Measured here (Nov 2026, tiny Gemma3, max |error| over real tokens / max |hidden|): ours
    0.0187, transformers' bf16 model 0.0220. Asserted: ours <= 1.5 x torch's (and both small), so the bound
    follows the reference instead of a guessed constant."""
    path = model_dir("gemma3_text")
    ids, mask = batch("left")
    f32, _ = hf.load_model(path)
    b16, _ = hf.load_model(path, dtype=jnp.bfloat16)
    ref32 = ours(f32, ids, mask)
    scale = np.abs(ref32[mask.astype(bool)]).max()
    ours_err = max_err(ours(b16, ids, mask), ref32, mask) / scale
    _, base = torch_base(path, True)
    torch32 = torch_hidden(base, ids, mask, mask_positions(mask))
    torch16 = torch_hidden(base.to(torch.bfloat16), ids, mask, mask_positions(mask))
    torch_err = max_err(torch16, torch32, mask) / scale
    print(f"bf16 relative max error: ours {ours_err:.4f}, transformers {torch_err:.4f}")
    assert ours_err <= 1.5 * torch_err and ours_err < 0.05


def test_remat_and_dropout(model_dir):
    model, _ = hf.load_model(model_dir("qwen2"))
    rematted, _ = hf.load_model(model_dir("qwen2"), remat=True, dropout=0.1)
    ids, mask = batch("right")
    fn, params = ModelFn.from_module(model)
    fn_r, _ = ModelFn.from_module(rematted)

    def loss(f, p, rng=None):
        return jnp.sum(f.module(p).encoder(ids, mask, dropout_rng=rng) ** 2)

    g = jax.jit(jax.grad(lambda p: loss(fn, p)))(params)
    g_r = jax.jit(jax.grad(lambda p: loss(fn_r, p)))(params)  # no rng: dropout off
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_r), strict=True):
        # Gradients here reach ~800: float32 rounding (jit's fusion order) is relative to that.
        np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(a).max()), rtol=1e-5)
    run = jax.jit(lambda p, rng: loss(fn_r, p, rng))
    one, same = run(params, jax.random.key(1)), run(params, jax.random.key(1))
    other = run(params, jax.random.key(2))
    assert one == same and one != other and one != loss(fn_r, params)


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
         "original_max_position_embeddings": 32768},
        {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0, "mscale": 1.0,
         "mscale_all_dim": 0.5, "beta_fast": 16, "original_max_position_embeddings": 4096},
    ],
)  # fmt: skip
def test_rope_variants_match_transformers(params):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=2, max_position_embeddings=131072,
        rope_parameters=dict(params),
    )  # fmt: skip
    inv, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_config)
    ours_cfg = registry.config_from_hf(hf_config.to_dict())
    got, got_scaling = decoder._inv_freq(ours_cfg, decoder.FULL)
    np.testing.assert_allclose(got, inv.numpy(), rtol=1e-6)
    assert got_scaling == pytest.approx(scaling, rel=1e-6)


def test_legacy_rope_keys_and_refusals():
    legacy = {
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
        "rope_theta": 5000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
    }  # fmt: skip
    inv, _ = decoder._inv_freq(registry.config_from_hf(legacy), decoder.FULL)
    np.testing.assert_allclose(inv, 1.0 / 5000.0 ** (np.arange(0, 16, 2) / 16) / 2.0, rtol=1e-6)
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        registry.config_from_hf(dict(legacy, rope_scaling={"type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError, match="attention="):
        registry.config_from_hf(legacy, attention="sideways")
    with pytest.raises(ValueError, match="gemma3_text"):
        registry.config_from_hf({"model_type": "gemma3"})


def test_plain_model_has_no_lm_head_unless_tied(model_dir):
    model, _ = hf.load_model(model_dir("llama", False))
    with pytest.raises(ValueError, match="no LM head"):
        model.encoder.lm_logits(jnp.zeros((1, 2, 32)))
    tied, _ = hf.load_model(model_dir("gemma3_text", False))  # Gemma3 ties by default
    assert tied.encoder.lm_logits(jnp.zeros((1, 2, 32))).shape == (1, 2, tied.config.vocab_size)


def test_export_reloads_in_transformers_and_sentence_transformers(model_dir, tmp_path):
    """An untied Llama *ForCausalLM, exported sharded: transformers' CausalLM logits and
    AutoModel / SentenceTransformer outputs equal ours; our loader reads it back."""
    from sentence_transformers import SentenceTransformer

    model, tok, info = hf.load_pretrained(model_dir("llama"))
    out = hf.export_pretrained(model, tok, tmp_path / "export", info=info, max_shard_size=50_000)
    index = json.loads((out / hf.SAFETENSORS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" in index["weight_map"]
    assert "model.layers.0.self_attn.q_proj.weight" in index["weight_map"]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    ids, mask = batch("right")
    got = ours(model, ids, mask)
    lm, base = torch_base(out, True)
    assert max_err(torch_hidden(base, ids, mask), got, mask) <= TOL
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()  # fmt: skip
    assert max_err(logits, np.asarray(model.encoder.lm_logits(jnp.asarray(got))), mask) <= TOL
    auto = transformers.AutoModel.from_pretrained(out).eval()
    assert max_err(torch_hidden(auto, ids, mask), got, mask) <= TOL
    st = SentenceTransformer(str(out), device="cpu")
    emb = st.encode(TEXTS, convert_to_numpy=True, batch_size=8)
    np.testing.assert_allclose(
        emb, np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), atol=TOL
    )
    again, _ = hf.load_model(out)
    np.testing.assert_allclose(ours(again, ids, mask), got, atol=0)


def test_embedding_export_drops_an_untied_lm_head(model_dir, tmp_path):
    """`gte-jax export` and best/ (``lm_head=False``): an untied *ForCausalLM is written as the
    plain *Model without ``lm_head.weight`` (no embedding reads it), so AutoModel loads it with
    nothing unexpected or missing and the same hidden states; ours reads it back."""
    from safetensors import safe_open

    model, tok, info = hf.load_pretrained(model_dir("llama"))
    assert model.config.has_lm_head
    out = hf.export_pretrained(model, tok, tmp_path / "export", info=info, lm_head=False)
    with safe_open(str(out / hf.SAFETENSORS_FILE), "np") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and not any(n.startswith("model.") for n in names)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaModel"]
    auto, loading = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not loading["unexpected_keys"] and not loading["missing_keys"], loading
    ids, mask = batch("right")
    got = ours(model, ids, mask)
    assert max_err(torch_hidden(auto.eval(), ids, mask), got, mask) <= TOL
    again, _ = hf.load_model(out)
    assert not again.config.has_lm_head
    np.testing.assert_allclose(ours(again, ids, mask), got, atol=0)


@pytest.mark.parametrize("family,causal_lm,overrides", [
    ("gemma3_text", True, {"use_bidirectional_attention": True}),
    ("qwen3", False, {}),
])  # fmt: skip
def test_export_round_trip_per_family(model_dir, tmp_path, family, causal_lm, overrides):
    """Gemma3 bidirectional (its halved window written back as stored) and a plain *Model."""
    model, tok, info = hf.load_pretrained(model_dir(family, causal_lm, **overrides))
    out = hf.export_pretrained(model, tok, tmp_path / family, info=info)
    assert (out / hf.SAFETENSORS_FILE).exists() and not (out / hf.SAFETENSORS_INDEX).exists()
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == [decoder.ARCHITECTURES[family][int(causal_lm)]]
    ids, mask = batch("left")
    auto = transformers.AutoModel.from_pretrained(out, attn_implementation="eager").eval()
    assert max_err(torch_hidden(auto, ids, mask, mask_positions(mask)), ours(model, ids, mask), mask) <= TOL  # fmt: skip


def test_save_safetensors_shards_like_transformers(tmp_path):
    rs = np.random.RandomState(0)
    tensors = {f"t{i}": rs.randn(100 + i).astype(np.float32) for i in range(6)}
    tensors["big"] = rs.randn(1000).astype(np.float32)
    files = hf.save_safetensors(tensors, tmp_path, max_shard_size=1000)
    index = json.loads((tmp_path / hf.SAFETENSORS_INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    assert files[-1] == hf.SAFETENSORS_INDEX and len(files) == 5  # 2+2+2 small, big alone
    loaded = hf.load_safetensors(tmp_path)
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(loaded[name], array)
    hf.save_safetensors(tensors, tmp_path)  # one file again: the old shards are removed
    assert sorted(p.name for p in tmp_path.iterdir()) == [hf.SAFETENSORS_FILE]


def test_fsdp_and_tensor_parallel_specs():
    """8 fake devices: FSDP splits every decoder matrix over "data"; FSDP+TP splits heads / mlp /
    vocab over "model" (column-parallel q/k/v/gate/up, row-parallel o/down)."""
    config = registry.config_from_hf(
        transformers.MistralConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=4, head_dim=8,
            architectures=["MistralForCausalLM"],
        ).to_dict()
    )  # fmt: skip
    assert config.has_lm_head
    state = nnx.state(nnx.eval_shape(lambda: BiEncoder(config, rngs=nnx.Rngs(0))), nnx.Param)
    params = state.to_pure_dict()
    mesh = sharding.make_mesh(data=4, model=2)
    fsdp = sharding.state_shardings(params, mesh, "fsdp")
    tp = sharding.state_shardings(params, mesh, "fsdp_tp")
    layer, tp_layer = fsdp["encoder"]["layers"][0], tp["encoder"]["layers"][0]
    for block, proj in [("self_attn", "q_proj"), ("self_attn", "o_proj"), ("mlp", "down_proj")]:
        assert "data" in layer[block][proj]["kernel"].spec
    for proj, spec in [("q_proj", ("data", "model")), ("k_proj", ("data", "model")),
                       ("o_proj", ("model", "data"))]:  # fmt: skip
        assert tuple(tp_layer["self_attn"][proj]["kernel"].spec) == spec
    assert tuple(tp_layer["mlp"]["gate_proj"]["kernel"].spec) == ("data", "model")
    assert tuple(tp_layer["mlp"]["down_proj"]["kernel"].spec) == ("model", "data")
    assert tuple(tp["encoder"]["embed_tokens"]["embedding"].spec) == ("model", "data")
    assert tuple(tp["encoder"]["lm_head"]["kernel"].spec) == ("data", "model")
    assert tuple(layer["input_layernorm"]["weight"].spec) == (None,)


def test_parameter_count_and_flops_of_mistral_7b():
    """plan's shapes: our abstract Mistral-7B has transformers' MistralModel parameter count."""
    from gte_jax import plan

    hf_config = plan._transformers_config("mistral-7b")
    config = registry.config_from_hf(hf_config)
    params = nnx.state(nnx.eval_shape(lambda: BiEncoder(config, rngs=nnx.Rngs(0))), nnx.Param)
    ours_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    with torch.device("meta"):
        ref = transformers.MistralModel(transformers.MistralConfig(**hf_config))
    assert ours_count == sum(p.numel() for p in ref.parameters()) == 7_110_660_096
    flops = plan.model_flops(params, 32, 4096, [(1, 128)])
    non_embedding = ours_count - 32000 * 4096
    assert flops == 128 * (6 * non_embedding + 12 * 32 * 128 * 4096)


def test_lm_head_follows_the_tensors_not_the_architectures(model_dir, tmp_path):
    """gte-Qwen2-7B-instruct's config says Qwen2ForCausalLM but it ships no lm_head: load it as a
    plain model; a causal-LM checkpoint without `architectures` keeps its head."""
    import shutil

    plain = shutil.copytree(model_dir("qwen2", False), tmp_path / "plain")
    cfg = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps(cfg | {"architectures": ["Qwen2ForCausalLM"]}))
    model, _ = hf.load_model(plain)
    assert not model.config.causal_lm and model.encoder.lm_head is None
    assert registry.family_of(model.config).architecture(model.config) == "Qwen2Model"
    lm = shutil.copytree(model_dir("qwen2"), tmp_path / "lm")
    cfg = json.loads((lm / "config.json").read_text())
    (lm / "config.json").write_text(
        json.dumps({k: v for k, v in cfg.items() if k != "architectures"})
    )
    model, _ = hf.load_model(lm)
    assert model.config.causal_lm and model.encoder.lm_head is not None


def test_attention_override_from_the_config_group():
    from gte_jax import workdir
    from gte_jax.defaults import stage_config

    model_cfg = stage_config("x").model
    assert model_cfg.attention == "auto" and "attention" not in workdir.model_overrides(model_cfg)
    model_cfg.attention = "bidirectional"
    assert workdir.model_overrides(model_cfg)["attention"] == "bidirectional"
    bert_hf = {"model_type": "bert", "hidden_size": 32, "num_attention_heads": 2}
    assert registry.config_from_hf(bert_hf, attention="bidirectional").hidden_size == 32
    with pytest.raises(ValueError, match="bidirectional only"):
        registry.config_from_hf(bert_hf, attention="causal")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_defaults_match_transformers_config_classes(family):
    """A hand-written config.json with only the sizes resolves as transformers' config class
    does (head_dim, RoPE bases, windows, tying, activation, layer types)."""
    full = getattr(transformers, FAMILIES[family][0])().to_dict()
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads")  # fmt: skip
    minimal = {k: full[k] for k in ("model_type", *sizes)}
    ours_min, ours_full = registry.config_from_hf(minimal), registry.config_from_hf(full)
    differ = [
        f.name
        for f in dataclasses.fields(ours_full)
        if getattr(ours_min, f.name) != getattr(ours_full, f.name) and f.name != "pad_token_id"
    ]
    assert not differ, {n: (getattr(ours_min, n), getattr(ours_full, n)) for n in differ}
