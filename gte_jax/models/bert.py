"""Flax NNX encoder for the BERT family: BERT (MiniLM, GTE, BGE, E5) and RoBERTa / XLM-R.

The module tree mirrors Hugging Face's ``BertModel`` so that weight names map one to one
(see ``gte_jax.hf``): post-LayerNorm blocks, absolute position embeddings, token types.

Numerics: parameters are float32; matmuls run in ``EncoderConfig.dtype`` (float32 or bfloat16);
LayerNorm and the attention softmax always run in float32. Dropout is on iff a ``dropout_rng`` is
passed, so the forward pass is a pure function of (params, inputs, key) — GradCache replays the
same key in both passes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gte_jax.models.attention as attn
import gte_jax.models.dropout as _dropout
import gte_jax.models.lora_layer as lora
import gte_jax.models.scan as _scan
from gte_jax.models.partitioning import constrain, lookup

# HF `model_type` -> whether position ids start after the padding index (fairseq convention).
SUPPORTED_MODEL_TYPES: dict[str, bool] = {"bert": False, "roberta": True, "xlm-roberta": True}

# The logical axes of every parameter, by the last two components of its path (module attribute
# / parameter): MaxText's names, vocab, embed (model width), heads (heads x head_dim), mlp
# (feed-forward width); None: an axis no rule splits. gte_jax/sharding.py maps them to mesh axes.
_NORM = {"scale": ("embed",), "bias": ("embed",)}
LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "word_embeddings/embedding": ("vocab", "embed"),
    "position_embeddings/embedding": (None, "embed"),
    "token_type_embeddings/embedding": (None, "embed"),
    **{
        f"{norm}/{p}": axes
        for norm in ("layer_norm", "attention_layer_norm", "output_layer_norm")
        for p, axes in _NORM.items()
    },
    **{f"{proj}/kernel": ("embed", "heads") for proj in ("query", "key", "value")},
    **{f"{proj}/bias": ("heads",) for proj in ("query", "key", "value")},
    "attention_output/kernel": ("heads", "embed"),
    "attention_output/bias": ("embed",),
    "intermediate/kernel": ("embed", "mlp"),
    "intermediate/bias": ("mlp",),
    "output/kernel": ("mlp", "embed"),
    "output/bias": ("embed",),
}
# The projections LoRA may wrap, by role (gte_jax/models/lora_layer.py: LORA_ROLES).
LORA_TARGETS: dict[str, str] = {
    "attention_q": "query",
    "attention_k": "key",
    "attention_v": "value",
    "attention_o": "attention_output",
    "mlp_up": "intermediate",
    "mlp_down": "output",
}


_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))


@jax.custom_vjp
def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU as PyTorch computes it, ``x / 2 * (1 + erf(x / sqrt(2)))``. jax.nn.gelu's exact
    form goes through erfc, about twice the work on the CPU (2 % of a MiniLM train step). The
    gradient is its own rule (below)."""
    return (x * 0.5) * (1.0 + jax.lax.erf(x * np.asarray(_SQRT_HALF, x.dtype)))


def _gelu_erf_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return gelu_erf(x), x


def _gelu_erf_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    """d gelu / dx = Phi(x) + x phi(x), from x alone, at float32 or wider: one fused pass over x
    and the cotangent. Autodiff of the forward kept its erf term and took ~3 passes over the
    [tokens, mlp] activations: the MiniLM train step is 8 % faster with this rule (A/B)."""
    wide = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(wide)
    cdf = 0.5 * (1.0 + jax.lax.erf(xf * _SQRT_HALF))
    return (
        (g.astype(wide) * (cdf + xf * _INV_SQRT_2PI * jnp.exp(-0.5 * xf * xf))).astype(x.dtype),
    )


