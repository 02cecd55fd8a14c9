"""The compute dtype of a run: ``model.dtype`` = float32 | bfloat16 | auto.

Parameters, optimizer state and the export are float32 whatever this says; it sets the dtype of
the towers' matmuls and activations (:mod:`gte_jax.models.linear`: bf16 operands, float32
accumulation, float32 parameter gradients; LayerNorm, softmax and the loss stay float32).

``auto`` is bfloat16 where it is the fast choice and float32 elsewhere:

- TPU and GPU: bfloat16 (MXU / tensor cores);
- CPU with AMX-BF16 (Intel Sapphire Rapids and later): bfloat16. Measured on such a 2-core
  machine: the MiniLM fine-tune step 3.9-4.1 s (f32) -> 1.64 s (bf16) (``benchmarks/README.md``);
- CPU with AVX-512 BF16 and no AMX (AMD EPYC Zen 4): bfloat16. Measured on such a 2-core
  machine (``benchmarks/dtype_step.py``, 2026-12-06, in-process A/B of the compiled MiniLM step,
  packed batch of 64 pairs, 8 interleaved rounds on a machine shared with other jobs): median
  34.6 s (f32) -> 23.2 s (bf16), **1.49x**, bf16 faster in every round (1.14-1.73x); a user's
  whole fine-tune on such a CPU: 105.7 s -> 73.6 s (1.43x), same held-out quality;
- any other CPU (AVX2 only, AVX-512 without BF16), or XLA held below AVX-512 by
  ``--xla_cpu_max_isa``: float32 (no bf16 dot instructions for XLA:CPU to use; bf16 was not
  measured faster there, so it is not claimed).

One function resolves it (training, ``gte-jax plan`` for its target platform); the run's log and
summary name the resolved dtype. Evaluation is float32 whatever the training computes in:
in-training eval runs :func:`as_float32` of the model, so its figures are those ``gte-jax eval`` /
``encode`` give on the export.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = ("float32", "bfloat16", "auto")


# CPU flags whose bf16 dot products XLA:CPU runs faster than float32 ones (measured: module doc).
FAST_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# --xla_cpu_max_isa values that leave XLA:CPU no bf16 instructions (AVX-512 BF16 needs "AVX512").
_NO_BF16_ISA = ("SSE4_2", "AVX", "AVX2")


@functools.lru_cache(maxsize=4)
def cpu_fast_bf16(cpuinfo: str = "/proc/cpuinfo", xla_flags: str | None = None) -> bool:
    """Whether XLA:CPU runs bf16 dot products fast here: the CPU reports ``amx_bf16`` or
    ``avx512_bf16`` (Linux; False where unknown) and ``--xla_cpu_max_isa`` in XLA_FLAGS does not
    hold XLA below AVX-512."""
    flags_env = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    capped = re.search(r"--xla_cpu_max_isa=(\w+)", flags_env)
    if capped and capped.group(1).upper() in _NO_BF16_ISA:
        return False
    try:
        text = pathlib.Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return any(f in FAST_BF16_FLAGS for f in line.split(":", 1)[-1].split())
    return False


def compute_dtype(name: str, platform: str | None = None, *, fast_bf16: bool | None = None):
    """``model.dtype`` resolved for ``platform`` (default: JAX's default backend): a jnp dtype.
    ``fast_bf16`` overrides :func:`cpu_fast_bf16` (for a CPU target)."""
    name = str(name)
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r}: use one of {', '.join(DTYPES)}")
    if name != "auto":
        return jnp.dtype(name)
    platform = (platform or jax.default_backend()).lower()
    if platform != "cpu":
        return jnp.dtype(jnp.bfloat16)
    fast = cpu_fast_bf16() if fast_bf16 is None else fast_bf16
    return jnp.dtype(jnp.bfloat16 if fast else jnp.float32)


def as_float32(module: nnx.Module) -> nnx.Module:
    """``module`` computing in float32, in place (parameters untouched; they are float32): every
    sub-module's ``dtype`` and ``config.dtype`` (BERT, decoder and T5 towers, LoRA layers)."""
    for _, m in nnx.iter_modules(module):
        dtype = getattr(m, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and dtype != jnp.float32:
            m.dtype = jnp.float32
        config = getattr(m, "config", None)
        if (
            dataclasses.is_dataclass(config)
            and getattr(config, "dtype", jnp.float32) != jnp.float32
        ):
            m.config = dataclasses.replace(config, dtype=jnp.float32)
    return module
