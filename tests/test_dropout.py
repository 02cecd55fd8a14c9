"""Hashed dropout masks (gte_jax.models.dropout): exact against a NumPy reference, statistically
like independent uniform draws, the same on 8 sharded devices as on 1, unbiased."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from gte_jax.models import dropout as d


def _words(key):
    w = np.asarray(jax.random.key_data(key)).reshape(-1)
    return int(w[0]), int(w[-1])


@pytest.mark.parametrize("shape,site", [((3, 5, 7), 0), ((2, 12, 33, 33), 2), ((17,), 1)])
def test_bits_equal_numpy_reference(shape, site):
    key = jax.random.key(11)
    got = np.asarray(jax.jit(lambda k: d.bits(k, shape, site))(key))
    np.testing.assert_array_equal(got, d.numpy_bits(_words(key), shape, site))


def test_draws_look_like_independent_uniforms():
    """Keep rate, bit balance, a 256-bin histogram, and correlations between neighbours, sites,
    keys and batch rows: each within what independent uniform draws give (5 sigma / p > 1e-6)."""
    key = jax.random.key(0)
    shape = (8, 12, 64, 64)  # an attention-probability site
    n = int(np.prod(shape))
    a = np.asarray(d.bits(key, shape, 0), np.uint64)
    u = a.astype(np.float64) / 2.0**32
    sigma = 1.0 / np.sqrt(n)
    # Keep rate at p = 0.1, exact threshold.
    keep = a >= int(d.threshold(0.1))
    assert abs(keep.mean() - 0.9) < 5 * np.sqrt(0.09 / n)
    # Every bit is a fair coin.
    for bit in range(32):
        assert abs(((a >> np.uint64(bit)) & np.uint64(1)).mean() - 0.5) < 5 * 0.5 * sigma
    # Histogram of the top byte.
    counts = np.bincount((a >> np.uint64(24)).astype(np.int64).ravel(), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-6

    def corr(x, y):
        return abs(np.corrcoef(x.ravel(), y.ravel())[0, 1])

    flat = u.reshape(-1)
    assert corr(flat[:-1], flat[1:]) < 5 * sigma  # neighbours in memory
    assert corr(u[:, :, :-1], u[:, :, 1:]) < 5 * sigma  # query rows
    assert corr(u[:-1], u[1:]) < 5 * sigma  # batch rows (the lead index)
    other_site = np.asarray(d.bits(key, shape, 1), np.float64)
    assert corr(u, other_site) < 5 * sigma
    other_key = np.asarray(d.bits(jax.random.key(1), shape, 0), np.float64)
    assert corr(u, other_key) < 5 * sigma
    # Keep masks of two sites agree as often as independent coins (0.9^2 + 0.1^2).
    both = keep == (other_site >= float(d.threshold(0.1)))
    assert abs(both.mean() - 0.82) < 5 * np.sqrt(0.82 * 0.18 / n)


def test_sharded_draws_equal_one_device():
    """The index is the global one: 8 devices sharding the batch axis draw the 1-device mask."""
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = jax.sharding.Mesh(np.asarray(devices[:8]), ("data",))
    shape = (16, 4, 24, 24)
    key = jax.random.key(5)
    x = jnp.ones(shape, jnp.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    f = jax.jit(lambda x, k: d.dropout(x, 0.1, k, site=3))
    sharded = f(xs, key)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(f(x, key)))


def test_dropout_is_unbiased_and_inverted():
    key = jax.random.key(3)
    x = jax.random.normal(jax.random.key(4), (64, 1024))
    y = np.asarray(d.dropout(x, 0.25, key), np.float64)
    xs = np.asarray(x, np.float64)
    kept = y != 0
    np.testing.assert_allclose(y[kept], xs[kept] / 0.75, rtol=1e-6)
    # E[y] = x: the mean of y / x over elements is 1 within sampling error (Var = p / (1 - p)).
    ratio = (y / xs).ravel()
    assert abs(ratio.mean() - 1.0) < 5 * np.sqrt(0.25 / 0.75 / ratio.size)
    assert d.dropout(x, 0.0, key) is x and d.dropout(x, 0.5, None) is x


def test_large_sites_split_their_index_without_wrapping(monkeypatch):
    """A site whose trailing axes hold 2**32 elements or more (attention dropout of a
    long-context decoder) hashes (batch, heads) and (query, key) apart, so no index wraps and
    repeats masks. Checked at a 2**8 limit: JAX equals NumPy, and no draw repeats."""
    assert d._split((8, 32, 32768, 32768)) == 2  # [b, h, 32k, 32k]
    assert d._split((8, 12, 128, 128)) == 1
    monkeypatch.setattr(d, "_INDEX_LIMIT", 1 << 8)
    shape = (2, 4, 16, 16)
    assert d._split(shape) == 3  # lead = 2 x 4 x 16 = 128, inner = 16
    key = jax.random.key(9)
    got = np.asarray(d.bits(key, shape, 1))
    np.testing.assert_array_equal(got, d.numpy_bits(_words(key), shape, 1))
    assert len(np.unique(got)) == got.size
    with pytest.raises(ValueError, match="too large"):
        d._split((512, 512))