gelu_erf.defvjp(_gelu_erf_fwd, _gelu_erf_bwd)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_erf,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# The HF config fields EncoderConfig reads, with BERT-base defaults where HF has one.
_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "pad_token_id",
)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Architecture of a BERT-family encoder (HF field names) plus our numerics switches."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    model_type: str = "bert"
    # Compute dtype of matmuls / activations. float32 on CPU (bf16 is ~4x slower there).
    dtype: Any = jnp.float32
    # Parameters stay float32 whatever the compute dtype (optimizer maths, exact export).
    param_dtype: Any = jnp.float32
    # Rematerialise each layer in the backward pass (activation memory ~ 1 layer instead of L).
    remat: bool = False
    # Ours: the layers stored stacked and run as one scan (gte_jax/models/scan.py).
    scan_layers: bool = False
    # Which attention kernel runs (gte_jax.models.attention.KERNELS; model.attention_kernel) and
    # the platform "auto" decides for ("" = jax.default_backend(); plan compiles for "tpu").
    attention_kernel: str = "auto"
    attention_platform: str = ""

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; use one of "
                f"{sorted(SUPPORTED_MODEL_TYPES)} (BERT / RoBERTa / XLM-R encoders)."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_offset(self) -> int:
        """First position id of a real token: 0 for BERT, pad_token_id + 1 for RoBERTa/XLM-R."""
        return self.pad_token_id + 1 if SUPPORTED_MODEL_TYPES[self.model_type] else 0

    @property
    def max_length(self) -> int:
        """Longest sequence the position table can hold."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> EncoderConfig:
        """Build from an HF ``config.json`` dict; ``overrides`` set dtype / remat / dropout.

        The generic overrides of every family (``gte_jax.models.registry``): ``dropout`` sets
        both dropout probabilities, ``attention_dropout`` the attention one (applied after it).
        """
        dropout = overrides.pop("dropout", None)
        attention_dropout = overrides.pop("attention_dropout", None)
        attention = overrides.pop("attention", None)
        if attention not in (None, "bidirectional"):
            raise ValueError(
                f"attention={attention!r}: BERT-family encoders are bidirectional only "
                "(model.attention 'auto' or 'bidirectional')."
            )
        if dropout is not None:
            overrides.setdefault("hidden_dropout_prob", float(dropout))
            overrides.setdefault("attention_probs_dropout_prob", float(dropout))
        if attention_dropout is not None:
            overrides["attention_probs_dropout_prob"] = float(attention_dropout)
        model_type = hf.get("model_type", "bert")
        pos_type = hf.get("position_embedding_type", "absolute") or "absolute"
        if pos_type != "absolute":
            raise ValueError(
                f"position_embedding_type {pos_type!r} is not supported (only 'absolute')."
            )
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ValueError("decoder / cross-attention BERT configs are not supported.")
        kwargs = {name: hf[name] for name in _HF_FIELDS if hf.get(name) is not None}
        kwargs["model_type"] = model_type
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` fields this config determines (merge over the original dict)."""
        out = {name: getattr(self, name) for name in _HF_FIELDS}
        out["model_type"] = self.model_type
        out["position_embedding_type"] = "absolute"
        return out


# Logical axes of the activations the layers pin (gte_jax/models/partitioning.py).
BLE = ("batch", "length", "embed")
BLHK = ("batch", "length", "heads", "kv")


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout (as torch): identity when ``rng`` is None or ``rate`` is 0. The masks are
    hashed from the key (``gte_jax.models.dropout``), one rule for every tower."""
    return _dropout.dropout(x, rate, rng)


def _drop(x: jax.Array, rate: float, draws: jax.Array | None) -> jax.Array:
    """Dropout given the site's draws (``gte_jax.models.dropout.bits``; None = off)."""
    return _dropout.drop(x, rate, draws)


def _uniforms(
    rng: jax.Array | None, shapes: list[tuple[int, ...] | None]
) -> list[jax.Array | None]:
    """Draws for several dropout sites of one layer's key (None for a site that is off). Each is
    an elementwise hash of the index, fused by XLA into its consumer (no mask in memory)."""
    return _dropout.site_bits(rng, shapes)


