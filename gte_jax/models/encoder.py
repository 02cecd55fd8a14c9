"""Bi-encoder: one shared transformer tower (any family of ``gte_jax.models.registry``) for queries and documents, pooled to one vector.

tower -> pooling -> optional linear projection (sentence-transformers ``Dense``) -> optional L2
normalisation. Output is always float32, whatever the tower's compute dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import gte_jax.models.lora as lora
from gte_jax.models.pooling import POOLING_MODES, l2_normalize, pool, pool_segments
from gte_jax.models.registry import build_tower

# Activations a projection may apply after its matmul (sentence-transformers Dense's choices).
PROJECTION_ACTIVATIONS = {"identity": lambda x: x, "tanh": jnp.tanh}


class BiEncoder(nnx.Module):
    """Embeds token ids into one vector per text: ``__call__(ids, mask, ...) -> [batch, dim]``."""

    def __init__(
        self,
        config: Any,  # a family config (gte_jax.models.registry)
        *,
        pooling: str = "mean",
        normalize: bool = True,
        projection_dim: int | None = None,
        projection_bias: bool = True,
        projection_activation: str = "identity",
        rngs: nnx.Rngs,
    ):
        if pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {pooling!r}; use one of {POOLING_MODES}.")
        if projection_activation not in PROJECTION_ACTIVATIONS:
            raise ValueError(
                f"unknown projection_activation {projection_activation!r}; "
                f"use one of {sorted(PROJECTION_ACTIVATIONS)}."
            )
        self.config = config
        self.pooling = pooling
        self.normalize = normalize
        self.projection_activation = projection_activation
        self.encoder = build_tower(config, rngs=rngs)
        # float32 projection: it acts on the float32 pooled vector. nnx.data: a data attribute even
        # when None, so a projection can be attached to a loaded model later.
        self.projection = nnx.data(
            nnx.Linear(
                config.hidden_size,
                projection_dim,
                use_bias=projection_bias,
                param_dtype=config.param_dtype,
                rngs=rngs,
            )
            if projection_dim
            else None
        )

    @property
    def embedding_dim(self) -> int:
        return (
            self.projection.out_features if self.projection is not None else self.config.hidden_size
        )

    def __call__(
        self,
        input_ids: jax.Array,  # [batch, length] int32
        attention_mask: jax.Array,  # [batch, length] int32
        token_type_ids: jax.Array | None = None,  # [batch, length] int32
        pool_mask: jax.Array | None = None,  # [batch, length] int32, 1 = pooled
        *,
        segment_ids: jax.Array | None = None,  # [rows, length] int32, packed rows
        position_ids: jax.Array | None = None,  # [rows, length] int32, from 0 per packed text
        slot_index: jax.Array | None = None,  # [n, ...] int32 row * length + slot per text
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        return self.embed(
            input_ids,
            attention_mask,
            token_type_ids,
            pool_mask,
            segment_ids=segment_ids,
            position_ids=position_ids,
            slot_index=slot_index,
            dropout_rng=dropout_rng,
        )

    def embed(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        pool_mask: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        slot_index: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        pooling: str | None = None,
        normalize: bool | None = None,
    ) -> jax.Array:
        """``__call__`` with the pooling mode / normalisation overridable per call.

        Packed rows (docs/design.md, "Packed batches"): ``segment_ids`` numbers the texts of
        each row, ``slot_index`` picks each text's pooled vector out of the [rows * length]
        slots, so the output is [*slot_index.shape, dim], one vector per text.
        """
        mode = pooling or self.pooling
        hidden = self.encoder(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            segment_ids=segment_ids,
            dropout_rng=dropout_rng,
        )  # [rows, length, embed]
        if segment_ids is None:
            x = pool(hidden, attention_mask, mode, pool_mask=pool_mask)  # [batch, embed]
        else:
            if slot_index is None:
                raise ValueError("packed rows (segment_ids) need slot_index to pick the texts")
            slots = pool_segments(hidden, attention_mask, segment_ids, mode, pool_mask=pool_mask)
            slots = slots.reshape(-1, slots.shape[-1])  # [rows * length, embed]
            # A gather of pooled vectors only: across devices XLA moves [n, embed], not tokens.
            x = jnp.take(slots, slot_index, axis=0)  # [*slot_index.shape, embed]
        if self.projection is not None:
            x = PROJECTION_ACTIVATIONS[self.projection_activation](
                self.projection(x)
            )  # [batch, dim]
        if self.normalize if normalize is None else normalize:
            x = l2_normalize(x)
        return x.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ModelFn:
    """A model split once into its static graph and a template of its parameter state.

    ``apply(params, ...)`` rebuilds the module from a *pure* dict of arrays (what optax and orbax see)
    and calls it — MaxText's lesson: split once, work on pure state inside jit."""

    graphdef: Any
    template: Any  # nnx.State; only its structure and Variable types are used
    # Pure dict of bools, True where a parameter trains (LoRA factors when the model has any:
    # models/lora.py; a frozen LM head: from_module); None: every parameter trains.
    trainable: Any = None

    @classmethod
    def from_module(cls, module: nnx.Module, *, train_lm_head: bool = True) -> tuple[ModelFn, dict]:
        """``train_lm_head=False``: a decoder's untied ``lm_head`` is frozen like LoRA's base
        (no gradient, no Adam moments: ~1.5 GB of state for Mistral-7B that a contrastive stage
        never moves; only MNTP stages read the LM head)."""
        graphdef, state = nnx.split(module, nnx.Param)
        params = state.to_pure_dict()
        trainable = lora.trainable_mask(module)
        head = params.get("encoder", {}).get("lm_head")
        if head and not train_lm_head:
            trainable = trainable or jax.tree.map(lambda _: True, params)
            trainable["encoder"]["lm_head"] = jax.tree.map(lambda _: False, head)
        return cls(graphdef, state, trainable), params

    def split_params(self, params: Mapping[str, Any]) -> tuple[dict, dict]:
        """(trainable, frozen) parts of a full pure param dict; frozen is {} when all train. Only
        the trainable part enters the gradient and the optimizer state."""
        if self.trainable is None:
            return dict(params), {}
        return lora.partition(params, self.trainable)

    def join_params(self, trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
        """The full param dict from :meth:`split_params`'s two parts."""
        if not frozen:
            return dict(trainable)
        # A frozen base stored in bfloat16 (model.lora.base_dtype) is seen as float32, the dtype
        # every tower declares its parameters in (config.param_dtype): every forward (train,
        # eval, export) is that of the float32 model with bfloat16-rounded weights, whatever
        # model.dtype computes in. Under jit the cast fuses into the ops that read the weights.
        frozen = jax.tree.map(
            lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, frozen
        )
        return lora.combine(trainable, frozen)

    def module(self, params: Mapping[str, Any]) -> nnx.Module:
        state = jax.tree.map(lambda v: v, self.template)
        state.replace_by_pure_dict(params)
        return nnx.merge(self.graphdef, state)
