"""α-mixture sampler: shares, determinism, epochs, JSON state round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gte_jax.data.mixture import MixtureSampler

SIZES = {"big": 5000, "mid": 400, "small": 10}


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_source_shares_follow_n_to_the_alpha(alpha):
    s = MixtureSampler(SIZES, 4, alpha=alpha, seed=3)
    draws = 20_000
    counts = np.bincount([s.source_of_step(t) for t in range(draws)], minlength=3)
    n = np.array(list(SIZES.values()), dtype=float)
    expected = n**alpha / (n**alpha).sum()
    # Each count is Binomial(draws, p): 5 standard deviations keep a false alarm below 1e-6.
    tol = 5 * np.sqrt(expected * (1 - expected) / draws)
    np.testing.assert_array_less(np.abs(counts / draws - expected), tol + 1e-12)


def test_every_batch_single_source_and_epochs_cover_each_record_once():
    s = MixtureSampler(SIZES, 4, alpha=0.0, seed=0, batch_sizes={"small": 3})
    seen: dict[str, list[int]] = {k: [] for k in SIZES}
    for _ in range(300):
        batch = s.next()
        names = {name for name, _ in batch}
        assert len(names) == 1
        name = names.pop()
        assert len(batch) == (3 if name == "small" else 4)
        seen[name] += [i for _, i in batch]
    small = seen["small"]
    # Consecutive blocks of 10 are the epochs: each a permutation of range(10).
    for e in range(len(small) // 10):
        assert sorted(small[10 * e : 10 * e + 10]) == list(range(10))
    assert s.get_state()["sources"]["small"]["epoch"] == len(small) // 10
    # Different epochs use different orders (deterministic, not a fixed cycle).
    assert small[:10] != small[10:20]


def test_same_seed_same_stream_different_seed_different_stream():
    a, b, c = (MixtureSampler(SIZES, 4, seed=k) for k in (1, 1, 2))
    sa = [a.next() for _ in range(50)]
    assert sa == [b.next() for _ in range(50)]
    assert sa != [c.next() for _ in range(50)]


@pytest.mark.parametrize("mixed", [False, True])
def test_resume_through_json_equals_uninterrupted(mixed):
    kw = dict(alpha=0.0, seed=7, mixed=mixed)  # uniform: the small source wraps often
    ref = MixtureSampler(SIZES, 4, **kw)
    full = [ref.next() for _ in range(60)]

    first = MixtureSampler(SIZES, 4, **kw)
    head = [first.next() for _ in range(23)]
    state = json.loads(json.dumps(first.get_state()))
    resumed = MixtureSampler(SIZES, 4, **kw)
    resumed.set_state(state)
    tail = [resumed.next() for _ in range(37)]
    assert head + tail == full
    # The continuation crossed at least one epoch boundary of the small source.
    assert resumed.get_state()["sources"]["small"]["epoch"] > state["sources"]["small"]["epoch"]


def test_mixed_batches_mix_sources_with_alpha_shares():
    s = MixtureSampler(SIZES, 64, alpha=1.0, seed=0, mixed=True)
    names = [name for _ in range(200) for name, _ in s.next()]
    assert len({name for name, _ in s.next()}) > 1
    n = np.array(list(SIZES.values()), dtype=float)
    p = n / n.sum()
    obs = np.array([names.count(k) for k in SIZES]) / len(names)
    np.testing.assert_array_less(np.abs(obs - p), 5 * np.sqrt(p * (1 - p) / len(names)) + 1e-12)


def test_set_state_rejects_a_different_data_config():
    s = MixtureSampler(SIZES, 4, seed=0)
    state = s.get_state()
    other = MixtureSampler({**SIZES, "small": 11}, 4, seed=0)
    with pytest.raises(ValueError, match="size changed"):
        other.set_state(state)


@pytest.mark.parametrize(
    "changed, message",
    [
        (dict(alpha=1.0), "alpha changed from 0.5 to 1.0"),
        (dict(weights=[1.0, 1.0, 2.0]), "mixture weights changed from the alpha rule"),
        (dict(sizes={"small": 10, "mid": 400, "big": 5000}), "source order changed"),
        (dict(batch_sizes={"small": 2}), "'small' batch size changed from 4 to 2"),
    ],
)
def test_set_state_refuses_a_changed_mixture_and_says_what_changed(changed, message):
    """α, weights, source order and per-source batch size are part of the
    stream; a resume with any of them changed would silently produce other batches."""
    kw = dict(sizes=SIZES, alpha=0.5, seed=0)
    first = MixtureSampler(kw["sizes"], 4, alpha=kw["alpha"], seed=0)
    for _ in range(5):
        first.next()
    state = json.loads(json.dumps(first.get_state()))
    kw.update(changed)
    other = MixtureSampler(kw.pop("sizes"), 4, **kw)
    with pytest.raises(ValueError, match=message):
        other.set_state(state)


def test_set_state_refuses_changed_explicit_weights():
    first = MixtureSampler(SIZES, 4, seed=0, weights=[1, 1, 1])
    state = json.loads(json.dumps(first.get_state()))
    MixtureSampler(SIZES, 4, seed=0, weights=[2, 2, 2]).set_state(state)  # same normalised mix
    with pytest.raises(ValueError, match="mixture weights changed from"):
        MixtureSampler(SIZES, 4, seed=0, weights=[1, 1, 2]).set_state(state)


def test_set_state_accepts_an_old_state_without_the_mixture_fields_with_a_warning(caplog):
    ref = MixtureSampler(SIZES, 4, seed=2)
    full = [ref.next() for _ in range(20)]
    first = MixtureSampler(SIZES, 4, seed=2)
    for _ in range(8):
        first.next()
    state = json.loads(json.dumps(first.get_state()))
    del state["order"], state["weights"]  # as saved before they were recorded
    for s in state["sources"].values():
        del s["batch_size"], s["prob"]
    resumed = MixtureSampler(SIZES, 4, seed=2)
    with caplog.at_level("WARNING", logger="gte_jax.data.mixture"):
        resumed.set_state(state)
    assert "older version" in caplog.text
    assert [resumed.next() for _ in range(12)] == full[8:]
    # What an old state holds is still checked: α was always saved.
    with pytest.raises(ValueError, match="alpha changed"):
        MixtureSampler(SIZES, 4, seed=2, alpha=0.0).set_state(state)
