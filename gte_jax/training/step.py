"""The train step: the pure function of (state, global batch) and the one builder of its jitted,
sharded form, which ``train`` runs and ``gte-jax plan`` compiles ahead of time for a TPU.

Pure core: :func:`make_train_step` returns ``step(state, batch) -> (state, metrics)``; the loss is
written on the *global* batch (every query against every document on every device) and the data
sharding of the batch makes XLA insert the gathers. :func:`build_train_step` binds it to a stage
config, a mesh, a model and the shardings of the state and the batch, so that what ``plan``
reports on is the program ``train`` runs (``tests/test_training_step.py`` compares their HLO).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax._src import distributed

from gte_jax import gradcache as gc
from gte_jax import objectives
from gte_jax import sharding as shd
from gte_jax.models.encoder import ModelFn
from gte_jax.training.optimizer import update_count
from gte_jax.training.spec import StageSpec


def make_embed_fn(model_fn: ModelFn, frozen: Mapping[str, Any] | None = None):
    """``embed_fn(params, inputs, rng) -> [b, D]`` for :mod:`gte_jax.gradcache` on pure params.

    With ``frozen`` (LoRA: the frozen base, a traced argument of the step, never a constant),
    ``params`` is the trainable part only, so gradients are taken w.r.t. it alone."""

    def embed_fn(params, inputs, rng):
        model = model_fn.module(model_fn.join_params(params, frozen) if frozen else params)
        optional = ("token_type_ids", "pool_mask", "segment_ids", "position_ids", "slot_index")
        extra = {k: inputs[k] for k in optional if k in inputs}  # the last three: packed rows
        out = model(inputs["input_ids"], inputs["attention_mask"], dropout_rng=rng, **extra)
        return out.astype(jnp.float32)

    return embed_fn


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def _frozen_and_gather(frozen, gradcache: bool, gather_params: str | None, mesh):
    """LoRA's frozen base as the step uses it, and the GradCache gather mode."""
    if frozen is None or not gradcache:
        return frozen, gather_params
    if gather_params == "per_step":
        # One reduction per step: the frozen base gathered whole once, resident for the step
        # (both GradCache passes read it; the per-device backward closes over it), so each LoRA
        # factor's gradient is reduced once, not once per chunk.
        return gc.replicate(frozen, mesh), gather_params
    # per_chunk would gather the whole base in every chunk of the per-device backward: LoRA runs
    # it as per_layer (the global-view scan gathers the base layer by layer, the FSDP memory, and
    # reduces the LoRA gradients per chunk).
    return frozen, "per_layer"


