"""A learnable temperature τ for every contrastive loss (CLIP learns its logit scale 1/τ).

The losses of :mod:`gte_jax.losses` take τ as an argument, a Python float or a traced array, so a
trained τ is just an array computed from a parameter. The parameter is θ (a scalar), mapped into
bounds [τ_min, τ_max] by a sigmoid in log space::

    log τ = log τ_min + (log τ_max - log τ_min) · sigmoid(θ)

Why a sigmoid, not CLIP's clamp: a clamp (open_clip clips log(1/τ) to [0, log 100] after each
update) has a zero gradient at the bound, and a pure train step has no "after the update" hook;
the sigmoid keeps τ strictly inside the bounds with a gradient everywhere, and is smooth. Log
space: a step in θ changes τ by a ratio, as CLIP's log-scale parameter does.
:func:`initial_theta` gives the θ of a starting τ (``loss.temperature``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

# The trainable parameter's name where it lives beside the model's params.
PARAM_NAME = "log_temperature_logit"


def check_bounds(initial: float, low: float, high: float) -> None:
    """Raises ValueError unless 0 < low < initial < high (the sigmoid never reaches a bound)."""
    if not 0.0 < low < initial < high:
        raise ValueError(
            f"a learnable temperature needs 0 < min ({low}) < initial ({initial}) < max ({high})"
        )


def initial_theta(initial: float, low: float, high: float) -> float:
    """θ with :func:`temperature` (θ) = ``initial``."""
    check_bounds(initial, low, high)
    u = (math.log(initial) - math.log(low)) / (math.log(high) - math.log(low))  # in (0, 1)
    return math.log(u) - math.log1p(-u)


def temperature(theta: Array, low: float, high: float) -> Array:
    """τ(θ) in (``low``, ``high``), differentiable in θ (float64 stays float64)."""
    log_low, log_high = math.log(low), math.log(high)
    return jnp.exp(log_low + (log_high - log_low) * jax.nn.sigmoid(theta))
