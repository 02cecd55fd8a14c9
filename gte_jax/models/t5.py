"""Flax NNX T5 encoder tower: T5 v1.0 (ReLU feed-forward), v1.1 / FLAN-T5 / mT5 (gated GELU).

The encoder of GTR, sentence-t5 and INSTRUCTOR, as Hugging Face's ``T5EncoderModel`` computes it:
pre-norm blocks with T5's RMS layer norm (no mean subtraction, no bias), no absolute positions
but a learned bias per (relative-position bucket, head) added to the attention logits, computed
once (HF keeps it in block 0) and shared by every layer; unscaled attention logits (the 1/sqrt(d)
is folded into the query initialisation); a final layer norm.

Numerics: parameters are float32; matmuls run in ``T5EncoderConfig.dtype`` (float32 or bfloat16);
the residual stream, the layer norms, the position bias and the attention softmax stay float32
(T5's activations grow along the residual stream: kept in float32, bf16 rounding does not
accumulate over the layers; bf16 compute then stays within 0.04 of float32 states, measured in
tests/test_t5.py).
Dropout is on iff a ``dropout_rng`` is passed, at HF T5's sites: the embeddings, each attention's
probabilities and output, the feed-forward's hidden layer and output, and after the final norm.

Packed rows (``segment_ids``): attention is block-diagonal, and the relative position of key j
for query i is j - i. Inside one segment that is the difference of the two tokens' positions in
their own text, whatever the segment's offset in the row, so each text sees exactly the biases
it would see alone — and the bias stays one [heads, length, length] table shared by every row.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import gte_jax.models.attention as attn
import gte_jax.models.lora_layer as lora
import gte_jax.models.scan as _scan
from gte_jax.models.bert import (
    ACTIVATIONS,
    BLE,
    BLHK,
    _drop,
    _split,
    _uniforms,
    dropout,
)
from gte_jax.models.partitioning import constrain, lookup, whole

# HF model_type -> the encoder-only class sentence-transformers loads for it (mT5 is T5 v1.1's
# architecture with a multilingual vocabulary; UMT5's per-layer position biases are not this).
HF_ARCHITECTURES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel"}
SUPPORTED_MODEL_TYPES = tuple(HF_ARCHITECTURES)

# The logical axes of every parameter by the last two components of its path (names as in
# bert.LOGICAL_AXES). The relative position bias [buckets, heads] is split like the heads it
# biases; "heads" here is heads x d_kv, which need not equal d_model.
LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "word_embeddings/embedding": ("vocab", "embed"),
    "relative_attention_bias/embedding": (None, "heads"),
    "attention_layer_norm/scale": ("embed",),
    "mlp_layer_norm/scale": ("embed",),
    "final_layer_norm/scale": ("embed",),
    **{f"{proj}/kernel": ("embed", "heads") for proj in ("query", "key", "value")},
    "attention_output/kernel": ("heads", "embed"),
    "intermediate/kernel": ("embed", "mlp"),
    "gate/kernel": ("embed", "mlp"),
    "output/kernel": ("mlp", "embed"),
}
# The projections LoRA may wrap, by role; HF's wi_0 (activated) is our gate, wi_1 intermediate.
LORA_TARGETS: dict[str, str] = {
    "attention_q": "query",
    "attention_k": "key",
    "attention_v": "value",
    "attention_o": "attention_output",
    "mlp_gate": "gate",
    "mlp_up": "intermediate",
    "mlp_down": "output",
}

# The HF T5Config fields T5EncoderConfig reads (T5-small's defaults where HF has one).
_HF_FIELDS = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "dropout_rate",
    "layer_norm_epsilon",
    "feed_forward_proj",
    "pad_token_id",
    "n_positions",
)


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """Architecture of a T5 encoder (HF ``T5Config`` field names) plus our numerics switches."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    # "relu" (T5 v1.0), "gated-gelu" (v1.1, FLAN-T5), or any "[gated-]ACT" HF accepts.
    feed_forward_proj: str = "relu"
    pad_token_id: int = 0
    # T5 has no position table; this is only the length its checkpoints were trained at (the
    # field old config.json files carry, and what the tokenizers' model_max_length says).
    n_positions: int = 512
    model_type: str = "t5"
    # Dropout on the attention probabilities; None = dropout_rate (HF T5 has one rate for all).
    attention_dropout_rate: float | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    # Which attention kernel runs (gte_jax.models.attention.KERNELS; model.attention_kernel) and
    # the platform "auto" decides for. The relative position bias rules out splash, so "auto"
    # is the reference einsum on TPU; xla / cudnn take the bias.
    attention_kernel: str = "auto"
    attention_platform: str = ""
    # Ours: the layers stored stacked and run as one scan (gte_jax/models/scan.py).
    scan_layers: bool = False

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not a T5 encoder; use one of "
                f"{list(SUPPORTED_MODEL_TYPES)}."
            )
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                f"feed_forward_proj {self.feed_forward_proj!r} is not of the form 'ACT' or "
                "'gated-ACT' (T5 v1.0: 'relu', v1.1: 'gated-gelu')."
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"feed_forward_proj {self.feed_forward_proj!r}: activation {self.activation!r} "
                f"is not supported; use one of {sorted(ACTIVATIONS)}."
            )
        if self.relative_attention_num_buckets < 4:
            raise ValueError("relative_attention_num_buckets must be >= 4 (bidirectional).")

    # The names every family's config has (gte_jax.models.registry).
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers

    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.d_kv

    @property
    def inner_dim(self) -> int:
        """Width of q/k/v: heads x d_kv (not always d_model: T5-11B has 128 heads of 128)."""
        return self.num_heads * self.d_kv

    @property
    def max_length(self) -> int:
        return self.n_positions

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """HF's ``dense_act_fn``: the last part of feed_forward_proj; "gated-gelu" means the tanh
        GELU ("gelu_new"), as T5 v1.1 was trained."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @property
    def attention_dropout(self) -> float:
        return (
            self.dropout_rate
            if self.attention_dropout_rate is None
            else self.attention_dropout_rate
        )

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> T5EncoderConfig:
        """Build from an HF ``config.json`` dict; ``overrides`` set dtype / remat / dropout.

        Generic overrides (``gte_jax.models.registry``): ``dropout`` sets ``dropout_rate`` (every
        site, as HF), ``attention_dropout`` the attention probabilities' rate alone;
        ``attention`` may only be "bidirectional".
        """
        dropout_ = overrides.pop("dropout", None)
        attention_dropout = overrides.pop("attention_dropout", None)
        attention = overrides.pop("attention", None)
        if attention not in (None, "bidirectional"):
            raise ValueError(
                f"attention={attention!r}: the T5 encoder is bidirectional only "
                "(model.attention 'auto' or 'bidirectional')."
            )
        if dropout_ is not None:
            overrides.setdefault("dropout_rate", float(dropout_))
        if attention_dropout is not None:
            overrides["attention_dropout_rate"] = float(attention_dropout)
        if hf.get("is_decoder"):
            raise ValueError("a T5 decoder config (is_decoder: true) is not an encoder tower.")
        kwargs = {name: hf[name] for name in _HF_FIELDS if hf.get(name) is not None}
        kwargs["model_type"] = hf.get("model_type", "t5")
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` fields this config determines (merge over the original dict)."""
        out = {name: getattr(self, name) for name in _HF_FIELDS}
        out.update(
            model_type=self.model_type,
            dense_act_fn=self.activation,
            is_gated_act=self.is_gated,
            is_encoder_decoder=False,
            use_cache=False,
        )
        return out


