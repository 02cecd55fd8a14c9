"""The train state: ``{"params", "opt_state", "step", "rng"}`` (+ ``"frozen"`` with LoRA: the
frozen base), created where it lives (each parameter straight to its shards), what a checkpoint
holds of it, and the full parameters eval and export rebuild the model from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gte_jax import sharding as shd
from gte_jax.models.encoder import ModelFn
from gte_jax.objectives.base import STATE_KEY
from gte_jax.training.spec import ShardingSpec


def init_train_state(
    params: Any,
    tx: optax.GradientTransformation,
    seed: int,
    frozen: Any = None,
    objective_state: Any = None,
) -> dict[str, Any]:
    """The train state every step, checkpoint and test uses: params, optimizer state, step, RNG;
    with ``frozen`` (LoRA's frozen base: ``ModelFn.split_params``) also "frozen", which is in
    neither the optimizer state nor the checkpoints (:func:`checkpointed`); with
    ``objective_state`` (``Objective.initial_state()``: a learnable τ) also "objective"."""
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }
    if frozen:
        state["frozen"] = frozen
    if objective_state is not None:
        state[STATE_KEY] = objective_state
    return state


def abstract_train_state(
    params: Any,
    tx: optax.GradientTransformation,
    seed: int,
    frozen: Any = None,
    objective_state: Any = None,
) -> Any:
    """:func:`init_train_state`'s shapes and dtypes (nothing allocated: ``gte-jax plan``)."""
    return jax.eval_shape(
        lambda p, f, o: init_train_state(p, tx, seed, f, o), params, frozen or None, objective_state
    )


def checkpointed(state: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint holds: the state less LoRA's frozen base, which the run reloads from
    ``model.init_from`` (the same bits: ``<workdir>/base_model`` is written from it)."""
    return {k: v for k, v in state.items() if k != "frozen"}


def full_params(model_fn: ModelFn, state: Mapping[str, Any]) -> dict[str, Any]:
    """Every parameter of the model (trainable + frozen): what eval and export rebuild it from."""
    return model_fn.join_params(state["params"], state.get("frozen", {}))


def initial_state(
    params: Any,
    tx,
    seed: int,
    mesh,
    sharding_cfg: ShardingSpec,
    frozen: Any = None,
    objective_state: Any = None,
) -> dict[str, Any]:
    """``init_train_state`` created where it lives: each parameter goes from host memory straight
    to its shards (``sharding.place``), and the optimizer state is made by a jitted init with the
    state's shardings, so under FSDP no device ever holds a whole model or its Adam moments (a
    7B model starts on chips that could not hold it). ``frozen``: LoRA's frozen base, placed the
    same way. ``objective_state``: the objective's own (a learnable τ), replicated."""

    def init(p, f):
        return init_train_state(p, tx, seed, f, objective_state)

    frozen = frozen or None
    shardings = shd.state_shardings(jax.eval_shape(init, params, frozen), mesh, sharding_cfg)
    placed = shd.place(params, shardings["params"])
    if frozen is not None:
        frozen = shd.place(frozen, shardings["frozen"])
    return jax.jit(init, out_shardings=shardings, donate_argnums=(0, 1))(placed, frozen)


# The data state of a checkpoint also holds the examples trained on up to its step, so that a
# resumed run's summary counts the whole run.
EXAMPLES_SEEN = "examples_seen"
