"""The Flax encoder against transformers' own PyTorch BERT / XLM-R, on small random configs.

Each reference model is built by transformers from its own config class, seeded, with every
parameter perturbed (so a swapped bias or an untransposed kernel cannot hide behind zeros and
ones), saved as safetensors and loaded by ``gte_jax.hf.load_model``. Pooling references are
written here in NumPy, and cross-checked with sentence-transformers' ``Pooling`` module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gte_jax.hf import load_model  # noqa: E402
from gte_jax.models import (  # noqa: E402
    BiEncoder,
    EncoderConfig,
    TransformerEncoder,
    l2_normalize,
    pool,
)
from gte_jax.models.bert import ACTIVATIONS, explicit_attention  # noqa: E402

FLOAT32_TOL = 1e-5
# bfloat16 keeps 8 mantissa bits (relative step 2^-8 ~ 0.4%). On the 2-layer test model the
# L2-normalised pooled vectors differ from float32 by ~2e-3 (max abs), cosine ~0.999994; the
# bounds below leave a 5x margin.
BF16_TOL = 1e-2
BF16_COS = 0.9999

SMALL = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)


def _save_reference(tmp_path, model) -> None:
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.eval()
    model.save_pretrained(str(tmp_path), safe_serialization=True)


def _bert(tmp_path, **overrides):
    torch.manual_seed(0)
    config = transformers.BertConfig(**{**SMALL, "type_vocab_size": 2, **overrides})
    model = transformers.BertModel(config)
    _save_reference(tmp_path, model)
    return model


def _xlmr(tmp_path):
    torch.manual_seed(0)
    # XLM-R: pad_token_id 1, positions start at 2, one token type.
    config = transformers.XLMRobertaConfig(
        **{**SMALL, "max_position_embeddings": 66}, type_vocab_size=1, pad_token_id=1
    )
    model = transformers.XLMRobertaModel(config)
    _save_reference(tmp_path, model)
    return model


def _batch(pad_id: int, *, left: bool, seed: int = 0, batch: int = 4, length: int = 12):
    """Random ids with varied lengths (one full row), padded right or left with ``pad_id``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, SMALL["vocab_size"], size=(batch, length)).astype(np.int32)
    lengths = np.array([length, 7, 3, 10][:batch])
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    if left:
        mask = mask[:, ::-1].copy()
    ids = np.where(mask == 1, ids, pad_id).astype(np.int32)
    types = (rng.integers(0, 2, size=ids.shape) * mask).astype(np.int32)
    return ids, mask, types


def _torch_hidden(model, ids, mask, types=None) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            token_type_ids=None if types is None else torch.from_numpy(types).long(),
        )
    return out.last_hidden_state.numpy()


def _ours_hidden(model: BiEncoder, ids, mask, types=None) -> np.ndarray:
    return np.asarray(
        model.encoder(
            jnp.asarray(ids), jnp.asarray(mask), None if types is None else jnp.asarray(types)
        )
    )


def _assert_close(ours, ref, tol=FLOAT32_TOL, where=None):
    diff = np.abs(np.asarray(ours) - np.asarray(ref))
    if where is not None:
        diff = diff[where]
    assert diff.max() <= tol, f"max |diff| {diff.max():.3g} > {tol}"


# ----------------------------------------------------------------------------- encoder parity


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_activations_match_transformers(act):
    x = np.linspace(-6, 6, 101, dtype=np.float32)
    expected = transformers.activations.ACT2FN[act](torch.from_numpy(x)).numpy()
    _assert_close(ACTIVATIONS[act](jnp.asarray(x)), expected, tol=1e-6)


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_bert_hidden_states_match_transformers(tmp_path, act):
    ref = _bert(tmp_path, hidden_act=act)
    model, info = load_model(tmp_path)
    assert model.config.hidden_act == act
    assert "pooler.dense.weight" in info.extra_tensors  # kept for export, not used
    for left in (False, True):
        ids, mask, types = _batch(0, left=left)
        _assert_close(_ours_hidden(model, ids, mask, types), _torch_hidden(ref, ids, mask, types))
    # no token_type_ids -> zeros, as HF
    _assert_close(_ours_hidden(model, ids, mask), _torch_hidden(ref, ids, mask))


def test_xlmr_hidden_states_match_transformers(tmp_path):
    ref = _xlmr(tmp_path)
    model, _ = load_model(tmp_path)
    assert model.config.position_offset == 2
    for left in (False, True):
        ids, mask, _ = _batch(1, left=left)
        real = mask.astype(bool)
        # Left padding shifts nothing: positions count non-pad tokens from padding_idx + 1.
        _assert_close(_ours_hidden(model, ids, mask), _torch_hidden(ref, ids, mask), where=real)


def test_full_size_shapes_match_transformers_parameter_count():
    """bert-base sized, without allocating: our params = HF BertModel's minus the pooler."""
    hf_config = transformers.BertConfig()
    with torch.device("meta"):
        ref = transformers.BertModel(hf_config, add_pooling_layer=False)
    ref_count = sum(p.numel() for p in ref.parameters())
    abstract = nnx.eval_shape(
        lambda: TransformerEncoder(EncoderConfig.from_hf(hf_config.to_dict()), rngs=nnx.Rngs(0))
    )
    ours = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(abstract, nnx.Param)))
    assert ours == ref_count