def _split(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
    return [None] * n if rng is None else list(jax.random.split(rng, n))


def explicit_attention(
    q: jax.Array,  # [batch, q_len, heads, head_dim]
    k: jax.Array,  # [batch, kv_len, heads, head_dim]
    v: jax.Array,  # [batch, kv_len, heads, head_dim]
    mask: jax.Array,  # [batch, 1, 1 or q_len, kv_len] bool, True = attend
    *,
    dropout_rate: float,
    dropout_uniform: jax.Array | None,  # [batch, heads, q_len, kv_len] dropout draws
) -> jax.Array:
    """Softmax attention with dropout on the probabilities (what HF BERT does in training):
    ``attention.reference_attention`` with BERT's dropout draws."""
    return attn.reference_attention(
        q,
        k,
        v,
        mask,
        scale=q.shape[-1] ** -0.5,
        dropout=_attention_dropout(dropout_rate, dropout_uniform),
    )


def _attention_dropout(rate: float, draws: jax.Array | None):
    """BERT's dropout on the float32 attention probabilities, or None when it is off."""
    if draws is None or rate == 0.0:
        return None
    return lambda probs: _drop(probs, rate, draws)


class Embeddings(nnx.Module):
    """word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        init = nnx.initializers.normal(0.02)
        pd = config.param_dtype
        self.word_embeddings = nnx.Embed(
            config.vocab_size, config.hidden_size, param_dtype=pd, embedding_init=init, rngs=rngs
        )
        self.position_embeddings = nnx.Embed(
            config.max_position_embeddings,
            config.hidden_size,
            param_dtype=pd,
            embedding_init=init,
            rngs=rngs,
        )
        self.token_type_embeddings = nnx.Embed(
            config.type_vocab_size,
            config.hidden_size,
            param_dtype=pd,
            embedding_init=init,
            rngs=rngs,
        )
        self.layer_norm = _layer_norm(config, rngs)

    def __call__(
        self,
        input_ids: jax.Array,  # [batch, length]
        token_type_ids: jax.Array,  # [batch, length]
        position_ids: jax.Array,  # [batch, length]
        dropout_rng: jax.Array | None,
    ) -> jax.Array:
        x = (
            lookup(self.word_embeddings.embedding[...], input_ids)
            + lookup(self.position_embeddings.embedding[...], position_ids)
            + lookup(self.token_type_embeddings.embedding[...], token_type_ids)
        )  # [batch, length, embed] float32 (the tables' param dtype, as nnx.Embed)
        x = self.layer_norm(x).astype(self.config.dtype)
        x = constrain(x, BLE)  # the table gather's output: split by batch, never gathered
        return dropout(x, self.config.hidden_dropout_prob, dropout_rng)


def _layer_norm(config: EncoderConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # float32 and the two-pass variance, as torch.nn.LayerNorm computes it.
    return nnx.LayerNorm(
        config.hidden_size,
        epsilon=config.layer_norm_eps,
        dtype=jnp.float32,
        param_dtype=config.param_dtype,
        use_fast_variance=False,
        rngs=rngs,
    )


def _linear(config: EncoderConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )


class EncoderLayer(nnx.Module):
    """One post-LN transformer block: self-attention + residual + LN, MLP + residual + LN."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, f = config.hidden_size, config.intermediate_size
        self.query = _linear(config, d, d, rngs)
        self.key = _linear(config, d, d, rngs)
        self.value = _linear(config, d, d, rngs)
        self.attention_output = _linear(config, d, d, rngs)
        self.attention_layer_norm = _layer_norm(config, rngs)
        self.intermediate = _linear(config, d, f, rngs)
        self.output = _linear(config, f, d, rngs)
        self.output_layer_norm = _layer_norm(config, rngs)

    def __call__(
        self,
        x: jax.Array,  # [batch, length, embed]
        mask: attn.Mask,
        dropout_rng: jax.Array | None,
    ) -> jax.Array:
        cfg = self.config
        b, n = x.shape[0], x.shape[1]
        heads = (b, n, cfg.num_attention_heads, cfg.head_dim)
        attn_drop = dropout_rng is not None and cfg.attention_probs_dropout_prob > 0.0
        hidden_drop = cfg.hidden_dropout_prob > 0.0
        attn_u, attn_out_u, mlp_u = _uniforms(
            dropout_rng,
            [
                (b, cfg.num_attention_heads, n, n) if attn_drop else None,
                (b, n, cfg.hidden_size) if hidden_drop else None,
                (b, n, cfg.hidden_size) if hidden_drop else None,
            ],
        )
        # LoRA layers' dropout keys (None for plain Linears: nothing more is drawn).
        q_key, k_key, v_key, o_key, i_key, out_key = lora.site_keys(
            dropout_rng,
            [self.query, self.key, self.value, self.attention_output, self.intermediate,
             self.output],
        )  # fmt: skip
        x = constrain(x, BLE)
        q = lora.dense(self.query, x, q_key).reshape(heads)  # [batch, length, heads, head_dim]
        k = lora.dense(self.key, x, k_key).reshape(heads)  # [batch, length, heads, head_dim]
        v = lora.dense(self.value, x, v_key).reshape(heads)  # [batch, length, heads, head_dim]
        q, k, v = (constrain(t, BLHK) for t in (q, k, v))
        ctx = attn.attend(
            q,
            k,
            v,
            mask,
            kernel=cfg.attention_kernel,
            platform=cfg.attention_platform,
            dropout=_attention_dropout(cfg.attention_probs_dropout_prob, attn_u),
        )  # [batch, length, heads, head_dim]
        ctx = constrain(ctx, BLHK).reshape(b, n, cfg.hidden_size)  # [batch, length, embed]
        h = _drop(
            lora.dense(self.attention_output, ctx, o_key), cfg.hidden_dropout_prob, attn_out_u
        )
        x = self.attention_layer_norm(h.astype(jnp.float32) + x.astype(jnp.float32)).astype(
            cfg.dtype
        )  # [batch, length, embed]
        h = ACTIVATIONS[cfg.hidden_act](
            lora.dense(self.intermediate, x, i_key)
        )  # [batch, length, mlp]
        h = constrain(h, ("batch", "length", "mlp"))
        h = _drop(
            lora.dense(self.output, h, out_key), cfg.hidden_dropout_prob, mlp_u
        )  # [batch, length, embed]
        out = self.output_layer_norm(h.astype(jnp.float32) + x.astype(jnp.float32))
        return constrain(out.astype(cfg.dtype), BLE)


def _layer_forward(
    layer: EncoderLayer, x: jax.Array, mask: attn.Mask, dropout_rng: jax.Array | None
) -> jax.Array:
    return layer(x, mask, dropout_rng)


def roberta_position_ids(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """Position ids as HF RoBERTa/XLM-R make them: pad_token_id + 1 + rank among non-pad tokens.

    Pad tokens get ``pad_token_id`` itself; the count runs over non-pad tokens, so left padding
    shifts nothing.
    """
    not_pad = (input_ids != pad_token_id).astype(jnp.int32)  # [batch, length]
    return jnp.cumsum(not_pad, axis=1) * not_pad + pad_token_id


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """0, 1, 2, ... from the first token of each segment of a packed row ([batch, length])."""
    index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
    previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    starts = jnp.where(segment_ids != previous, index, 0)  # [batch, length]
    return index - jax.lax.cummax(starts, axis=1)


def packed_attention_mask(segment_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[batch, 1, length, length] bool: token i attends key j iff j is real and in i's segment.

    Block-diagonal, so each text of a packed row sees only itself. Pad queries (segment 0) attend
    to every real key, as in the unpacked path, so no softmax row is empty unless the whole row is
    padding; their outputs are never pooled.
    """
    return attn.explicit_mask(attn.Mask(attention_mask, segment_ids))


class TransformerEncoder(nnx.Module):
    """BERT / RoBERTa / XLM-R encoder: ids -> last hidden states [batch, length, embed]."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = Embeddings(config, rngs=rngs)
        self.layers = _scan.layer_stack(
            lambda: EncoderLayer(config, rngs=rngs), config.num_hidden_layers, config.scan_layers
        )

    def __call__(
        self,
        input_ids: jax.Array,  # [batch, length] int32
        attention_mask: jax.Array,  # [batch, length] int32, 1 = real token
        token_type_ids: jax.Array | None = None,  # [batch, length] int32
        position_ids: jax.Array | None = None,  # [batch, length] int32
        *,
        segment_ids: jax.Array | None = None,  # [batch, length] int32, packed rows
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Hidden states [batch, length, embed].

        Packed rows (``segment_ids`` given: 1, 2, ... per text, 0 on padding): attention is
        block-diagonal per segment, and ``position_ids`` count from 0 at each text's first token
        (derived from ``segment_ids`` when None); the model adds its position offset (RoBERTa /
        XLM-R: pad_token_id + 1), so each text is embedded as if it were alone in its row.
        Otherwise ``position_ids`` are the absolute ids of the position table, as in HF.
        """
        cfg = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if segment_ids is not None:
            if position_ids is None:
                position_ids = segment_positions(segment_ids)
            position_ids = position_ids + cfg.position_offset
        # Packed rows: block-diagonal per segment. Pad rows attend to the real tokens (as HF), so
        # no softmax row is empty unless a whole sequence is padding (attention.py's rule).
        mask = attn.Mask(attention_mask, segment_ids)
        if position_ids is None:
            if cfg.position_offset:
                position_ids = roberta_position_ids(input_ids, cfg.pad_token_id)
            else:
                position_ids = jnp.broadcast_to(
                    jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape
                )
        rngs = _split(dropout_rng, cfg.num_hidden_layers + 1)
        x = self.embeddings(input_ids, token_type_ids, position_ids, rngs[0])
        if cfg.scan_layers:
            keys = None if dropout_rng is None else jnp.stack(rngs[1:])  # one key per layer
            return _scan.run(
                self.layers,
                lambda layer, x, key: _layer_forward(layer, x, mask, key),
                x,
                keys,
                remat=cfg.remat,
            )  # [batch, length, embed]
        forward = nnx.remat(_layer_forward) if cfg.remat else _layer_forward
        for layer, rng in zip(self.layers, rngs[1:], strict=True):
            x = forward(layer, x, mask, rng)  # [batch, length, embed]
        return x


# ----------------------------------------------------------------------------- HF weight names
# The family's entry in ``gte_jax.models.registry``: torch ``BertModel`` names <-> our tree.

# Name prefixes of task-head checkpoints (BertForMaskedLM, RobertaForMaskedLM, ...).
HF_PREFIXES = ("bert.", "roberta.")
# Tensors that are not encoder parameters: buffers and task heads. Pooler weights are kept and
# written back on export (unused by sentence embeddings, but AutoModel expects them).
HF_IGNORED = re.compile(
    r"(^|\.)(position_ids|token_type_ids)$|^(cls|lm_head|classifier|qa_outputs)\."
)
HF_ARCHITECTURES = {
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "xlm-roberta": "XLMRobertaModel",
}

HF_KEEP = re.compile(r"^pooler\.")


def hf_architecture(config: EncoderConfig) -> str:
    return HF_ARCHITECTURES[config.model_type]


def hf_param_names(config: EncoderConfig) -> dict[str, tuple[tuple[Any, ...], bool]]:
    """torch name (``BertModel`` layout) -> (path in ``BiEncoder``'s param state, transpose?)."""
    emb = ("encoder", "embeddings")
    names: dict[str, tuple[tuple[Any, ...], bool]] = {
        "embeddings.word_embeddings.weight": (emb + ("word_embeddings", "embedding"), False),
        "embeddings.position_embeddings.weight": (
            emb + ("position_embeddings", "embedding"),
            False,
        ),
        "embeddings.token_type_embeddings.weight": (
            emb + ("token_type_embeddings", "embedding"),
            False,
        ),
        "embeddings.LayerNorm.weight": (emb + ("layer_norm", "scale"), False),
        "embeddings.LayerNorm.bias": (emb + ("layer_norm", "bias"), False),
    }
    linears = {
        "attention.self.query": "query",
        "attention.self.key": "key",
        "attention.self.value": "value",
        "attention.output.dense": "attention_output",
        "intermediate.dense": "intermediate",
        "output.dense": "output",
    }
    norms = {
        "attention.output.LayerNorm": "attention_layer_norm",
        "output.LayerNorm": "output_layer_norm",
    }
    for i in range(config.num_hidden_layers):
        layer = ("encoder", "layers", i)
        for torch_name, ours in linears.items():
            names[f"encoder.layer.{i}.{torch_name}.weight"] = (layer + (ours, "kernel"), True)
            names[f"encoder.layer.{i}.{torch_name}.bias"] = (layer + (ours, "bias"), False)
        for torch_name, ours in norms.items():
            names[f"encoder.layer.{i}.{torch_name}.weight"] = (layer + (ours, "scale"), False)
            names[f"encoder.layer.{i}.{torch_name}.bias"] = (layer + (ours, "bias"), False)
    return names


def hf_canonical_name(name: str) -> str:
    for prefix in HF_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    # TF-era checkpoints name LayerNorm parameters gamma/beta; transformers renames them too.
    return re.sub(
        r"LayerNorm\.gamma$",
        "LayerNorm.weight",
        re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name),
    )
