"""InfoNCE with in-batch negatives (sentence-transformers' MultipleNegativesRankingLoss;
E5-mistral, LLM2Vec): :func:`gte_jax.losses.infonce_loss`, optionally symmetric."""

from __future__ import annotations

import dataclasses
from typing import Any

from gte_jax import losses
from gte_jax.objectives.base import Objective, register


@dataclasses.dataclass(frozen=True)
class InfoNCE(Objective):
    name = "infonce"
    default_temperature = losses.INFONCE_TEMPERATURE  # MNRL's scale 20
    floor = 0.0
    loss_function = staticmethod(losses.infonce_loss)

    def problems(self, config: Any) -> list[str]:
        return self.temperature_problems(config)  # loss.symmetric is its own setting

    def loss_kwargs(self) -> dict[str, Any]:
        return {**super().loss_kwargs(), "symmetric": self.symmetric}

    def similarity_columns(self, n: int, k: int) -> int:
        return n * (1 + k) + (n if self.symmetric else 0)  # q→d (+ d→q)


OBJECTIVE = register(InfoNCE())