def relative_position_bucket(
    relative_position: jax.Array, *, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bidirectional bucket of ``key position - query position`` (HF / Mesh TF's rule).

    Half the buckets per direction; of those, the first half are exact distances 0..n/2-1, the
    rest cover distances up to ``max_distance`` on a log scale (beyond it: the last bucket).
    """
    half = num_buckets // 2
    buckets = (relative_position > 0).astype(jnp.int32) * half
    distance = jnp.abs(relative_position)
    max_exact = half // 2
    # float32 log as HF computes it (bucket edges fall on the same side: tested to +-2000).
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
    large = max_exact + (
        log_ratio / math.log(max_distance / max_exact) * (half - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, half - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)


def _linear(config: T5EncoderConfig, d_in: int, d_out: int, std: float, rngs: nnx.Rngs):
    # T5 has no biases; HF's initialiser scales (the query's includes the missing 1/sqrt(d_kv)).
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=False,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nnx.initializers.normal(std),
        rngs=rngs,
    )


def _rms_norm(config: T5EncoderConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    # x / sqrt(mean(x^2) + eps) * scale, in float32 (HF's T5LayerNorm).
    return nnx.RMSNorm(
        config.d_model,
        epsilon=config.layer_norm_epsilon,
        dtype=jnp.float32,
        param_dtype=config.param_dtype,
        rngs=rngs,
    )


def _attention(
    q: jax.Array,  # [batch, q_len, heads, d_kv]
    k: jax.Array,  # [batch, kv_len, heads, d_kv]
    v: jax.Array,  # [batch, kv_len, heads, d_kv]
    mask: attn.Mask,
    bias: jax.Array,  # [1, heads, q_len, kv_len] float32 relative position bias
    config: T5EncoderConfig,
    uniform: jax.Array | None,  # [batch, heads, q_len, kv_len] U[0, 1) draws, or None
) -> jax.Array:
    """softmax(q.k + bias) v with T5's unscaled logits; dropout on the probabilities if drawn."""
    rate = config.attention_dropout
    drop = None if uniform is None or rate == 0.0 else (lambda p: _drop(p, rate, uniform))
    return attn.attend(
        q,
        k,
        v,
        mask,
        kernel=config.attention_kernel,
        platform=config.attention_platform,
        scale=1.0,
        bias=bias,
        dropout=drop,
    )  # [batch, q_len, heads, d_kv]


class T5Layer(nnx.Module):
    """One pre-norm T5 block: x + attention(norm(x)), then x + feed_forward(norm(x))."""

    def __init__(self, config: T5EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, inner, f = config.d_model, config.inner_dim, config.d_ff
        self.attention_layer_norm = _rms_norm(config, rngs)
        self.query = _linear(config, d, inner, (d * config.d_kv) ** -0.5, rngs)
        self.key = _linear(config, d, inner, d**-0.5, rngs)
        self.value = _linear(config, d, inner, d**-0.5, rngs)
        self.attention_output = _linear(config, inner, d, inner**-0.5, rngs)
        self.mlp_layer_norm = _rms_norm(config, rngs)
        # v1.0: output(act(intermediate(x))). Gated (v1.1): output(act(gate(x)) * intermediate(x)),
        # HF's wi_0 = gate (activated, as Llama's gate_proj) and wi_1 = intermediate.
        self.intermediate = _linear(config, d, f, d**-0.5, rngs)
        self.gate = nnx.data(_linear(config, d, f, d**-0.5, rngs) if config.is_gated else None)
        self.output = _linear(config, f, d, f**-0.5, rngs)

    def __call__(
        self,
        x: jax.Array,  # [batch, length, embed] float32 residual stream
        mask: attn.Mask,
        bias: jax.Array,  # [1, heads, length, length] float32
        dropout_rng: jax.Array | None,
    ) -> jax.Array:
        cfg = self.config
        b, n = x.shape[0], x.shape[1]
        heads = (b, n, cfg.num_heads, cfg.d_kv)
        attn_u, attn_out_u, hidden_u, mlp_out_u = _uniforms(
            dropout_rng,
            [
                (b, cfg.num_heads, n, n) if cfg.attention_dropout > 0.0 else None,
                (b, n, cfg.d_model) if cfg.dropout_rate > 0.0 else None,
                (b, n, cfg.d_ff) if cfg.dropout_rate > 0.0 else None,
                (b, n, cfg.d_model) if cfg.dropout_rate > 0.0 else None,
            ],
        )
        # LoRA layers' dropout keys (None for plain Linears: nothing more is drawn).
        q_key, k_key, v_key, o_key, i_key, g_key, out_key = lora.site_keys(
            dropout_rng,
            [self.query, self.key, self.value, self.attention_output, self.intermediate,
             self.gate, self.output],
        )  # fmt: skip
        x = constrain(x, BLE)  # as BERT's layers (partitioning.py)
        h = self.attention_layer_norm(x).astype(cfg.dtype)  # [batch, length, embed]
        q = lora.dense(self.query, h, q_key).reshape(heads)  # [batch, length, heads, d_kv]
        k = lora.dense(self.key, h, k_key).reshape(heads)  # [batch, length, heads, d_kv]
        v = lora.dense(self.value, h, v_key).reshape(heads)  # [batch, length, heads, d_kv]
        q, k, v = (constrain(t, BLHK) for t in (q, k, v))
        ctx = constrain(_attention(q, k, v, mask, bias, cfg, attn_u), BLHK)
        ctx = ctx.reshape(b, n, cfg.inner_dim)  # [batch, length, heads * d_kv]
        o = lora.dense(self.attention_output, ctx, o_key)  # [batch, length, embed]
        x = x + _drop(o, cfg.dropout_rate, attn_out_u).astype(jnp.float32)
        h = self.mlp_layer_norm(x).astype(cfg.dtype)  # [batch, length, embed]
        up = lora.dense(self.intermediate, h, i_key)  # [batch, length, mlp]
        if self.gate is None:
            h = ACTIVATIONS[cfg.activation](up)
        else:
            h = ACTIVATIONS[cfg.activation](lora.dense(self.gate, h, g_key)) * up
        h = constrain(_drop(h, cfg.dropout_rate, hidden_u), ("batch", "length", "mlp"))
        h = lora.dense(self.output, h, out_key)  # [batch, length, embed]
        return constrain(x + _drop(h, cfg.dropout_rate, mlp_out_u).astype(jnp.float32), BLE)


def _layer_forward(
    layer: T5Layer,
    x: jax.Array,
    mask: attn.Mask,
    bias: jax.Array,
    dropout_rng: jax.Array | None,
) -> jax.Array:
    return layer(x, mask, bias, dropout_rng)


class T5Encoder(nnx.Module):
    """T5 encoder stack: ids -> final-norm hidden states [batch, length, embed]."""

    def __init__(self, config: T5EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.word_embeddings = nnx.Embed(
            config.vocab_size,
            config.d_model,
            param_dtype=config.param_dtype,
            embedding_init=nnx.initializers.normal(1.0),
            rngs=rngs,
        )
        # [buckets, heads]: HF's block-0 relative_attention_bias, shared by every layer.
        self.relative_attention_bias = nnx.Embed(
            config.relative_attention_num_buckets,
            config.num_heads,
            param_dtype=config.param_dtype,
            embedding_init=nnx.initializers.normal(config.d_model**-0.5),
            rngs=rngs,
        )
        self.layers = _scan.layer_stack(
            lambda: T5Layer(config, rngs=rngs), config.num_layers, config.scan_layers
        )
        self.final_layer_norm = _rms_norm(config, rngs)

    def position_bias(self, length: int) -> jax.Array:
        """[1, heads, length, length] float32: the bias for key j seen from query i (j - i)."""
        cfg = self.config
        index = jnp.arange(length, dtype=jnp.int32)
        buckets = relative_position_bucket(
            index[None, :] - index[:, None],
            num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance,
        )  # [length, length]
        # The table whole first: indexing FSDP's row split would all-reduce [q, k, heads].
        table = whole(self.relative_attention_bias.embedding[...])  # [buckets, heads]
        values = jnp.take(table, buckets, axis=0).astype(jnp.float32)  # [q, k, heads]
        return jnp.transpose(values, (2, 0, 1))[None]

    def __call__(
        self,
        input_ids: jax.Array,  # [batch, length] int32
        attention_mask: jax.Array,  # [batch, length] int32, 1 = real token
        token_type_ids: jax.Array | None = None,  # unused: T5 has no token types
        position_ids: jax.Array | None = None,  # unused: positions are relative (module doc)
        *,
        segment_ids: jax.Array | None = None,  # [batch, length] int32, packed rows
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Hidden states [batch, length, embed] in the compute dtype.

        ``token_type_ids`` and ``position_ids`` are accepted for the tower signature and unused:
        relative positions are index differences, which equal per-text position differences
        inside a packed segment, and no query attends across segments.
        """
        del token_type_ids, position_ids
        cfg = self.config
        # Packed rows: block-diagonal; pad rows attend to the real keys (attention.py's rule).
        mask = attn.Mask(attention_mask, segment_ids)
        bias = self.position_bias(input_ids.shape[1])  # [1, heads, length, length]
        rngs = _split(dropout_rng, cfg.num_layers + 2)
        # The table whole, its output split by batch (partitioning.lookup): as nnx.Embed.
        x = lookup(self.word_embeddings.embedding[...], input_ids)  # [batch, length, embed]
        x = dropout(x, cfg.dropout_rate, rngs[0])  # float32
        if cfg.scan_layers:
            keys = None if dropout_rng is None else jnp.stack(rngs[1:-1])  # one key per layer
            x = _scan.run(
                self.layers,
                lambda layer, x, key: _layer_forward(layer, x, mask, bias, key),
                x,
                keys,
                remat=cfg.remat,
            )  # [batch, length, embed] float32
        else:
            forward = nnx.remat(_layer_forward) if cfg.remat else _layer_forward
            for layer, rng in zip(self.layers, rngs[1:-1], strict=True):
                x = forward(layer, x, mask, bias, rng)  # [batch, length, embed] float32
        x = dropout(self.final_layer_norm(x), cfg.dropout_rate, rngs[-1])
        return x.astype(cfg.dtype)


# ----------------------------------------------------------------------------- HF weight names
# The family's entry in ``gte_jax.models.registry``: torch ``T5EncoderModel`` names <-> our tree.

# Tensors of a full T5Model / T5ForConditionalGeneration checkpoint that the encoder does not use.
HF_IGNORED = re.compile(r"^(decoder|lm_head)\.")


def hf_architecture(config: T5EncoderConfig) -> str:
    return HF_ARCHITECTURES[config.model_type]


def hf_param_names(config: T5EncoderConfig) -> dict[str, tuple[tuple[Any, ...], bool]]:
    """torch name (``T5EncoderModel`` layout) -> (path in ``BiEncoder``'s param state, transpose?).

    The token embedding is HF's ``shared.weight`` (``encoder.embed_tokens.weight`` is tied to it:
    ``hf_canonical_name`` maps one onto the other).
    """
    names: dict[str, tuple[tuple[Any, ...], bool]] = {
        "shared.weight": (("encoder", "word_embeddings", "embedding"), False),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (
            ("encoder", "relative_attention_bias", "embedding"),
            False,
        ),
        "encoder.final_layer_norm.weight": (("encoder", "final_layer_norm", "scale"), False),
    }
    ffn = {"wi_0": "gate", "wi_1": "intermediate"} if config.is_gated else {"wi": "intermediate"}
    linears = {
        "layer.0.SelfAttention.q": "query",
        "layer.0.SelfAttention.k": "key",
        "layer.0.SelfAttention.v": "value",
        "layer.0.SelfAttention.o": "attention_output",
        **{f"layer.1.DenseReluDense.{hf}": ours for hf, ours in ffn.items()},
        "layer.1.DenseReluDense.wo": "output",
    }
    norms = {"layer.0.layer_norm": "attention_layer_norm", "layer.1.layer_norm": "mlp_layer_norm"}
    for i in range(config.num_layers):
        layer = ("encoder", "layers", i)
        for torch_name, ours in linears.items():
            names[f"encoder.block.{i}.{torch_name}.weight"] = (layer + (ours, "kernel"), True)
        for torch_name, ours in norms.items():
            names[f"encoder.block.{i}.{torch_name}.weight"] = (layer + (ours, "scale"), False)
    return names


def hf_canonical_name(name: str) -> str:
    # T5EncoderModel writes only shared.weight; some exports carry the tied copy (or only it).
    return "shared.weight" if name == "encoder.embed_tokens.weight" else name
