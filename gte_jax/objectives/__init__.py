"""Training objectives as values (:class:`~gte_jax.objectives.base.Objective`), one module each.

``get(name)`` gives the objective with its defaults, ``from_config(config)`` the one a stage
trains with (``kind="mntp"``: MNTP; otherwise ``loss.name``) with its settings bound. Every module
of this package is imported here; a module that defines a loss registers it
(:func:`~gte_jax.objectives.base.register`), so adding a loss is adding one file
(docs/design.md, "Adding a loss").
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from gte_jax.objectives.base import (
    STATE_KEY,
    Objective,
    StepInputs,
    Workload,
    register,
    registered,
)

__all__ = [
    "STATE_KEY",
    "Objective",
    "StepInputs",
    "Workload",
    "from_config",
    "get",
    "names",
    "register",
]


def _import_all() -> None:
    # Discovered, not listed: a new loss module needs no line here.
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()


def names() -> list[str]:
    return sorted(registered())


def contrastive_names() -> list[str]:
    """What ``loss.name`` may be: the objectives that score embeddings."""
    return sorted(n for n, o in registered().items() if o.kind == "contrastive")


def get(name: str) -> Objective:
    """The objective registered as ``name``, with its default settings."""
    found = registered().get(str(name))
    if found is None:
        raise ValueError(f"unknown loss {name!r}; choose one of {contrastive_names()}")
    return found


def name_of(config: Any) -> str:
    """The objective a stage trains with: its kind's (MNTP) or ``loss.name``."""
    return "mntp" if str(config.kind) == "mntp" else str(config.loss.name)


def from_config(config: Any) -> Objective:
    """The stage's objective with the stage's settings (``loss.*``, ``mntp.*``)."""
    return get(name_of(config)).configured(config)
