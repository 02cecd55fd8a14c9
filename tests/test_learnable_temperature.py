"""A learnable τ (``loss.learn_temperature``; gte_jax/objectives/temperature.py and the objective
that owns its state): d loss / d θ against a NumPy float64 loss differenced in θ; the train step
moves θ by Adam's first step in the direction that lowers the loss (that direction read off the
same step run at a slightly higher and lower fixed τ); ``train`` and ``plan`` lower the same step
with it; settings that cannot work are refused naming the keys."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest
from test_training_step import _as_plan_does, _as_train_does, _config

from gte_jax import objectives
from gte_jax import sharding as shd
from gte_jax.objectives import temperature as learnable
from gte_jax.training import checks
from gte_jax.training.checks import TrainingError
from gte_jax.training.setup import initial_training, load_model_for_training
from gte_jax.training.step import build_train_step


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_infonce(q, d, tau):
    """float64: -(1/n) Σ_i log softmax_j(q_i·d_j / τ)_i."""
    logits = q @ d.T / tau
    logits -= logits.max(axis=1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -float(np.mean(np.diag(log_softmax)))


def test_theta_gradient_is_the_float64_loss_differenced_in_theta():
    rng = np.random.default_rng(0)
    q = _unit(rng.normal(size=(8, 16)))
    d = _unit(q + 0.7 * rng.normal(size=(8, 16)))
    low, high, tau0 = 1e-3, 1.0, 0.05
    objective = dataclasses.replace(
        objectives.get("infonce"), temperature=tau0, block_size=None, learn_temperature=True,
        temperature_bounds=(low, high),
    )  # fmt: skip
    state = objective.initial_state()
    theta = float(state["theta"])
    with jax.enable_x64(True):
        loss, metrics = objective.loss_fn(np.float64(theta))({"query": q, "doc": d}, {})
    h = 1e-5  # central difference: error ~ h² · L''' ~ 1e-10, far below the tolerance

    def tau(th):  # float64, the module doc's formula
        return math.exp(math.log(low) + (math.log(high) - math.log(low)) / (1 + math.exp(-th)))

    want = (_np_infonce(q, d, tau(theta + h)) - _np_infonce(q, d, tau(theta - h))) / (2 * h)
    # θ is a float32 state leaf: τ(θ) is tau0 up to its rounding
    np.testing.assert_allclose(float(loss), _np_infonce(q, d, tau(theta)), rtol=1e-10)
    np.testing.assert_allclose(float(metrics["temperature"]), tau(theta), rtol=1e-12)
    np.testing.assert_allclose(tau(theta), tau0, rtol=1e-6)  # started at loss.temperature
    # float64 throughout; the difference quotient's rounding ~ eps64 · L / h ~ 1e-11 relative
    np.testing.assert_allclose(float(metrics["temperature_grad"]), want, rtol=1e-6)
    assert abs(want) > 1e-3  # a vacuous zero gradient would pass any relative test


def _two_steps(config):
    """Two steps of the stage's train step on one random global batch: (θ before, θ after the
    first step, θ after the second, the metrics of each step)."""
    from gte_jax import plan

    mesh = checks.run_mesh(config)
    num_chunks = checks.check_config(config, mesh)
    model, _, _ = load_model_for_training(config.model)
    model_fn, tx, schedule, state, _ = initial_training(config, model, mesh, 10)
    step = build_train_step(config, mesh, model_fn, tx, schedule, state, num_chunks=num_chunks)
    shapes, _, _ = plan.batch_shapes(config)
    rng = np.random.default_rng(1)
    local = {k: rng.integers(5, 90, size=shape).astype(np.int32) for k, shape in shapes.items()}
    for k in local:
        if k.endswith("attention_mask") or k.endswith("valid"):
            local[k] = np.ones_like(local[k])
        if k.endswith("text_id"):
            local[k] = np.arange(local[k].size, dtype=np.int32).reshape(local[k].shape)
    batch = shd.global_batch(local, mesh)
    thetas, metrics = [float(state[objectives.STATE_KEY]["theta"])], []
    for _ in range(2):
        state, m = step.jitted(state, batch)
        thetas.append(float(state[objectives.STATE_KEY]["theta"]))
        metrics.append(jax.device_get(m))
    return thetas, metrics


def test_the_train_step_moves_theta_downhill_by_adams_first_step(tiny_model_dir):
    tau0, lr = 0.05, 1e-3
    # The params stay fixed (rate 0, no dropout: the same loss function at both steps), so only
    # θ moves; no GradCache: one small compile.
    config = _config(tiny_model_dir, learning_rate=0.0, gradcache=False)
    config.model.train_dropout = False
    config.loss.temperature = tau0
    config.loss.learn_temperature, config.loss.temperature_learning_rate = True, lr
    thetas, metrics = _two_steps(config)
    np.testing.assert_allclose(float(metrics[0]["temperature"]), tau0, rtol=1e-6)
    # Adam's first update is lr · g / (|g| + eps): |Δθ| = lr up to eps / |g| (1e-8 / |g|) and the
    # float32 rounding of θ ≈ 0.27 before and after: 2 · 2^-24 · 0.27 ≈ 3e-8, 3e-5 of lr.
    np.testing.assert_allclose(abs(thetas[1] - thetas[0]), lr, rtol=1e-4)
    # ... and downhill: the same batch scores lower at the new τ, by about lr·|dL/dθ| (~1e-3),
    # far above the float32 loss's rounding (~1e-6 here).
    first, second = float(metrics[0]["loss"]), float(metrics[1]["loss"])
    assert second < first - 1e-5, (first, second)
    assert thetas[2] != thetas[1]


def test_train_and_plan_lower_the_same_step_with_a_learnable_temperature(tiny_model_dir):
    config = _config(tiny_model_dir)
    config.loss.learn_temperature = True
    lowered = _as_train_does(config)
    assert lowered == _as_plan_does(config)
    assert lowered != _as_plan_does(_config(tiny_model_dir))


@pytest.mark.parametrize("loss", ["gte", "infonce", "instructor"])
@pytest.mark.parametrize(
    "change, words",
    [
        ({"temperature_min": 0.02}, "loss.temperature_min (0.02) < loss.temperature (0.01)"),
        ({"temperature_max": 0.005}, "< loss.temperature_max (0.005)"),
    ],
)
def test_bounds_that_do_not_hold_the_start_are_refused(tiny_model_dir, loss, change, words):
    config = _config(tiny_model_dir)
    config.loss.name = loss
    config.loss.learn_temperature = True
    config.loss.update(change)
    with pytest.raises(TrainingError, match="loss.learn_temperature") as e:
        checks.check_config(config, checks.run_mesh(config))
    assert words in str(e.value)


def test_mntp_has_no_temperature_to_learn():
    from gte_jax.defaults import stage_config

    config = stage_config()
    config.loss.learn_temperature = True
    assert objectives.get("mntp").problems(config) == [
        "loss.learn_temperature: MNTP has no temperature (kind=mntp)"
    ]
    assert math.isfinite(learnable.initial_theta(0.01, 1e-3, 1.0))
