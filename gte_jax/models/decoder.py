"""Flax NNX decoder tower: Llama, Mistral, Qwen2, Qwen3 and Gemma3 (text), causal or bidirectional.

The module tree mirrors transformers' ``*Model`` classes (``embed_tokens``, ``layers.{i}.self_attn.
q_proj``, ..., ``norm``) so weight names map one to one (``hf_param_names``). What differs between
the families is data in ``DecoderConfig``, not code paths:

- pre-norm blocks with RMSNorm; Gemma3's RMSNorm scales by ``1 + w`` and its blocks add a norm
  after attention and around the MLP ("sandwich"), and it multiplies the embeddings by
  sqrt(hidden_size) (Gemma3TextScaledWordEmbedding);
- grouped-query attention (``num_key_value_heads`` <= heads), Qwen2's q/k/v bias, Qwen3's and
  Gemma3's q/k RMSNorm over each head, Gemma3's ``query_pre_attn_scalar``. Gemma3TextConfig has
  an ``attn_logit_softcapping`` field (None in Gemma 3 checkpoints), but transformers 5.24's
  Gemma3Attention never passes it to its attention function, so it is a no-op there; we match
  transformers and ignore it with a warning (the attention code itself supports a softcap);
- gated MLP ``down(act(gate(x)) * up(x))``: SwiGLU (silu) or GeGLU (gelu_pytorch_tanh);
- RoPE: rope types ``default``, ``linear``, ``llama3`` and ``yarn`` (static: inverse frequencies
  and an attention factor, computed once); Gemma3 has one RoPE per layer type (a global base for
  ``full_attention`` layers, a local one for ``sliding_attention``). ``dynamic`` / ``longrope`` /
  partial rotary are refused at config time;
- sliding windows per layer (``layer_types``): Mistral's ``sliding_window`` on every layer,
  Qwen2/Qwen3's when ``use_sliding_window`` (layers from ``max_window_layers`` on), Gemma3's
  5-local-1-global pattern.

Attention is ``causal`` or ``bidirectional`` by *our* config (``DecoderConfig.attention``; default
from the HF config: Gemma3's ``use_bidirectional_attention``, else causal; ``attention=`` is a
config override), never by which kernel runs: one mask description (``attention.Mask``) is built
for every call — batch size 1, padded or packed alike — and ``attention.attend`` runs it on the
kernel of ``model.attention_kernel`` (reference einsum, XLA, cuDNN, TPU splash). Token i may attend to key j iff j is a real token, both are in the same segment (packed rows),
j <= i (causal), and j is inside i's window (sliding layers). Windows follow transformers 5.24
(``masking_utils`` and ``Gemma3TextModel``): causal ``0 <= i - j < w``; bidirectional
``|i - j| < w // 2 + 1``, where w is ``sliding_window`` as config.json stores it (Gemma3TextConfig
halves it at load when bidirectional: "due to fa we set exclusive bounds"). Distances are index
distances, as in transformers; inside one segment they equal position distances. Query rows that
are padding attend to every real key of their row (their outputs are never pooled; no softmax row
is empty unless the whole row is padding).

Positions. transformers 5.24's ``LlamaModel`` / ``MistralModel`` / ``Qwen2Model`` / ``Qwen3Model``
/ ``Gemma3TextModel`` forward, called without ``position_ids`` (what sentence-transformers does),
uses ``arange(length)`` whatever the padding; ``generate`` derives them from the attention mask
(``cumsum(mask) - 1``). We default to the latter — positions count from 0 at the first real token,
so left padding shifts nothing. RoPE scores depend only on position differences, so the two agree
up to float rounding (tests compare both). Packed rows (``segment_ids``) restart positions at each
text's first token (``bert.segment_positions``) unless ``position_ids`` are given. transformers
itself only detects packing from ``position_ids`` when no attention mask is passed; we take it
from ``segment_ids``.

Numerics: parameters float32; matmuls in ``DecoderConfig.dtype``; RMSNorm, the RoPE tables and
the attention logits/softmax in float32 (RMSNorm's weight is applied in float32 before the cast,
as Gemma does; Llama-family torch applies it after the cast — identical in float32, within the
measured bf16 tolerance otherwise). Dropout (attention probabilities, and ``hidden_dropout`` on each
block's output before the residual add — ours, HF decoders have none) is on iff ``dropout_rng`` is
given.

The LM head (``lm_logits``): ``lm_head`` when the checkpoint is a ``*ForCausalLM`` with untied
embeddings, else the embedding matrix (tied); Gemma's ``final_logit_softcapping`` when set.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gte_jax.models.attention as attn
import gte_jax.models.lora_layer as lora
import gte_jax.models.scan as _scan
from gte_jax.models.bert import ACTIVATIONS, BLE, BLHK, dropout, segment_positions
from gte_jax.models.partitioning import constrain, lookup

logger = logging.getLogger(__name__)

# HF model_type -> (plain model class, causal-LM class) written to an export's `architectures`.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaModel", "LlamaForCausalLM"),
    "mistral": ("MistralModel", "MistralForCausalLM"),
    "qwen2": ("Qwen2Model", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Model", "Qwen3ForCausalLM"),
    "gemma3_text": ("Gemma3TextModel", "Gemma3ForCausalLM"),
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)

# The logical axes of every parameter by the last two components of its path (names as in
# bert.LOGICAL_AXES; HF's module names). k/v's "heads" are kv_heads x head_dim; "kv" is one
# head's width (Qwen3 / Gemma3 q/k norms), which no rule splits.
_NORMS = (  # Gemma3's sandwich norms included; "norm" is the final one
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "norm",
)
LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "embed_tokens/embedding": ("vocab", "embed"),
    "lm_head/kernel": ("embed", "vocab"),
    **{f"{norm}/weight": ("embed",) for norm in _NORMS},
    "q_norm/weight": ("kv",),
    "k_norm/weight": ("kv",),
    **{f"{proj}/kernel": ("embed", "heads") for proj in ("q_proj", "k_proj", "v_proj")},
    **{f"{proj}/bias": ("heads",) for proj in ("q_proj", "k_proj", "v_proj")},
    "o_proj/kernel": ("heads", "embed"),
    "o_proj/bias": ("embed",),
    **{f"{proj}/kernel": ("embed", "mlp") for proj in ("gate_proj", "up_proj")},
    **{f"{proj}/bias": ("mlp",) for proj in ("gate_proj", "up_proj")},
    "down_proj/kernel": ("mlp", "embed"),
    "down_proj/bias": ("embed",),
}
# The projections LoRA may wrap, by role (the LM head is not one: E5-mistral / LLM2Vec / PEFT).
LORA_TARGETS: dict[str, str] = {
    "attention_q": "q_proj",
    "attention_k": "k_proj",
    "attention_v": "v_proj",
    "attention_o": "o_proj",
    "mlp_gate": "gate_proj",
    "mlp_up": "up_proj",
    "mlp_down": "down_proj",
}

ATTENTION_MODES = ("causal", "bidirectional")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
FULL, SLIDING = "full_attention", "sliding_attention"
# Our key in an exported config.json when attention is bidirectional in a family whose HF config
# has no switch for it (transformers runs those causal; gte-jax reads the key back).
ATTENTION_KEY = "gte_jax_attention"

_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "attention_dropout",
    "tie_word_embeddings",
)
# Family defaults where the HF config class has its own (transformers 5.24 config classes).
# Only hand-written config.json files lack these: save_pretrained writes every field.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rope_theta": 10000.0, "tie_word_embeddings": False, "max_position_embeddings": 2048},
    "mistral": {
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "sliding_window": 4096,
        "max_position_embeddings": 131072,
    },
    "qwen2": {
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "max_window_layers": 28,
        "max_position_embeddings": 32768,
    },
    "qwen3": {
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "max_window_layers": 28,
        "max_position_embeddings": 32768,
        "head_dim": 128,
    },
    "gemma3_text": {
        "max_position_embeddings": 131072,
        "head_dim": 256,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "tie_word_embeddings": True,
        "sliding_window": 4096,
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": 256,
        "hidden_activation": "gelu_pytorch_tanh",
    },
}


def _freeze(value: Any) -> Any:
    """dict/list -> sorted tuples (the config is a hashable static of the module graph)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A decoder tower (HF field names where HF has one) plus our attention mode and numerics."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    attention_bias: bool = False  # bias on q/k/v (Qwen2: True)
    attention_out_bias: bool = False  # bias on o_proj (Llama's attention_bias covers both)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3, Gemma3
    gemma: bool = False  # (1 + w) RMSNorm, sandwich norms, sqrt(hidden) embedding scale
    query_pre_attn_scalar: float | None = None  # Gemma3: logits scaled by this ** -0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # One entry per layer: "full_attention" | "sliding_attention".
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None  # as config.json stores it (see the module docstring)
    # Frozen RoPE parameters per layer type: ((layer type, ((key, value), ...)), ...).
    rope: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    attention: str = "causal"
    tie_word_embeddings: bool = False
    causal_lm: bool = False  # the checkpoint (and the export) is *ForCausalLM
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0  # ours: on each block output before the residual add
    pad_token_id: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    # Which attention kernel runs (gte_jax.models.attention.KERNELS; model.attention_kernel) and
    # the platform "auto" decides for ("" = jax.default_backend(); plan compiles for "tpu").
    attention_kernel: str = "auto"
    attention_platform: str = ""
    # Ours: the layers stored stacked and run as one scan (gte_jax/models/scan.py).
    scan_layers: bool = False

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not a supported decoder; use one of "
                f"{list(SUPPORTED_MODEL_TYPES)}."
            )
        if self.attention not in ATTENTION_MODES:
            raise ValueError(
                f"attention={self.attention!r}: use one of {ATTENTION_MODES} "
                "(model.attention in the config)."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}."
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers."
            )
        unknown = sorted(set(self.layer_types) - {FULL, SLIDING})
        if unknown:
            raise ValueError(f"layer_types {unknown} are not supported (only {FULL}, {SLIDING}).")
        for layer_type in set(self.layer_types):
            _inv_freq(self, layer_type)  # refuses unsupported RoPE types now, not at trace time

    @property
    def max_length(self) -> int:
        return self.max_position_embeddings

    @property
    def has_lm_head(self) -> bool:
        """An ``lm_head`` parameter of its own (else the LM head is the embedding matrix)."""
        return self.causal_lm and not self.tie_word_embeddings

    def rope_parameters(self, layer_type: str) -> dict[str, Any]:
        table = dict(self.rope)
        return dict(table[layer_type] if layer_type in table else table[FULL])

    def window(self, layer_type: str) -> int | None:
        return self.sliding_window if layer_type == SLIDING else None

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> DecoderConfig:
        """From an HF ``config.json`` dict; overrides: our fields plus the generic ``dtype``,
        ``remat``, ``dropout`` (attention and hidden dropout), ``attention_dropout``, and
        ``attention`` ("causal" | "bidirectional"; default from the HF config)."""
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"model_type {model_type!r} is not a supported decoder; use one of "
                f"{list(SUPPORTED_MODEL_TYPES)} (multimodal gemma3 checkpoints: extract the "
                "text model, model_type gemma3_text)."
            )
        if hf.get("auto_map"):
            raise ValueError("configs with auto_map (remote code) are not supported.")
        drop = overrides.pop("dropout", None)
        if drop is not None:
            overrides.setdefault("hidden_dropout", float(drop))
            overrides.setdefault("attention_dropout", float(drop))
        if overrides.get("attention_dropout") is not None:
            overrides["attention_dropout"] = float(overrides["attention_dropout"])
        kwargs = _from_hf_fields(model_type, hf)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The config.json fields this config determines (merged over the source's dict)."""
        out = {name: getattr(self, name) for name in _HF_FIELDS}
        out["model_type"] = self.model_type
        out["hidden_activation" if self.gemma else "hidden_act"] = self.hidden_act
        rope = {t: self.rope_parameters(t) for t, _ in self.rope}
        out["rope_parameters"] = rope if self.gemma else rope[FULL]
        if self.model_type in ("qwen2", "qwen3", "gemma3_text"):  # the others have no such field
            out["layer_types"] = list(self.layer_types)
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = self.sliding_window is not None and SLIDING in (
                self.layer_types
            )
            if self.sliding_window is not None:
                out["sliding_window"] = self.sliding_window
        if self.gemma:
            out["sliding_window"] = self.sliding_window
            out["query_pre_attn_scalar"] = self.query_pre_attn_scalar
            out["final_logit_softcapping"] = self.final_logit_softcapping
            out["use_bidirectional_attention"] = self.attention == "bidirectional"
        else:
            out[ATTENTION_KEY] = self.attention
        return out


def _rope_table(model_type: str, hf: dict[str, Any]) -> tuple:
    """RoPE parameters per layer type, standardised as transformers 5 does (``rope_parameters``,
    or the legacy ``rope_theta`` / ``rope_scaling`` / Gemma3 ``rope_local_base_freq``)."""
    defaults = _FAMILY_DEFAULTS[model_type]
    params = hf.get("rope_parameters")
    if model_type == "gemma3_text":
        params = dict(params or {})
        full = dict(params.get(FULL) or {"rope_type": "default"})
        full.update(hf.get("rope_scaling") or {})
        full.setdefault("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))
        local = dict(params.get(SLIDING) or {"rope_type": "default"})
        local.setdefault(
            "rope_theta", hf.get("rope_local_base_freq", defaults["rope_local_base_freq"])
        )
        table = {FULL: full, SLIDING: local}
    else:
        one = dict(params or hf.get("rope_scaling") or {"rope_type": "default"})
        one.setdefault("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))
        table = {FULL: one}
    for one in table.values():
        if "type" in one:  # legacy spelling
            one.setdefault("rope_type", one.pop("type"))
        one.setdefault("rope_type", "default")
        if one["rope_type"] in ("yarn", "llama3"):
            one.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return _freeze(table)


def _layer_types(model_type: str, hf: dict[str, Any], layers: int) -> tuple[tuple[str, ...], Any]:
    """(layer_types, sliding_window) as the family's transformers config resolves them."""
    defaults = _FAMILY_DEFAULTS[model_type]
    window = hf.get("sliding_window", defaults.get("sliding_window"))
    if model_type == "llama":
        return (FULL,) * layers, None
    if model_type == "mistral":  # MistralModel ignores layer_types: every layer or none slides
        return ((SLIDING if window is not None else FULL),) * layers, window
    if model_type in ("qwen2", "qwen3"):
        window = window if hf.get("use_sliding_window", False) else None
        if hf.get("layer_types"):
            types = tuple(hf["layer_types"])
        else:
            start = hf.get("max_window_layers", defaults["max_window_layers"])
            types = tuple(
                SLIDING if window is not None and i >= start else FULL for i in range(layers)
            )
        return tuple(t if window is not None else FULL for t in types), window
    pattern = hf.get("sliding_window_pattern", defaults["sliding_window_pattern"])
    types = tuple(
        hf.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    )
    return types, window


def _from_hf_fields(model_type: str, hf: dict[str, Any]) -> dict[str, Any]:
    """DecoderConfig keyword arguments for an HF config dict (family rules in one place)."""
    defaults = _FAMILY_DEFAULTS[model_type]
    kwargs = {name: hf[name] for name in _HF_FIELDS if hf.get(name) is not None}
    kwargs.setdefault("tie_word_embeddings", defaults["tie_word_embeddings"])
    kwargs.setdefault("max_position_embeddings", defaults["max_position_embeddings"])
    heads = kwargs.get("num_attention_heads", DecoderConfig.num_attention_heads)
    hidden = kwargs.get("hidden_size", DecoderConfig.hidden_size)
    kwargs.setdefault("num_key_value_heads", heads)
    kwargs.setdefault("head_dim", defaults.get("head_dim", hidden // heads))
    layers = kwargs.get("num_hidden_layers", DecoderConfig.num_hidden_layers)
    gemma = model_type == "gemma3_text"
    act = hf.get("hidden_activation" if gemma else "hidden_act") or defaults.get(
        "hidden_activation", "silu"
    )
    kwargs["layer_types"], kwargs["sliding_window"] = _layer_types(model_type, hf, layers)
    bidirectional = bool(hf.get("use_bidirectional_attention")) if gemma else False
    attention = hf.get(ATTENTION_KEY) or ("bidirectional" if bidirectional else "causal")
    architectures = hf.get("architectures") or []
    kwargs.update(
        model_type=model_type,
        hidden_act=act,
        attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        attention_out_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        gemma=gemma,
        query_pre_attn_scalar=(
            hf.get("query_pre_attn_scalar", defaults["query_pre_attn_scalar"]) if gemma else None
        ),
        attn_logit_softcapping=None,  # see _attn_softcap_note
        final_logit_softcapping=hf.get("final_logit_softcapping") if gemma else None,
        rope=_rope_table(model_type, hf),
        attention=attention,
        causal_lm=any(str(a).endswith("ForCausalLM") for a in architectures),
        pad_token_id=hf.get("pad_token_id"),
    )
    if gemma and hf.get("attn_logit_softcapping") is not None:
        logger.warning(
            "gemma3_text: attn_logit_softcapping=%s is ignored, as transformers 5.24's "
            "Gemma3Attention ignores it (Gemma 3 uses q/k norms instead of softcapping).",
            hf["attn_logit_softcapping"],
        )
    if model_type in ("mistral", "qwen2", "gemma3_text") and hf.get("attention_bias"):
        raise ValueError(f"{model_type}: attention_bias=True is not a transformers layout.")
    return kwargs


# ----------------------------------------------------------------------------- RoPE


def _inv_freq(config: DecoderConfig, layer_type: str) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim / 2] float32, attention scaling) as transformers 5.24's
    ``modeling_rope_utils`` computes them for this rope type."""
    p = config.rope_parameters(layer_type)
    kind = p.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"rope_type {kind!r} is not supported; gte-jax implements {list(ROPE_TYPES)} "
            "(dynamic / longrope rescale with the sequence length at run time)."
        )
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported.")
    dim, base = config.head_dim, float(p["rope_theta"])
    inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = 1.0
    if kind == "linear":
        inv = inv / float(p["factor"])
    elif kind == "llama3":
        inv = _llama3(inv, p)
    elif kind == "yarn":
        inv, scaling = _yarn(inv, p, dim, base, config.max_position_embeddings)
    return inv.astype(np.float32), float(scaling)


def _llama3(inv: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    factor, low, high = (
        float(p["factor"]),
        float(p["low_freq_factor"]),
        float(p["high_freq_factor"]),
    )
    old = float(p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled)


def _yarn(
    inv: np.ndarray, p: dict[str, Any], dim: int, base: float, max_positions: int
) -> tuple[np.ndarray, float]:
    original = float(p["original_max_position_embeddings"])
    factor = p.get("factor") or max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = p.get("attention_factor")
    if attention is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction(p.get("beta_fast") or 32), correction(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return inv / factor * (1 - extrapolation) + inv * extrapolation, attention


def rope_tables(
    config: DecoderConfig, layer_type: str, positions: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [batch, length, head_dim] in the compute dtype (float32 angles, as HF)."""
    inv, scaling = _inv_freq(config, layer_type)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)  # [batch, length, dim/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)  # [batch, length, head_dim]
    return (
        (jnp.cos(angles) * scaling).astype(config.dtype),
        (jnp.sin(angles) * scaling).astype(config.dtype),
    )


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [batch, length, heads, head_dim] rotated (HF's rotate_half layout)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ----------------------------------------------------------------------------- masks


def attention_masks(
    config: DecoderConfig, attention_mask: jax.Array, segment_ids: jax.Array | None
) -> dict[str, attn.Mask]:
    """{layer type: its mask} — the one mask rule (module docstring, ``attention.Mask``)."""
    causal = config.attention == "causal"
    return {
        layer_type: attn.Mask(attention_mask, segment_ids, causal, config.window(layer_type))
        for layer_type in sorted(set(config.layer_types))
    }


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """0, 1, ... from each row's first real token (left padding shifts nothing); pads get 0."""
    count = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1  # [batch, length]
    return jnp.maximum(count, 0) * attention_mask.astype(jnp.int32)


# ----------------------------------------------------------------------------- modules


class RMSNorm(nnx.Module):
    """RMSNorm in float32: x / rms(x) * w (Llama family) or * (1 + w) (Gemma)."""

    def __init__(self, dim: int, config: DecoderConfig):
        self.eps = config.rms_norm_eps
        self.gemma = config.gemma
        # Gemma stores w around 0 (scale 1 + w), the others around 1.
        init = jnp.zeros if config.gemma else jnp.ones
        self.weight = nnx.Param(init((dim,), config.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        weight = self.weight[...].astype(jnp.float32)
        return (normed * (1.0 + weight if self.gemma else weight)).astype(x.dtype)


def _linear(config: DecoderConfig, d_in: int, d_out: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )


def decoder_attention(
    q: jax.Array,  # [batch, q_len, heads, head_dim]
    k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
    v: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
    mask: attn.Mask,
    *,
    config: DecoderConfig,
    scale: float,
    dropout_rng: jax.Array | None,
) -> jax.Array:
    """Grouped-query softmax attention (``attention.attend``, the config's kernel): float32
    logits, softcap, mask, softmax, dropout on the probabilities when ``dropout_rng`` is given."""
    rate = config.attention_dropout
    drop = None if dropout_rng is None or rate == 0.0 else (lambda p: dropout(p, rate, dropout_rng))
    return attn.attend(
        q,
        k,
        v,
        mask,
        kernel=config.attention_kernel,
        platform=config.attention_platform,
        scale=scale,
        softcap=config.attn_logit_softcapping,
        dropout=drop,
    )  # [batch, q_len, heads, head_dim]


class Attention(nnx.Module):
    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, h = config.hidden_size, config.head_dim
        n, kv = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = _linear(config, d, n * h, config.attention_bias, rngs)
        self.k_proj = _linear(config, d, kv * h, config.attention_bias, rngs)
        self.v_proj = _linear(config, d, kv * h, config.attention_bias, rngs)
        self.o_proj = _linear(config, n * h, d, config.attention_out_bias, rngs)
        if config.qk_norm:
            self.q_norm = RMSNorm(h, config)
            self.k_norm = RMSNorm(h, config)

    def __call__(
        self,
        x: jax.Array,  # [batch, length, embed]
        rope: tuple[jax.Array, jax.Array],  # cos, sin [batch, length, head_dim]
        mask: attn.Mask,
        dropout_rng: jax.Array | None,
    ) -> jax.Array:
        cfg = self.config
        b, n = x.shape[0], x.shape[1]
        # LoRA layers' dropout keys (None for plain Linears: nothing more is drawn).
        q_key, k_key, v_key, o_key = lora.site_keys(
            dropout_rng, [self.q_proj, self.k_proj, self.v_proj, self.o_proj]
        )
        q = lora.dense(self.q_proj, x, q_key).reshape(b, n, cfg.num_attention_heads, cfg.head_dim)
        k = lora.dense(self.k_proj, x, k_key).reshape(b, n, cfg.num_key_value_heads, cfg.head_dim)
        v = lora.dense(self.v_proj, x, v_key).reshape(b, n, cfg.num_key_value_heads, cfg.head_dim)
        q, k, v = (constrain(t, BLHK) for t in (q, k, v))  # as BERT's (partitioning.py)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        scalar = cfg.query_pre_attn_scalar if cfg.gemma else cfg.head_dim
        ctx = decoder_attention(
            q, k, v, mask, config=cfg, scale=float(scalar) ** -0.5, dropout_rng=dropout_rng
        )  # [batch, length, heads, head_dim]
        ctx = constrain(ctx, BLHK).reshape(b, n, -1)  # [batch, length, heads * head_dim]
        return lora.dense(self.o_proj, ctx, o_key)  # [batch, length, embed]


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)) — SwiGLU (silu) or GeGLU (gelu_pytorch_tanh)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.act = config.hidden_act
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = _linear(config, d, f, bias, rngs)
        self.up_proj = _linear(config, d, f, bias, rngs)
        self.down_proj = _linear(config, f, d, bias, rngs)

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        # dropout_rng: for LoRA layers' dropout only (the MLP itself has none).
        gate_key, up_key, down_key = lora.site_keys(
            dropout_rng, [self.gate_proj, self.up_proj, self.down_proj]
        )
        h = ACTIVATIONS[self.act](lora.dense(self.gate_proj, x, gate_key)) * lora.dense(
            self.up_proj, x, up_key
        )  # [batch, length, mlp]
        h = constrain(h, ("batch", "length", "mlp"))
        return lora.dense(self.down_proj, h, down_key)  # [batch, length, embed]


class DecoderLayer(nnx.Module):
    """Pre-norm block (Gemma: sandwich norms around attention and MLP)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.hidden_size
        self.self_attn = Attention(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)
        self.input_layernorm = RMSNorm(d, config)
        self.post_attention_layernorm = RMSNorm(d, config)
        if config.gemma:
            self.pre_feedforward_layernorm = RMSNorm(d, config)
            self.post_feedforward_layernorm = RMSNorm(d, config)

    def __call__(
        self,
        x: jax.Array,  # [batch, length, embed]
        rope: tuple[jax.Array, jax.Array],
        mask: jax.Array,
        dropout_rng: jax.Array | None,
    ) -> jax.Array:
        cfg = self.config
        attn_rng, attn_out_rng, mlp_rng = (
            [None] * 3 if dropout_rng is None else list(jax.random.split(dropout_rng, 3))
        )
        x = constrain(x, BLE)
        h = self.self_attn(self.input_layernorm(x), rope, mask, attn_rng)
        if cfg.gemma:
            h = self.post_attention_layernorm(h)
        x = x + dropout(h, cfg.hidden_dropout, attn_out_rng)
        if cfg.gemma:
            h = self.post_feedforward_layernorm(
                self.mlp(self.pre_feedforward_layernorm(x), mlp_rng)
            )
        else:
            h = self.mlp(self.post_attention_layernorm(x), mlp_rng)
        return constrain(x + dropout(h, cfg.hidden_dropout, mlp_rng), BLE)  # [batch, length, embed]


def _layer_forward(
    layer: DecoderLayer,
    x: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    mask: jax.Array,
    dropout_rng: jax.Array | None,
) -> jax.Array:
    return layer(x, rope, mask, dropout_rng)


def _scanned_layers(
    layers: DecoderLayer,
    cfg: DecoderConfig,
    x: jax.Array,
    ropes: dict[str, tuple[jax.Array, jax.Array]],
    masks: dict[str, attn.Mask],
    dropout_rng: jax.Array | None,
) -> jax.Array:
    """The stacked layers as one scan. Layers differ only by their type's mask and RoPE table
    (Gemma3 / Qwen3 sliding windows): the RoPE tables are stacked [types, ...] and each layer
    picks its own by a scanned type index; its mask (static: a window the fused kernels take as
    it is) by ``lax.switch`` on that index, one branch per type. One scan for any interleaving;
    with one layer type (Llama, Mistral, Qwen2) there is no switch."""
    types = sorted(masks)
    index = jnp.asarray([types.index(t) for t in cfg.layer_types], jnp.int32)  # [layers]
    cos_stack = jnp.stack([ropes[t][0] for t in types])  # [types, batch, length, head_dim]
    sin_stack = jnp.stack([ropes[t][1] for t in types])
    keys = None
    if dropout_rng is not None:
        keys = jax.random.split(dropout_rng, cfg.num_hidden_layers)  # the unrolled loop's keys

    def forward(layer: DecoderLayer, x: jax.Array, xs: tuple) -> jax.Array:
        t, key = xs
        rope = (cos_stack[t], sin_stack[t])
        if len(types) == 1:
            return _layer_forward(layer, x, rope, masks[types[0]], key)
        branches = [
            lambda x, m=masks[name]: _layer_forward(layer, x, rope, m, key) for name in types
        ]
        return jax.lax.switch(t, branches, x)

    return _scan.run(layers, forward, x, (index, keys), remat=cfg.remat)


class DecoderTower(nnx.Module):
    """Llama / Mistral / Qwen2 / Qwen3 / Gemma3 decoder: ids -> final-normed hidden [B, L, D]."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            param_dtype=config.param_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.layers = _scan.layer_stack(
            lambda: DecoderLayer(config, rngs=rngs), config.num_hidden_layers, config.scan_layers
        )
        self.norm = RMSNorm(config.hidden_size, config)
        self.lm_head = nnx.data(
            _linear(config, config.hidden_size, config.vocab_size, False, rngs)
            if config.has_lm_head
            else None
        )

    def __call__(
        self,
        input_ids: jax.Array,  # [batch, length] int32
        attention_mask: jax.Array,  # [batch, length] int32, 1 = real token
        token_type_ids: jax.Array | None = None,  # unused (decoders have none)
        position_ids: jax.Array | None = None,  # [batch, length] int32
        *,
        segment_ids: jax.Array | None = None,  # [batch, length] int32, packed rows
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [batch, length, embed] (compute dtype).

        ``position_ids`` default: from each text's first token (``segment_ids`` given: per packed
        segment; else from the attention mask, so left padding shifts nothing).
        """
        cfg = self.config
        del token_type_ids
        if position_ids is None:
            position_ids = (
                segment_positions(segment_ids)
                if segment_ids is not None
                else default_positions(attention_mask)
            )
        # The table whole, its output split by batch (partitioning.lookup): as nnx.Embed.
        x = lookup(self.embed_tokens.embedding[...], input_ids)  # [batch, length, embed] float32
        if cfg.gemma:
            x = x * jnp.float32(cfg.hidden_size**0.5)
        x = x.astype(cfg.dtype)
        masks = attention_masks(cfg, attention_mask, segment_ids)
        ropes = {t: rope_tables(cfg, t, position_ids) for t in masks}
        rngs = (
            [None] * cfg.num_hidden_layers
            if dropout_rng is None
            else list(jax.random.split(dropout_rng, cfg.num_hidden_layers))
        )
        if cfg.scan_layers:
            x = _scanned_layers(self.layers, cfg, x, ropes, masks, dropout_rng)
        else:
            forward = nnx.remat(_layer_forward) if cfg.remat else _layer_forward
            for layer, layer_type, rng in zip(self.layers, cfg.layer_types, rngs, strict=True):
                x = forward(layer, x, ropes[layer_type], masks[layer_type], rng)
        return self.norm(x)

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """[batch, length, embed] -> float32 logits [batch, length, vocab] (tied or lm_head)."""
        return head_logits(self.config, self.lm_head_kernel(), hidden)

    def lm_head_kernel(self) -> jax.Array:
        """The LM head as one [embed, vocab] matrix: ``lm_head``'s, or the tied embeddings'
        transpose (so a gradient through it reaches the embeddings)."""
        if self.lm_head is None and not self.config.tie_word_embeddings:
            raise ValueError(
                "this decoder has no LM head: load a *ForCausalLM checkpoint (lm_head.weight) or "
                "one with tie_word_embeddings=True."
            )
        if self.lm_head is not None:
            return self.lm_head.kernel[...]  # [embed, vocab]
        return self.embed_tokens.embedding[...].T  # [embed, vocab]


def head_logits(config: DecoderConfig, kernel: jax.Array, hidden: jax.Array) -> jax.Array:
    """The LM head on hidden states [..., embed] -> float32 logits [..., vocab]: a pure function
    of the head's kernel [embed, vocab] (the MNTP loss calls it on the masked positions only),
    Gemma's ``final_logit_softcapping`` included."""
    logits = jnp.einsum(
        "...d,dv->...v",
        hidden.astype(config.dtype),
        kernel.astype(config.dtype),
        preferred_element_type=jnp.float32,
    )
    if config.final_logit_softcapping is not None:
        cap = config.final_logit_softcapping
        logits = jnp.tanh(logits / cap) * cap
    return logits


# ----------------------------------------------------------------------------- HF weight names
# The family's entry in ``gte_jax.models.registry``. Names are canonical without the ``model.``
# prefix of *ForCausalLM checkpoints; ``hf_export_name`` puts it back for a causal-LM export.

# Buffers of old checkpoints; a tied checkpoint's redundant lm_head copy.
HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|^lm_head\.weight$")


def hf_architecture(config: DecoderConfig) -> str:
    return ARCHITECTURES[config.model_type][1 if config.causal_lm else 0]


def hf_canonical_name(name: str) -> str:
    return name[len("model.") :] if name.startswith("model.") else name


def fit_to_tensors(config: DecoderConfig, names: set[str]) -> DecoderConfig:
    """An untied checkpoint has an LM head iff it holds ``lm_head.weight``, whatever its
    ``architectures`` say (gte-Qwen2-7B-instruct says Qwen2ForCausalLM and ships no head)."""
    if config.tie_word_embeddings:
        return config
    return dataclasses.replace(config, causal_lm="lm_head.weight" in names)


def hf_export_name(config: DecoderConfig, name: str) -> str:
    return "model." + name if config.causal_lm and not name.startswith("lm_head.") else name


def hf_param_names(config: DecoderConfig) -> dict[str, tuple[tuple[Any, ...], bool]]:
    """torch name (``*Model`` layout) -> (path in ``BiEncoder``'s param state, transpose?)."""
    names: dict[str, tuple[tuple[Any, ...], bool]] = {
        "embed_tokens.weight": (("encoder", "embed_tokens", "embedding"), False),
        "norm.weight": (("encoder", "norm", "weight"), False),
    }
    if config.has_lm_head:
        names["lm_head.weight"] = (("encoder", "lm_head", "kernel"), True)
    linears = {
        "self_attn": [
            ("q_proj", config.attention_bias),
            ("k_proj", config.attention_bias),
            ("v_proj", config.attention_bias),
            ("o_proj", config.attention_out_bias),
        ],
        "mlp": [(p, config.mlp_bias) for p in ("gate_proj", "up_proj", "down_proj")],
    }
    norms = ["input_layernorm", "post_attention_layernorm"]
    if config.gemma:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(config.num_hidden_layers):
        layer = ("encoder", "layers", i)
        for block, projections in linears.items():
            for proj, bias in projections:
                torch_name = f"layers.{i}.{block}.{proj}"
                names[f"{torch_name}.weight"] = (layer + (block, proj, "kernel"), True)
                if bias:
                    names[f"{torch_name}.bias"] = (layer + (block, proj, "bias"), False)
        for norm in norms:
            names[f"layers.{i}.{norm}.weight"] = (layer + (norm, "weight"), False)
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                names[f"layers.{i}.self_attn.{norm}.weight"] = (
                    layer + ("self_attn", norm, "weight"),
                    False,
                )
    return names