# ----------------------------------------------------------------------------- pooling


def _numpy_pool(hidden: np.ndarray, mask: np.ndarray, mode: str, pool_mask=None) -> np.ndarray:
    """Row-by-row reference, written independently of gte_jax.models.pooling."""
    out = np.zeros((hidden.shape[0], hidden.shape[2]), np.float64)
    for b in range(hidden.shape[0]):
        real = np.flatnonzero(mask[b])
        chosen = [i for i in real if pool_mask is None or pool_mask[b, i]]
        if not chosen:
            continue
        h = hidden[b].astype(np.float64)
        if mode == "mean":
            out[b] = h[chosen].mean(0)
        elif mode == "cls":
            out[b] = h[chosen[0]]
        elif mode == "last":
            out[b] = h[chosen[-1]]
        elif mode == "weighted_mean":
            w = np.array([i - real[0] + 1 for i in chosen], np.float64)
            out[b] = (w[:, None] * h[chosen]).sum(0) / w.sum()
    return out


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    return _bert(path), path


@pytest.fixture(scope="module")
def hidden_states(bert_pair):
    """transformers' hidden states for right- and left-padded batches: the pooling inputs."""
    ref, _ = bert_pair
    out = {}
    for left in (False, True):
        ids, mask, types = _batch(0, left=left)
        out[left] = (_torch_hidden(ref, ids, mask, types), mask)
    return out


def _prompt_mask(mask: np.ndarray, prompt_length: int) -> np.ndarray:
    """1 from the prompt_length-th real token on: excludes a prompt after any left padding."""
    first = mask.argmax(1)
    return (np.arange(mask.shape[1])[None, :] >= first[:, None] + prompt_length).astype(np.int32)


@pytest.mark.parametrize("mode", ["mean", "cls", "last", "weighted_mean"])
@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_pooling_matches_numpy_reference(hidden_states, mode, left):
    hidden, mask = hidden_states[left]
    ours = pool(jnp.asarray(hidden), jnp.asarray(mask), mode)
    _assert_close(ours, _numpy_pool(hidden, mask, mode))
    pool_mask = _prompt_mask(mask, 2)
    ours = pool(jnp.asarray(hidden), jnp.asarray(mask), mode, pool_mask=jnp.asarray(pool_mask))
    _assert_close(ours, _numpy_pool(hidden, mask, mode, pool_mask))


@pytest.mark.parametrize(
    "mode,st_mode",
    [("mean", "mean"), ("cls", "cls"), ("last", "lasttoken"), ("weighted_mean", "weightedmean")],
)
def test_pooling_matches_sentence_transformers_pooling(hidden_states, mode, st_mode):
    from sentence_transformers.sentence_transformer.modules import Pooling

    st_pool = Pooling(SMALL["hidden_size"], pooling_mode=st_mode, include_prompt=False)
    for left in (False, True):
        hidden, mask = hidden_states[left]
        for prompt_length in (0, 2):
            features = {
                "token_embeddings": torch.from_numpy(hidden),
                "attention_mask": torch.from_numpy(mask).long(),
            }
            if prompt_length:
                features["prompt_length"] = prompt_length
            expected = st_pool(features)["sentence_embedding"].numpy()
            pool_mask = jnp.asarray(_prompt_mask(mask, prompt_length))
            _assert_close(
                pool(jnp.asarray(hidden), jnp.asarray(mask), mode, pool_mask=pool_mask), expected
            )


def test_bi_encoder_pools_and_normalises_the_tower_output(bert_pair, hidden_states):
    _, path = bert_pair
    model, _ = load_model(path)
    model.pooling, model.normalize = "weighted_mean", True
    ids, mask, types = _batch(0, left=True)
    hidden, _ = hidden_states[True]
    expected = _numpy_pool(hidden, mask, "weighted_mean")
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    _assert_close(model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)), expected)


def test_l2_normalize_matches_torch():
    x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    x[2] = 0.0
    expected = torch.nn.functional.normalize(torch.from_numpy(x), dim=-1).numpy()
    _assert_close(l2_normalize(jnp.asarray(x)), expected, tol=1e-6)


# ----------------------------------------------------------------------------- numerics


def test_bfloat16_compute_close_to_float32(bert_pair):
    """bf16 matmuls (float32 params, LayerNorm, softmax) stay within BF16_TOL / BF16_COS."""
    _, path = bert_pair
    f32, _ = load_model(path)
    bf16, _ = load_model(path, dtype=jnp.bfloat16)
    f32.normalize = bf16.normalize = True
    ids, mask, types = _batch(0, left=False)
    args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    a, b = np.asarray(f32(*args)), np.asarray(bf16(*args))
    assert b.dtype == np.float32  # output is float32 whatever the compute dtype
    assert bf16.encoder(*args).dtype == jnp.bfloat16
    assert np.abs(a - b).max() <= BF16_TOL
    assert (a * b).sum(1).min() >= BF16_COS
    assert np.abs(a - b).max() > 0  # bf16 really ran