def make_train_step(
    model_fn: ModelFn,
    tx: optax.GradientTransformation,
    objective: objectives.Objective | None = None,
    *,
    loss_name: str = "gte",
    loss_kwargs: Mapping[str, Any] | None = None,
    num_chunks: int = 1,
    gradcache: bool = False,
    dropout: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    schedule: Callable | None = None,
    kind: str = "contrastive",
    gather_params: str | None = None,
    param_shardings: Any = None,
) -> Callable:
    """``step(state, batch) -> (state, metrics)`` on the global batch.

    ``objective`` (:mod:`gte_jax.objectives`) gives the loss and its gradient: a contrastive one
    embeds every role (GradCache when ``gradcache``); MNTP scores the query role's masked tokens
    with the LM head. Without it, ``loss_name`` / ``loss_kwargs`` (``kind="mntp"``: MNTP) name
    a registered objective and its settings. Everything after the gradient (skip when not
    finite, the update, the state) is shared.

    ``state`` = {"params", "opt_state", "step", "rng"} (+ "frozen" with LoRA: the frozen base,
    passed through unchanged; "params" and the optimizer state are the LoRA factors alone).
    The dropout key of a step is
    ``fold_in(rng, step)``: a pure function of the step, so a resumed run draws the same masks.
    A non-finite loss or gradient leaves params and optimizer state untouched (``metrics["finite"]``
    says so; the loop counts and stops after too many in a row). With ``schedule``,
    ``metrics["learning_rate"]`` is the rate of this step's update (skipped steps do not advance
    it: :func:`update_count`). ``gather_params`` / ``param_shardings``: GradCache's one gradient
    reduction per step (:func:`gte_jax.gradcache.cached_value_and_grad`; ``per_layer``: the
    global-view scan, one reduction per chunk). With LoRA ``per_step`` gathers the frozen base
    whole once per step; ``per_chunk`` runs as ``per_layer`` (the base gathered layer by layer,
    the LoRA gradients reduced per chunk).
    """
    if objective is None:
        name = "mntp" if kind == "mntp" else loss_name
        objective = objectives.get(name)
        if name != "mntp":
            objective = dataclasses.replace(objective, **dict(loss_kwargs or {}))

    def step_fn(state, batch):
        frozen, gather = _frozen_and_gather(state.get("frozen"), gradcache, gather_params, mesh)
        embed_fn = make_embed_fn(model_fn, frozen)
        rng = jax.random.fold_in(state["rng"], state["step"]) if dropout else None
        inputs = objectives.StepInputs(
            model_fn, state["params"], frozen, embed_fn, batch, rng, num_chunks,
            gradcache, mesh, gather, param_shardings, state.get(objectives.STATE_KEY),
        )  # fmt: skip
        with shd.mesh_context(mesh):  # the towers' activation constraints (sharding.constrain)
            (loss, metrics), grads = objective.value_and_grad(inputs)
        metrics = dict(metrics)
        tau_grad = metrics.pop("temperature_grad", None)  # a learnable τ's d loss / d θ
        finite = jnp.isfinite(loss) & _all_finite((grads, tau_grad))
        updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["finite"] = finite
        if schedule is not None:
            metrics["learning_rate"] = schedule(update_count(state["opt_state"]))
        # The other entries ("rng", LoRA's "frozen" base, state an objective may add) are
        # returned as given: the donated buffers are reused in place.
        new_state = {
            **state,
            "params": keep(new_params, state["params"]),
            "opt_state": keep(new_opt, state["opt_state"]),
            "step": state["step"] + 1,
        }
        if tau_grad is not None:
            own = state[objectives.STATE_KEY]
            new_state[objectives.STATE_KEY] = keep(objective.updated_state(own, tau_grad), own)
        return new_state, metrics

    return step_fn


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A stage's train step bound to its mesh: the pure ``fn``, the shardings of its state and
    batch, and (:attr:`jitted`) its one jitted form, whose output state keeps the input state's
    shardings and reuses its buffers (donated)."""

    fn: Callable
    state_shardings: Any  # a NamedSharding per leaf of the train state
    batch_sharding: jax.sharding.NamedSharding  # every batch array: rows over "data"
    objective: objectives.Objective
    num_chunks: int

    @functools.cached_property
    def jitted(self) -> Callable:
        return jax.jit(
            self.fn,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=(0,),
        )

    def lower(self, state: Any, batch: Mapping[str, Any]) -> Any:
        """The step lowered for these (concrete or abstract) arguments."""
        return self.jitted.lower(state, batch)

    def abstract_state(self, state: Any) -> Any:
        """``state``'s shapes and dtypes with the step's shardings (for ahead-of-time lowering)."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            state,
            self.state_shardings,
        )

    def abstract_batch(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """A global batch of these shapes (int32, as :mod:`gte_jax.data.batching` makes them)."""
        return {
            k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
            for k, shape in shapes.items()
        }


def build_train_step(
    config: StageSpec,
    mesh: jax.sharding.Mesh,
    model_fn: ModelFn,
    tx: optax.GradientTransformation,
    schedule: Callable,
    state: Any,
    *,
    num_chunks: int,
) -> TrainStep:
    """The stage's train step on ``mesh``: the objective of the config (``loss.*``, ``kind``),
    GradCache over ``num_chunks`` chunks when ``train.gradcache``, dropout when
    ``model.train_dropout``. ``state`` (arrays or ``jax.ShapeDtypeStruct``s: only paths and
    shapes are read) gets the shardings of ``sharding.state_shardings`` with the config's
    ``sharding`` group, the ones :func:`gte_jax.training.state.initial_state` places it with."""
    objective = objectives.from_config(config)
    shardings = shd.state_shardings(state, mesh, config.sharding)
    fn = make_train_step(
        model_fn,
        tx,
        objective,
        num_chunks=num_chunks,
        gradcache=config.train.gradcache,
        dropout=config.model.train_dropout,
        mesh=mesh,
        schedule=schedule,
        gather_params=config.sharding.gather_params,
        param_shardings=shardings["params"],
    )
    return TrainStep(fn, shardings, shd.batch_sharding(mesh), objective, num_chunks)


class StepRunner:
    """Calls the jitted step. With several processes each new batch shape is compiled ahead
    (``lower().compile()``) and the processes meet at a host barrier before running it: a host
    that compiled faster would otherwise wait inside the step's first collective, and CPU
    collectives (gloo) give up after 30 s. Once per program, never per step."""

    def __init__(self, jit_step: Callable, timeout_s: float = 3600.0):
        self.jit_step = jit_step
        self.compiled: dict[Any, Any] = {}
        self.timeout_ms = int(timeout_s * 1000)

    def __call__(self, state: Any, batch: Mapping[str, Any]):
        if jax.process_count() == 1:
            return self.jit_step(state, batch)
        key = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items()))
        exe = self.compiled.get(key)
        if exe is None:
            exe = self.jit_step.lower(state, batch).compile()
            barrier = f"gte_jax/step_compiled/{len(self.compiled)}"
            distributed.global_state.client.wait_at_barrier(barrier, self.timeout_ms)
            self.compiled[key] = exe
        return exe(state, batch)

    @property
    def programs(self) -> int | None:
        return len(self.compiled) if self.compiled else _cache_size(self.jit_step)


def _cache_size(fn: Any) -> int | None:
    """How many programs a jitted function compiled (None where JAX does not say)."""
    size = getattr(fn, "_cache_size", None)
    return int(size()) if callable(size) else None
