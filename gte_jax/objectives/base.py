"""The objective as a value (levanter's ``Trainer(config, optimizer, loss_fn)``): one frozen
:class:`Objective` per loss owns its name, its loss on the global batch (the math stays in
:mod:`gte_jax.losses`), its defaults, its config checks, its floor and its share of a step's
FLOPs and memory for ``gte-jax plan``. The step builder (:mod:`gte_jax.training.step`), the
loop's summary and ``plan`` ask the objective; none of them dispatches on a loss name.

A contrastive objective embeds every role of the batch (query, doc, hard negatives) and scores
them with :meth:`Objective.loss`; :meth:`Objective.value_and_grad` runs that through GradCache
or plain value-and-grad. An objective that does not embed (MNTP) overrides
:meth:`value_and_grad` itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

import gte_jax.objectives.distill as distill
import gte_jax.objectives.matryoshka as matryoshka
import gte_jax.objectives.temperature as learnable
from gte_jax import gradcache as gc
from gte_jax import losses

Array = jax.Array

# Bytes of a float32 logit: the losses score in float32 whatever the model computes in.
_LOGIT_BYTES = 4

# Where an objective's own trainable state (a learnable τ and its optimizer state) lives in the
# train state, beside "params".
STATE_KEY = "objective"


@dataclasses.dataclass(frozen=True)
class Workload:
    """What a step scores, for an objective's FLOPs / memory: the global batch, hard negatives
    per query, the embedding width and the towers as [(texts, length)]; ``vocab``, ``hidden``
    and ``trains_head`` for objectives that use a decoder's LM head."""

    batch_size: int
    num_negatives: int
    embed_dim: int
    towers: Sequence[tuple[int, int]] = ()
    vocab: int = 0
    hidden: int = 0
    trains_head: bool = False


