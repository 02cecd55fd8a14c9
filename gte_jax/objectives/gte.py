"""GTE's contrastive loss with one joint partition function (Li et al., 2023, §3):
:func:`gte_jax.losses.gte_loss`."""

from __future__ import annotations

import dataclasses
import math

from gte_jax import losses
from gte_jax.objectives.base import Objective, register


@dataclasses.dataclass(frozen=True)
class GTE(Objective):
    name = "gte"
    default_temperature = losses.GTE_TEMPERATURE  # GTE §3: τ = 0.01
    # The positive sits twice in the partition function (q→d and d→q), so p(positive) <= 1/2
    # and the loss never goes below ln 2.
    floor = math.log(2.0)
    loss_function = staticmethod(losses.gte_loss)

    def similarity_columns(self, n: int, k: int) -> int:
        m = n * (1 + k)  # positives and hard negatives
        return 2 * m + 2 * n  # q→d, q→q, d→q, d→d


OBJECTIVE = register(GTE())
