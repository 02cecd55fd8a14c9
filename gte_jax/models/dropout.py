"""Dropout masks from a counter-based hash: one rule for every tower and LoRA.

Why not ``jax.random.uniform``: with partitionable threefry (JAX's default) every element costs one
threefry-2x32 (20 rounds on two words, ~130 integer ops), and a packed BERT step draws ~80M of
them, mostly for the attention probabilities ``[batch, heads, len, len]``. On a 2-core CPU that was
~16 % of a MiniLM fine-tune step (in a profile of that step). Here the layer's key (still a threefry key,
split per layer and per step as before) is turned into two 32-bit words once, and each element's
bits are a keyed hash of its index: three rounds of ``lowbias32`` (Wellons' integer finaliser,
a bijection of uint32 with full avalanche), ~25 integer ops that XLA fuses into the consumer, so
the mask is never written to memory.

Properties the tests check (``tests/test_dropout.py``): the bits equal a NumPy reference; the keep
rate, bit balance, 256-bin histogram and neighbour / site / key correlations are those of
independent uniform draws; a sharded draw equals the unsharded one (the index is the global one,
so 8 devices give the 1-device masks); ``E[dropout(x)] = x``.

Element ``(i0, rest)`` of a site's shape hashes ``i0`` (the leading, batch axis, the one data
parallelism shards) and ``rest`` (the row-major index inside ``shape[1:]``) separately, so no
index needs more than 32 bits (when ``shape[1:]`` has 2**32 elements or more, the split moves
right: :func:`_split`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gte_jax.models.partitioning import DATA_AXIS

_GOLDEN = np.uint32(0x9E3779B9)
_SALT = np.uint32(0x85EBCA6B)


def _mix(x: jax.Array) -> jax.Array:
    """lowbias32 (C. Wellons, "Hash Prospector"): uint32 -> uint32, bijective."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def _key_words(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    data = data.reshape(-1).astype(jnp.uint32)
    return data[0], data[-1] ^ _GOLDEN


def bits(rng: jax.Array, shape: tuple[int, ...], site: int = 0) -> jax.Array:
    """uint32 draws of ``shape`` for dropout site ``site`` of the key ``rng``."""
    k0, k1 = _key_words(rng)
    k0 = _mix(k0 ^ np.uint32(((site + 1) * int(_SALT)) & 0xFFFFFFFF))  # one stream per site
    shape = tuple(int(d) for d in shape) or (1,)
    split = _split(shape)

    def index(axes):  # row-major index over ``axes`` (< 2**32 by _split)
        out, stride = jnp.zeros(shape, jnp.uint32), 1
        for axis in reversed(axes):
            iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
            out = out + (iota + (_row_offset(shape[0]) if axis == 0 else 0)) * np.uint32(stride)
            stride *= shape[axis]
        return out

    lead = index(range(split))
    inner = index(range(split, len(shape)))
    h = _mix(inner ^ k0)
    h = _mix(h + lead * _GOLDEN)
    return _mix(h ^ k1)


def _row_offset(rows: int) -> jax.Array | int:
    """The global index of this device's first batch row. Inside ``shard_map`` over the data
    axis (GradCache's backward, :mod:`gte_jax.gradcache`) axis 0 is the device's block of the
    batch, the ``axis_index``-th: offsetting by it draws the global batch's masks, as the
    forward (global view) did. Elsewhere 0."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.manual_axes:
        return 0
    return jax.lax.axis_index(DATA_AXIS).astype(jnp.uint32) * np.uint32(rows)


_INDEX_LIMIT = 1 << 32  # each of the two hashed indices must fit 32 bits


def _split(shape: tuple[int, ...]) -> int:
    """Where ``shape`` splits into the lead and inner indices: after axis 0 unless the rest has
    2**32 elements or more (attention probabilities of a long-context decoder, [b, h, 32k, 32k]),
    then later, so that neither index wraps (a wrapped index would repeat masks)."""
    split = 1
    while split < len(shape) - 1 and math.prod(shape[split:]) >= _INDEX_LIMIT:
        split += 1
    if math.prod(shape[:split]) >= _INDEX_LIMIT or math.prod(shape[split:]) >= _INDEX_LIMIT:
        raise ValueError(f"dropout site of shape {shape}: too large to index with 2 x 32 bits")
    return split


def threshold(rate: float) -> np.uint32:
    """keep iff bits >= threshold: P(keep) = 1 - rate to within 2**-32."""
    return np.uint32(min(round(float(rate) * 2.0**32), 2**32 - 1))


def drop(x: jax.Array, rate: float, draws: jax.Array | None) -> jax.Array:
    """Inverted dropout given :func:`bits` of x's shape: keep where bits >= rate * 2**32, scale by
    1 / (1 - rate) (as torch). Identity when ``draws`` is None or ``rate`` is 0."""
    if draws is None or rate == 0.0:
        return x
    keep = draws >= threshold(rate)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None, site: int = 0) -> jax.Array:
    """Inverted dropout of ``x`` with the key ``rng`` (identity when None or ``rate`` is 0)."""
    if rng is None or rate == 0.0:
        return x
    return drop(x, rate, bits(rng, x.shape, site))


def site_bits(
    rng: jax.Array | None, shapes: list[tuple[int, ...] | None]
) -> list[jax.Array | None]:
    """Draws for several dropout sites of one key (None for a site that is off)."""
    if rng is None:
        return [None] * len(shapes)
    return [None if s is None else bits(rng, s, site) for site, s in enumerate(shapes)]


def numpy_bits(key_words: tuple[int, int], shape: tuple[int, ...], site: int = 0) -> np.ndarray:
    """The same draws in NumPy (uint64 arithmetic masked to 32 bits): the tests' reference."""
    m = (1 << 32) - 1

    def mix(x):
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & m
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & m
        return x ^ (x >> 16)

    k0 = np.uint64(key_words[0])
    k1 = np.uint64(key_words[1]) ^ np.uint64(0x9E3779B9)
    k0 = mix(k0 ^ np.uint64(((site + 1) * 0x85EBCA6B) & m))
    shape = tuple(shape) or (1,)
    flat = np.arange(math.prod(shape), dtype=np.uint64).reshape(shape)
    inner_size = math.prod(shape[_split(shape) :])
    lead = flat // np.uint64(inner_size)
    inner = flat % np.uint64(inner_size)
    h = mix(inner ^ k0)
    h = mix((h + lead * np.uint64(0x9E3779B9)) & np.uint64(m))
    return mix(h ^ k1).astype(np.uint32)
