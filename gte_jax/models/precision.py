"""The compute dtype of a run: ``model.dtype`` = float32 | bfloat16 | auto.

Parameters, optimizer state and the export are float32 whatever this says; it sets the dtype of
the towers' matmuls and activations (:mod:`gte_jax.models.linear`: bf16 operands, float32
accumulation, float32 parameter gradients; LayerNorm, softmax and the loss stay float32).

``auto`` is bfloat16 where it is the fast choice and float32 elsewhere:

- TPU and GPU: bfloat16 (MXU / tensor cores);
- CPU with AMX-BF16 (Intel Sapphire Rapids and later): bfloat16. Measured on such a 2-core
  machine: the MiniLM fine-tune step 3.9-4.1 s (f32) -> 1.64 s (bf16) (``benchmarks/README.md``);
- any other CPU: float32 (bf16 was not measured on CPUs without AMX, so it is not claimed).

One function resolves it (training, ``gte-jax plan`` for its target platform); the run's log and
summary name the resolved dtype. Evaluation is float32 whatever the training computes in:
in-training eval runs :func:`as_float32` of the model, so its figures are those ``gte-jax eval`` /
``encode`` give on the export.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = ("float32", "bfloat16", "auto")


@functools.lru_cache(maxsize=1)
def cpu_has_amx_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this host's CPU reports the ``amx_bf16`` flag (Linux; False where unknown)."""
    try:
        text = pathlib.Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return "amx_bf16" in line.split(":", 1)[-1].split()
    return False


def compute_dtype(name: str, platform: str | None = None, *, amx_bf16: bool | None = None):
    """``model.dtype`` resolved for ``platform`` (default: JAX's default backend): a jnp dtype."""
    name = str(name)
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r}: use one of {', '.join(DTYPES)}")
    if name != "auto":
        return jnp.dtype(name)
    platform = (platform or jax.default_backend()).lower()
    if platform != "cpu":
        return jnp.dtype(jnp.bfloat16)
    fast = cpu_has_amx_bf16() if amx_bf16 is None else amx_bf16
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
