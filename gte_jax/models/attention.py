"""Softmax attention for every tower: one mask rule, one reference, the fused kernels.

``attend(q, k, v, mask, kernel=...)`` is the attention of BERT, T5 and the decoders. ``mask`` is a
:class:`Mask`, the *description* of who attends to whom (padding, packed segments, causal, sliding
window), not a [L, L] tensor: the reference and XLA paths expand it (:func:`explicit_mask`, the
one rule), the TPU splash kernel reads its segment ids and a causal / local mask without ever
materialising [L, L].

The rule: query i attends key j iff j is a real token, both are in the same segment (packed rows),
j <= i (causal), and j is inside i's window (sliding layers: causal ``0 <= i - j < w``,
bidirectional ``|i - j| < w // 2 + 1``, with w as config.json stores it; transformers 5.24's
``masking_utils``). Query rows that are padding attend to every real key of their row, so no
softmax row is empty unless the whole row is padding; their outputs are never pooled and never
reach a real token (no real query attends a pad key), so a kernel that treats them differently
(splash: pad tokens form segment 0) gives the same real-token outputs.

Kernels (``model.attention_kernel``; ours):

- ``reference``: float32 einsum logits, ``where(mask, ...)``, float32 softmax — the CPU default
  and every test's oracle. The only path with attention dropout or a logit softcap.
- ``xla``: ``jax.nn.dot_product_attention(implementation="xla")`` with the expanded mask.
- ``cudnn``: the same call with ``implementation="cudnn"`` (cuDNN flash attention; GPU only,
  bfloat16/float16, the mask as cuDNN's bias, ``is_causal`` so the upper triangle is skipped).
- ``splash``: the Pallas TPU splash kernel (``jax.experimental.pallas.ops.tpu.splash_attention``,
  what MaxText runs): block-sparse over the causal / local mask, segment ids for packing and
  padding, grouped-query heads without repeating K/V. TPU only, lengths a multiple of 128,
  no bias.
- ``auto``: the platform's fused kernel where it supports the call (GPU: cudnn; TPU: splash when
  the step is traced under ``jax.set_mesh``, which its ``shard_map`` needs), else ``reference``. Decided per call at trace time, for ``platform`` (the devices the step is
  compiled for; "" = ``jax.default_backend()``; ``gte-jax plan`` passes "tpu").

A kernel named explicitly that cannot run a call (dropout, bias, shapes) raises ValueError naming
the setting; start-up refuses what it can know (:func:`config_problems`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

FUSED = ("xla", "cudnn", "splash")
KERNELS = ("auto", "reference", *FUSED)
# The platform each platform-specific kernel needs (jax's device.platform names).
_NEEDS = {"cudnn": "gpu", "splash": "tpu"}
_AUTO = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}
_SPLASH_BLOCK = 128  # splash tiles queries and keys in blocks of this many tokens


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["attention_mask", "segment_ids"],
    meta_fields=["causal", "window"],
)
@dataclasses.dataclass(frozen=True)
class Mask:
    """Who attends to whom in a [batch, length] self-attention (the rule in the module doc)."""

    attention_mask: jax.Array  # [batch, length] int, 1 = real token
    segment_ids: jax.Array | None = None  # [batch, length] int, packed rows (1, 2, ...; 0 = pad)
    causal: bool = False
    window: int | None = None  # sliding window as config.json stores it; None = full

    def with_window(self, window: int | None) -> Mask:
        return dataclasses.replace(self, window=window)


def explicit_mask(mask: Mask) -> jax.Array:
    """[batch, 1, length or 1, length] bool, True = attend: the rule, expanded (keys only,
    [batch, 1, 1, length], when every query of a row sees the same keys: unpacked, full)."""
    real = mask.attention_mask.astype(bool)  # [batch, length]
    if mask.segment_ids is None and not mask.causal and mask.window is None:
        return real[:, None, None, :]
    index = jnp.arange(real.shape[1])
    distance = index[:, None] - index[None, :]  # [q, kv]: i - j
    allowed = real[:, None, :]  # [batch, 1, kv]
    if mask.segment_ids is not None:
        seg = mask.segment_ids
        allowed = allowed & (seg[:, :, None] == seg[:, None, :])
    if mask.causal:
        allowed = allowed & (distance >= 0)[None]
    if mask.window is not None:
        w = mask.window
        inside = distance < w if mask.causal else jnp.abs(distance) < w // 2 + 1
        allowed = allowed & inside[None]
    pad_query = (~real)[:, :, None]  # [batch, q, 1]
    return (allowed | (pad_query & real[:, None, :]))[:, None]


def reference_attention(
    q: jax.Array,  # [batch, q_len, heads, head_dim]
    k: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
    v: jax.Array,  # [batch, kv_len, kv_heads, head_dim]
    mask: jax.Array,  # [batch, 1, q_len, kv_len] bool, True = attend
    *,
    scale: float,
    bias: jax.Array | None = None,  # broadcastable to [batch, heads, q_len, kv_len], float32
    softcap: float | None = None,
    dropout: Callable[[jax.Array], jax.Array] | None = None,  # on [batch, heads, q_len, kv_len]
) -> jax.Array:
    """Grouped-query softmax attention: float32 logits, softcap, bias, mask, softmax, dropout.

    Query heads are grouped per key/value head ([.., kv_heads, group, ..]), so keys and values are
    never repeated in memory (HF's repeat_kv)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [batch, q_len, kv_heads, group, head_dim]
    logits = jnp.einsum(
        "btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32
    )  # [batch, kv_heads, group, q_len, kv_len]
    logits = logits * scale
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    if bias is not None:
        bias = jnp.broadcast_to(bias, (bias.shape[0], n, t, k.shape[1]))
        logits = logits + bias.reshape(bias.shape[0], kv_heads, n // kv_heads, t, k.shape[1])
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)  # float32
    if dropout is not None:  # on [batch, heads, q_len, kv_len], the heads in HF's order
        probs = dropout(probs.reshape(b, n, t, -1)).reshape(probs.shape)
    out = jnp.einsum(
        "bkgts,bskh->btkgh", probs.astype(v.dtype), v
    )  # [batch, q_len, kv_heads, group, head_dim]
    return out.reshape(b, t, n, h)


def unsupported(
    kernel: str,
    q: jax.Array,
    k: jax.Array,
    *,
    bias: jax.Array | None = None,
    softcap: float | None = None,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> str | None:
    """Why ``kernel`` cannot compute this call (None: it can)."""
    if kernel == "reference":
        return None
    if dropout is not None:
        return "it has no attention dropout (set model.attention_dropout=0)"
    if softcap is not None:
        return "it has no attention logit softcap"
    head_dim = q.shape[-1]
    if kernel == "cudnn":
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            return f"cuDNN flash attention needs bfloat16 or float16, not {q.dtype}"
        if head_dim > 128 or head_dim % 8:
            return f"cuDNN flash attention needs head_dim <= 128 and a multiple of 8 ({head_dim})"
    if kernel == "splash":
        if bias is not None:
            return "the splash kernel takes no bias (T5's relative positions)"
        if q.shape[1] % _SPLASH_BLOCK or k.shape[1] % _SPLASH_BLOCK:
            return f"the splash kernel needs lengths that are multiples of {_SPLASH_BLOCK}"
    return None


def choose(kernel: str, platform: str, q: jax.Array, k: jax.Array, **call) -> str:
    """The kernel that runs this call: ``auto`` -> the platform's fused kernel where it can,
    else ``reference``; a named kernel that cannot -> ValueError naming the setting."""
    if kernel not in KERNELS:
        raise ValueError(f"model.attention_kernel={kernel!r}: use one of {list(KERNELS)}")
    if kernel == "auto":
        fused = _AUTO.get(platform or jax.default_backend())
        if fused == "splash" and "data" not in jax.sharding.get_abstract_mesh().axis_names:
            fused = None  # XLA cannot partition a Mosaic kernel; shard_map needs the mesh
        return fused if fused and unsupported(fused, q, k, **call) is None else "reference"
    why = unsupported(kernel, q, k, **call)
    if why is not None:
        raise ValueError(f"model.attention_kernel={kernel!r} cannot run this attention: {why}")
    return kernel


def attend(
    q: jax.Array,  # [batch, length, heads, head_dim]
    k: jax.Array,  # [batch, length, kv_heads, head_dim]
    v: jax.Array,  # [batch, length, kv_heads, head_dim]
    mask: Mask,
    *,
    kernel: str = "reference",
    platform: str = "",
    scale: float | None = None,
    bias: jax.Array | None = None,  # broadcastable to [batch, heads, length, length] (T5)
    softcap: float | None = None,
    dropout: Callable[[jax.Array], jax.Array] | None = None,  # on the float32 probabilities
) -> jax.Array:
    """Self-attention [batch, length, heads, head_dim] by ``kernel`` (module doc); ``scale``
    default 1/sqrt(head_dim)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    call = dict(bias=bias, softcap=softcap, dropout=dropout)
    chosen = choose(kernel, platform, q, k, **call)
    if chosen == "splash":
        return splash_attention(q, k, v, mask, scale=scale)
    dense = explicit_mask(mask)  # [batch, 1, length or 1, length]
    if chosen == "reference":
        return reference_attention(q, k, v, dense, scale=scale, **call)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        bias=bias,
        mask=dense,
        scale=scale,
        # cuDNN skips the masked upper triangle; the dense mask already holds it.
        is_causal=mask.causal and chosen == "cudnn",
        implementation=chosen,
    )


def _splash_mask(mask: Mask, length: int, heads: int):
    """The splash kernel's static mask (causal / local / full) for ``heads`` query heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    shape, w = (length, length), mask.window
    if w is None:
        base = sm.CausalMask(shape) if mask.causal else sm.FullMask(shape)
    else:  # the module doc's windows: causal 0 <= i - j < w; bidirectional |i - j| <= w // 2
        sides = (w - 1, 0) if mask.causal else (w // 2, w // 2)
        base = sm.LocalMask(shape, sides, offset=0)
    return sm.MultiHeadMask([base] * heads)


def splash_attention(
    q: jax.Array,  # [batch, length, heads, head_dim]
    k: jax.Array,  # [batch, length, kv_heads, head_dim]
    v: jax.Array,  # [batch, length, kv_heads, head_dim]
    mask: Mask,
    *,
    scale: float,
    interpret: bool = False,  # Pallas' interpreter: the kernel's maths on CPU (tests)
) -> jax.Array:
    """The Pallas TPU splash kernel: one MQA kernel per key/value head (grouped-query heads share
    it, K/V never repeated), vmapped over the batch. Padding and packing are segment ids (pads:
    segment 0, attending only pads: the module doc's "never reach a real token"). Under a mesh set
    with ``jax.set_mesh`` it runs per data shard (``shard_map``): a Mosaic kernel cannot be split
    by XLA's partitioner."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    kernel = sk.make_splash_mqa_single_device(
        mask=_splash_mask(mask, t, n // kv_heads), interpret=interpret
    )
    segments = mask.attention_mask if mask.segment_ids is None else mask.segment_ids

    def one_row(q, k, v, seg):  # [kv_heads, group, t, h], [kv_heads, t, h] x2, [t]
        ids = sk.SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, ids))(q, k, v)

    def rows(q, k, v, seg):
        grouped = (
            (q * jnp.asarray(scale, q.dtype))
            .reshape(q.shape[0], t, kv_heads, n // kv_heads, h)
            .transpose(0, 2, 3, 1, 4)
        )  # [batch, kv_heads, group, t, h]
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [batch, kv_heads, t, h]
        out = jax.vmap(one_row)(grouped, kt, vt, seg.astype(jnp.int32))
        return out.transpose(0, 3, 1, 2, 4).reshape(q.shape)  # [batch, t, heads, h]

    abstract = jax.sharding.get_abstract_mesh()
    if abstract.empty or "data" not in abstract.axis_names:
        return rows(q, k, v, segments)
    if "data" in abstract.manual_axes:
        # Already per device inside a shard_map over "data" (GradCache's pass 2): the rows are
        # local, but a Mosaic kernel must be manual on every axis, so the mesh's other axes
        # ("model") get a shard_map of their own, the kernel's inputs whole along them.
        rest = {a for a in abstract.axis_names if a not in abstract.manual_axes}
        if not rest:
            return rows(q, k, v, segments)
        whole = jax.sharding.PartitionSpec()
        return jax.shard_map(
            rows, in_specs=(whole,) * 4, out_specs=whole, axis_names=rest, check_vma=False
        )(q, k, v, segments)
    spec = jax.sharding.PartitionSpec("data")
    return jax.shard_map(rows, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)(
        q, k, v, segments
    )


def config_problems(model_cfg, platform: str, *, train_dropout: bool) -> list[str]:
    """Start-up refusals for ``model.attention_kernel`` on devices of ``platform``: an unknown
    kernel, a platform-specific one elsewhere, a fused one with attention dropout in training."""
    kernel = str(model_cfg.get("attention_kernel", "auto"))
    key = f"model.attention_kernel={kernel!r}"
    if kernel not in KERNELS:
        return [f"{key}: use one of {list(KERNELS)}"]
    needs = _NEEDS.get(kernel)
    if needs is not None and _platform_family(platform) != needs:
        return [f"{key} runs on {needs.upper()} only; this run's devices are {platform}"]
    rate = float(model_cfg.attention_dropout)
    if rate < 0:
        rate = float(model_cfg.dropout)  # -1 too: the checkpoint's own rate, unknown here
    if kernel in FUSED and train_dropout and rate != 0:
        return [
            f"{key} has no attention dropout: set model.attention_dropout=0 "
            "(or model.train_dropout=false, or attention_kernel auto / reference)"
        ]
    return []


def _platform_family(platform: str) -> str:
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform
