"""INSTRUCTOR's loss (Su et al., 2023; the release's ``InstructorTrainer.compute_loss``):
:func:`gte_jax.losses.instructor_loss`."""

from __future__ import annotations

import dataclasses

from gte_jax import losses
from gte_jax.objectives.base import Objective, register


@dataclasses.dataclass(frozen=True)
class Instructor(Objective):
    name = "instructor"
    default_temperature = losses.INSTRUCTOR_TEMPERATURE  # the release's --cl_temperature 0.1
    floor = 0.0
    loss_function = staticmethod(losses.instructor_loss)

    def similarity_columns(self, n: int, k: int) -> int:
        # q→d is scored against every document, then masked to d_i and the negatives; d→q.
        return n * (1 + k) + n


OBJECTIVE = register(Instructor())
