"""Objectives as values: each registered loss scores the global batch as the NumPy float64
reference of tests/test_losses.py says, with its config's settings bound; its floor is a lower
bound the loss approaches; its analytic FLOPs are the similarity matmuls the traced loss runs."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gte_jax import objectives
from gte_jax.defaults import stage_config
from tests.test_losses import instructor_reference, make_case, reference

pytestmark = pytest.mark.numerics


def _config(name: str, temperature: float, symmetric: bool = False, kind: str = "contrastive"):
    c = stage_config()
    c.kind = kind
    c.loss.name, c.loss.temperature, c.loss.symmetric = name, temperature, symmetric
    return c


def _batch(case, dtype=jnp.float64):
    out = {k: jnp.asarray(v, dtype if v.dtype.kind == "f" else jnp.int32)
           for k, v in case.items()}  # fmt: skip
    q, d = out.pop("q"), out.pop("d")
    return q, d, out


@pytest.mark.parametrize(
    "name,symmetric", [("gte", False), ("infonce", False), ("infonce", True), ("instructor", False)]
)
def test_configured_objective_matches_the_float64_reference(name, symmetric):
    tau = 0.07  # not any objective's default: the config's value must be the one used
    objective = objectives.from_config(_config(name, tau, symmetric))
    assert objective.name == name and objective.temperature == tau
    case = make_case(duplicates=True, padding=True, short=True)
    with jax.enable_x64(True):
        q, d, batch = _batch(case)
        loss, metrics = objective.loss(q, d, **batch)
    want = (
        instructor_reference(case, tau)
        if name == "instructor"
        else reference(case, tau, kind=name, symmetric=symmetric)
    )
    np.testing.assert_allclose(float(loss), want[0], rtol=1e-10)
    np.testing.assert_allclose(float(metrics["accuracy"]), want[1]["accuracy"], rtol=1e-10)


def test_registry_defaults_and_the_stage_objective():
    assert objectives.contrastive_names() == ["gte", "infonce", "instructor"]
    assert objectives.get("gte").temperature == 0.01  # GTE §3
    assert objectives.get("infonce").temperature == 0.05  # MNRL's scale 20
    assert objectives.get("instructor").temperature == 0.1  # INSTRUCTOR's release
    mntp = objectives.from_config(_config("gte", 0.01, kind="mntp"))
    assert mntp.name == "mntp" and mntp.kind == "mntp" and mntp.floor == 0.0
    with pytest.raises(ValueError, match="unknown loss 'triplet'"):
        objectives.get("triplet")
    assert objectives.get("gte").problems(_config("gte", 0.01, symmetric=True))
    assert not objectives.get("infonce").problems(_config("infonce", 0.05, symmetric=True))


def test_gte_floor_is_a_lower_bound_that_perfect_embeddings_approach():
    """GTE's positive sits twice in its partition function: ln 2 is approached, never passed."""
    n = 8
    q = np.eye(n)  # each query orthogonal to the others, equal to its positive
    objective = objectives.get("gte")
    assert objective.floor == pytest.approx(math.log(2.0))
    with jax.enable_x64(True):
        loss, _ = objective.loss(jnp.asarray(q), jnp.asarray(q))
    assert objective.floor <= float(loss) < objective.floor + 1e-6
    for name in ("infonce", "instructor"):
        assert objectives.get(name).floor == 0.0


def _matmul_flops(fn, *args) -> int:
    """2 x the multiply-adds of every dot_general the traced function runs (its jaxpr)."""
    total = 0

    def walk(jaxpr):
        nonlocal total
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                k = int(np.prod([lhs[i] for i in contract]))
                total += 2 * k * int(np.prod(eqn.outvars[0].aval.shape))
            for value in eqn.params.values():  # pjit / custom_jvp bodies
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return total


@pytest.mark.parametrize(
    "name,symmetric", [("gte", False), ("infonce", True), ("instructor", False)]
)
def test_flops_are_the_similarity_matmuls_of_the_traced_loss(name, symmetric):
    n, k, dim = 6, 3, 16
    objective = objectives.from_config(_config(name, 0.05, symmetric))
    case = make_case(n=n, k=k, dim=dim)
    q, d, batch = _batch(case, jnp.float32)
    forward = _matmul_flops(lambda q, d: objective.loss(q, d, block_size=None, **batch)[0], q, d)
    work = objectives.Workload(batch_size=n, num_negatives=k, embed_dim=dim)
    assert forward > 0
    assert objective.flops(work) == 3 * forward  # forward + backward (2 x the forward)
    assert dataclasses.replace(objective, block_size=None).memory_bytes(
        work
    ) == 4 * n * forward // (2 * dim * n)