def test_explicit_attention_equals_fused_without_dropout():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32) for _ in range(3))
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)[:, None, None, :]
    fused = jax.nn.dot_product_attention(q, k, v, mask=mask)
    explicit = explicit_attention(q, k, v, mask, dropout_rate=0.0, dropout_uniform=None)
    _assert_close(explicit, fused, tol=1e-6)


def _tiny(**overrides) -> BiEncoder:
    """One layer, hidden and attention dropout on: dropout / remat need no HF reference."""
    config = EncoderConfig(**{**SMALL, "num_hidden_layers": 1, **overrides})
    return BiEncoder(config, rngs=nnx.Rngs(0))


def test_dropout_is_a_pure_function_of_the_key():
    model = _tiny()
    graphdef, params = nnx.split(model, nnx.Param)
    forward = jax.jit(lambda p, ids, mask, rng: nnx.merge(graphdef, p)(ids, mask, dropout_rng=rng))
    ids, mask, _ = _batch(0, left=False)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    key0, key1 = jax.random.key(0), jax.random.key(1)
    a = forward(params, ids, mask, key0)
    np.testing.assert_array_equal(a, forward(params, ids, mask, key0))
    assert np.abs(np.asarray(a) - np.asarray(forward(params, ids, mask, key1))).max() > 1e-3
    eval_mode = forward(params, ids, mask, None)
    assert np.abs(np.asarray(a) - np.asarray(eval_mode)).max() > 1e-3
    _assert_close(eval_mode, model(ids, mask))  # no key = eval mode, jit or not


def test_remat_gives_same_outputs_and_grads():
    ids, mask, _ = _batch(0, left=False)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    def value_and_grads(model: BiEncoder):
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(params, rng):
            emb = nnx.merge(graphdef, params)(ids, mask, dropout_rng=rng)  # [batch, dim]
            return jnp.sum(emb * emb[::-1])

        return jax.jit(jax.value_and_grad(loss))(params, jax.random.key(3))

    # Hidden dropout on: the rematerialised forward must redraw the same masks from the key.
    v0, g0 = value_and_grads(_tiny(remat=False, attention_probs_dropout_prob=0.0))
    v1, g1 = value_and_grads(_tiny(remat=True, attention_probs_dropout_prob=0.0))
    _assert_close(v1, v0)
    for x, y in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1), strict=True):
        _assert_close(y, x)
    assert max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(g0)) > 0


def test_exact_gelu_is_pytorchs_erf_form():
    """HF's "gelu" is PyTorch's exact GELU, x/2 (1 + erf(x/sqrt 2)); ours computes that form (not
    jax.nn.gelu's erfc one, twice the work on the CPU), against float64 SciPy and torch float32,
    far tails included, and its gradient against the float64 derivative."""
    import scipy.special
    import torch

    x = np.concatenate([np.linspace(-12, 12, 4001), [-40.0, -6.5, 0.0, 6.5, 40.0]]).astype(
        np.float32
    )
    ref = x.astype(np.float64) * 0.5 * (1 + scipy.special.erf(x.astype(np.float64) / np.sqrt(2)))
    got = np.asarray(ACTIVATIONS["gelu"](jnp.asarray(x)))
    # Absolute error ~6e-7 where 1 + erf cancels (x near -5): float32 erf's, PyTorch's too.
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-6)
    torch_f32 = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, torch_f32, rtol=2e-6, atol=1e-6)
    grad = np.asarray(jax.vmap(jax.grad(ACTIVATIONS["gelu"]))(jnp.asarray(x)))
    x64 = x.astype(np.float64)
    dref = 0.5 * (1 + scipy.special.erf(x64 / np.sqrt(2))) + x64 * np.exp(-(x64**2) / 2) / np.sqrt(
        2 * np.pi
    )
    np.testing.assert_allclose(grad, dref, rtol=1e-5, atol=1e-6)
    bf16 = ACTIVATIONS["gelu"](jnp.asarray(x, jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16  # keeps the compute dtype

    # The gradient is a custom rule (one fused pass): autodiff of the formula agrees with it, and
    # in bf16 it is the float64 derivative at the bf16 input to bf16 precision.
    def formula(v):
        return v * 0.5 * (1 + jax.lax.erf(v / np.sqrt(2).astype(np.float32)))

    auto = np.asarray(jax.vmap(jax.grad(formula))(jnp.asarray(x)))
    np.testing.assert_allclose(grad, auto, rtol=1e-5, atol=1e-6)
    xb = jnp.asarray(x, jnp.bfloat16)
    _, vjp = jax.vjp(ACTIVATIONS["gelu"], xb)
    (gb,) = vjp(jnp.ones_like(xb))
    assert gb.dtype == jnp.bfloat16
    xb64 = np.asarray(xb.astype(jnp.float32), np.float64)
    dref_b = 0.5 * (1 + scipy.special.erf(xb64 / np.sqrt(2))) + xb64 * np.exp(
        -(xb64**2) / 2
    ) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(np.asarray(gb.astype(jnp.float32)), dref_b, rtol=8e-3, atol=1e-6)