@dataclasses.dataclass(frozen=True)
class Objective:
    """A contrastive objective with its settings bound (``temperature``, ``symmetric``).

    Subclasses set ``name``, ``default_temperature`` (the paper / release value), ``floor`` (the
    lowest loss it can reach) and ``loss_function`` (a :mod:`gte_jax.losses` function), and
    override :meth:`similarity_columns` (candidates scored per row)."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "contrastive"  # what the step computes: embeddings, or "mntp"
    default_temperature: ClassVar[float] = 0.0
    floor: ClassVar[float] = 0.0
    loss_function: ClassVar[Callable[..., tuple[Array, dict[str, Array]]] | None] = None

    temperature: float = -1.0  # -1: default_temperature (__post_init__)
    symmetric: bool = False  # infonce only (checked at start-up)
    block_size: int | None = losses.DEFAULT_BLOCK_SIZE  # rows scored at once (losses "Memory")
    # Modifiers any contrastive objective takes (docs/objectives.md): the loss summed over nested
    # prefixes of the embedding (Matryoshka), and a KL to the batch's teacher scores.
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] = ()
    distill_weight: float = 0.0
    teacher_temperature: float = distill.TEACHER_TEMPERATURE
    # A learnable τ (objectives/temperature.py): θ in the train state, τ(θ) inside the bounds,
    # started at ``temperature``, trained by its own Adam at ``temperature_learning_rate``.
    learn_temperature: bool = False
    temperature_bounds: tuple[float, float] = (1e-3, 1.0)
    temperature_learning_rate: float = 1e-3

    def __post_init__(self) -> None:
        if self.temperature < 0:
            object.__setattr__(self, "temperature", float(self.default_temperature))

    # ------------------------------------------------------------------ configuration

    def configured(self, config: Any) -> Objective:
        """This objective with a stage config's ``loss`` settings."""
        return dataclasses.replace(
            self,
            temperature=float(config.loss.temperature),
            symmetric=bool(config.loss.get("symmetric", False)),
            matryoshka_dims=tuple(int(m) for m in config.loss.get("matryoshka_dims", ())),
            matryoshka_weights=tuple(float(w) for w in config.loss.get("matryoshka_weights", ())),
            distill_weight=float(config.loss.get("distill_weight", 0.0)),
            teacher_temperature=float(
                config.loss.get("teacher_temperature", distill.TEACHER_TEMPERATURE)
            ),
            learn_temperature=bool(config.loss.learn_temperature),
            temperature_bounds=(
                float(config.loss.temperature_min),
                float(config.loss.temperature_max),
            ),
            temperature_learning_rate=float(config.loss.temperature_learning_rate),
        )

    def problems(self, config: Any) -> list[str]:
        """Why the stage's settings cannot work with this objective (empty: they can). The
        range of ``loss.temperature`` is the range table's (:mod:`gte_jax.ranges`)."""
        if bool(config.loss.get("symmetric", False)):
            return [f"loss.symmetric=True: only loss.name=infonce has a d→q form, not {self.name}"]
        return self.temperature_problems(config)

    # ------------------------------------------------------------------ a learnable τ

    def temperature_problems(self, config: Any) -> list[str]:
        """A learnable τ must start strictly inside its bounds (the sigmoid never reaches one)."""
        loss = config.loss
        if not loss.learn_temperature:
            return []
        low, high, start = loss.temperature_min, loss.temperature_max, loss.temperature
        if 0 < low < start < high:
            return []
        return [
            f"loss.learn_temperature: needs 0 < loss.temperature_min ({low}) < "
            f"loss.temperature ({start}) < loss.temperature_max ({high})"
        ]

    def initial_state(self) -> dict[str, Any] | None:
        """The objective's own trainable state (``state[STATE_KEY]``), or None: with a learnable
        τ, θ with τ(θ) = ``temperature`` and its Adam state."""
        if not self.learn_temperature:
            return None
        theta = jnp.asarray(
            learnable.initial_theta(self.temperature, *self.temperature_bounds), jnp.float32
        )
        return {"theta": theta, "opt_state": self._tau_optimizer().init(theta)}

    def _tau_optimizer(self) -> optax.GradientTransformation:
        return optax.adam(self.temperature_learning_rate)

    def updated_state(self, state: Mapping[str, Any], grad: Array) -> dict[str, Any]:
        """``state`` after one Adam step of θ along ``grad`` (d loss / d θ)."""
        updates, opt_state = self._tau_optimizer().update(grad, state["opt_state"], state["theta"])
        return {"theta": optax.apply_updates(state["theta"], updates), "opt_state": opt_state}

    # ------------------------------------------------------------------ the loss

    def loss_kwargs(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "block_size": self.block_size}

    def loss(self, q: Array, d: Array, **batch: Any) -> tuple[Array, dict[str, Array]]:
        """The loss on the global batch: ``q``, ``d`` [n, D], ``neg`` [n, K, D], the ids and
        validity of :mod:`gte_jax.losses` as keywords (``teacher_scores`` [n, 1+K] too: read
        when ``distill_weight`` > 0). With ``matryoshka_dims``, summed over the embedding's
        prefixes; with ``distill_weight``, plus the weighted KL to the teacher's scores."""
        base = type(self).loss_function
        if self.matryoshka_dims:
            dims, weights = self.matryoshka_dims, self.matryoshka_weights or None

            def contrastive(q, d, **kw):
                return matryoshka.matryoshka_loss(base, q, d, dims=dims, weights=weights, **kw)
        else:
            contrastive = base
        combined = distill.with_distillation(
            contrastive, weight=self.distill_weight, teacher_temperature=self.teacher_temperature
        )
        teacher = batch.pop("teacher_scores", None) if self.distill_weight else None
        batch.pop("teacher_scores", None)
        return combined(q, d, teacher_scores=teacher, **{**self.loss_kwargs(), **batch})

    def loss_fn(
        self, theta: Array | None = None, mesh: jax.sharding.Mesh | None = None
    ) -> gc.LossFn:
        """``loss_fn(embeddings, batch)`` for :mod:`gte_jax.gradcache`: the batch's text ids,
        ``valid`` and ``neg_valid`` read when present. With ``theta`` (a learnable τ), the loss
        at τ(θ), and in its metrics ``temperature`` and ``temperature_grad`` (d loss / d θ,
        taken here: GradCache differentiates the loss w.r.t. the embeddings only). With
        ``mesh`` (the train step's), each device scores its own rows against the gathered
        batch (:func:`gte_jax.losses.sharded_contrastive_loss`): one all-gather of the
        embeddings, one reduce-scatter of their gradients."""
        pinned = {} if mesh is None else {"mesh": mesh}
        if theta is None:
            return self._scored_fn(pinned)
        low, high = self.temperature_bounds

        def loss_fn(embeddings: Mapping[str, Array], batch: Mapping[str, Array]):
            def at(th):
                tau = learnable.temperature(th, low, high)
                scored = self._scored_fn({**pinned, "temperature": tau})
                return scored(embeddings, batch)

            (loss, metrics), grad = jax.value_and_grad(at, has_aux=True)(theta)
            tau = learnable.temperature(theta, low, high)
            return loss, {**metrics, "temperature": tau, "temperature_grad": grad}

        return loss_fn

    def _scored_fn(self, settings: Mapping[str, Any]) -> gc.LossFn:
        def loss_fn(embeddings: Mapping[str, Array], batch: Mapping[str, Array]):
            return self.loss(
                embeddings["query"],
                embeddings["doc"],
                neg=embeddings.get("neg"),
                q_ids=batch.get("query_text_id"),
                d_ids=batch.get("doc_text_id"),
                neg_ids=batch.get("neg_text_id"),
                valid=batch.get("valid"),
                neg_valid=batch.get("neg_valid") if "neg" in embeddings else None,
                teacher_scores=batch.get("teacher_scores"),
                **settings,
            )

        return loss_fn

    def value_and_grad(self, step: StepInputs) -> tuple[tuple[Array, dict[str, Array]], Any]:
        """``((loss, metrics), grads)`` w.r.t. ``step.params``: every role embedded by
        ``step.embed_fn``, through GradCache when ``step.gradcache``."""
        run = gc.cached_value_and_grad if step.gradcache else gc.plain_value_and_grad
        theta = None if step.objective_state is None else step.objective_state["theta"]
        return run(
            step.embed_fn, self.loss_fn(theta, step.mesh), step.params, step.batch, step.rng, step.num_chunks,
            mesh=step.mesh, **step.gradcache_kwargs(),
        )  # fmt: skip

    # ------------------------------------------------------------------ plan

    def similarity_columns(self, n: int, k: int) -> int:
        """Candidates each of the n rows is scored against (similarity dot products per row)."""
        raise NotImplementedError

    def flops(self, work: Workload) -> float:
        """Analytic FLOPs of the loss on one step (forward + backward, 3 x the forward's
        similarity matmuls, 2 D each; the blocked loss's recomputation not counted, as
        :func:`gte_jax.plan.model_flops` does not count remat)."""
        n, k = work.batch_size, work.num_negatives
        return 3.0 * 2 * work.embed_dim * n * self.similarity_columns(n, k)

    def memory_bytes(self, work: Workload) -> float:
        """Bytes of one logits block, the loss's largest array ([block, columns] float32,
        :mod:`gte_jax.losses` "Memory"), before XLA splits it over devices."""
        n, k = work.batch_size, work.num_negatives
        rows = n if self.block_size is None else min(n, self.block_size)
        return float(rows * self.similarity_columns(n, k) * _LOGIT_BYTES)


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """What :meth:`Objective.value_and_grad` is given inside the train step."""

    model_fn: Any  # gte_jax.models.encoder.ModelFn
    params: Any  # the trainable parameters (the gradient's variable)
    frozen: Any  # LoRA's frozen base (or None)
    embed_fn: gc.EmbedFn
    batch: Mapping[str, Array]
    rng: Array | None
    num_chunks: int = 1
    gradcache: bool = False
    mesh: jax.sharding.Mesh | None = None
    gather_params: str | None = None  # GradCache's one reduction per step (sharding.gather_params)
    param_shardings: Any = None  # the params' NamedSharding tree (which leaves FSDP splits)
    objective_state: Any = None  # state[STATE_KEY]: the objective's own trainable state

    def gradcache_kwargs(self) -> dict[str, Any]:
        """The one-reduction settings of :func:`gte_jax.gradcache.cached_value_and_grad`."""
        if not self.gradcache:
            return {}
        return {"gather": self.gather_params, "param_shardings": self.param_shardings}


_REGISTRY: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Adds ``objective`` (with its default settings) under its name; returns it."""
    if not objective.name or objective.name in _REGISTRY:
        raise ValueError(f"objective name {objective.name!r} is empty or taken")
    _REGISTRY[objective.name] = objective
    return objective


def registered() -> Mapping[str, Objective]:
    return dict(_REGISTRY)
