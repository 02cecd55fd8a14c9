"""What `gte-jax train` prints per stage: a smoothed loss beside the last batch's, and each eval
metric as before -> after (the figures summary.json keeps)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from gte_jax.commands.train import eval_change
from gte_jax.training import hooks


def test_smoothed_loss_is_the_bias_corrected_ema_of_the_finite_steps():
    """Against a float64 NumPy EMA written from the definition; a non-finite step changes
    nothing, and the first step's value is itself (no pull towards the zero start)."""
    rng = np.random.default_rng(0)
    losses = rng.uniform(0.5, 5.0, 23)
    losses[[4, 11]] = np.nan  # diverged steps: skipped by the optimizer and by the tracker
    tracker = hooks.new_tracker()
    assert math.isnan(hooks.smoothed(tracker, "loss"))
    num, den, seen = 0.0, 0.0, []
    for i, loss in enumerate(losses):
        finite = bool(np.isfinite(loss))
        metrics = {"loss": jnp.float32(loss), "accuracy": jnp.float32(0.5), "finite": finite}
        tracker = hooks.track_finite(tracker, metrics)
        if finite:
            num = hooks.EMA_DECAY * num + (1 - hooks.EMA_DECAY) * float(np.float32(loss))
            den = hooks.EMA_DECAY * den + (1 - hooks.EMA_DECAY)
            seen.append(loss)
        if i == 0:
            assert hooks.smoothed(tracker, "loss") == pytest.approx(losses[0], rel=1e-6)
    # float32 accumulation of ~20 steps: a few ulps of the values
    assert hooks.smoothed(tracker, "loss") == pytest.approx(num / den, rel=64 * 2**-23)
    assert hooks.smoothed(tracker, "accuracy") == pytest.approx(0.5, rel=1e-6)
    assert float(tracker["loss"]) == pytest.approx(seen[-1], rel=1e-7)  # the last batch's
    assert int(tracker["nonfinite"]) == 2


def test_eval_change_reads_before_and_after():
    summary = {
        "eval_at_start": {"bible/ndcg@10": 0.99091, "bible/recall@1": 0.98667, "step": 0},
        "eval": {"bible/ndcg@10": 1.0, "bible/recall@1": 1.0, "step": 30, "note": "x"},
    }
    assert eval_change(summary) == {
        "bible/ndcg@10": "0.9909 -> 1.0000",
        "bible/recall@1": "0.9867 -> 1.0000",
    }
    assert eval_change({"eval": {"sts/spearman": 0.5, "step": 3}}) == {"sts/spearman": "0.5000"}
    assert eval_change({"eval": None, "eval_at_start": None}) == {}
