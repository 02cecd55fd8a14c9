"""``gte_jax.train``: the names of the training package (:mod:`gte_jax.training`) under their
former module, for code and notebooks written against it. New code imports from
``gte_jax.training.<module>`` (docs/design.md, "Map of the package"). The loop is not here:
only ``gte_jax/commands/`` import :mod:`gte_jax.training.loop` (``run``, ``train_stage``)."""

from __future__ import annotations

from gte_jax.models.encoder import ModelFn  # noqa: F401
from gte_jax.objectives.mntp import MNTP_LOGITS_BLOCK, mntp_value_and_grad  # noqa: F401
from gte_jax.training import hooks as hooks_lib  # noqa: F401
from gte_jax.training.checks import (  # noqa: F401
    STAGE_KINDS,
    TrainingDiverged,
    TrainingError,
    cannot_run,
    check_config,
    check_source_batches,
    matryoshka_problems,
    packing_problems,
    run_mesh,
    source_batch_problems,
    stage_kind_problems,
    trains_lm_head,
)
from gte_jax.training.evaluator import Evaluator  # noqa: F401
from gte_jax.training.optimizer import make_optimizer, update_count, weight_decay_mask  # noqa: F401
from gte_jax.training.setup import (  # noqa: F401
    FROZEN_BASE_FILE,
    Stage,
    frozen_fingerprint,
    load_model_for_training,
    setup_stage,
)
from gte_jax.training.state import (  # noqa: F401
    EXAMPLES_SEEN,
    checkpointed,
    full_params,
    init_train_state,
    initial_state,
)
from gte_jax.training.step import (  # noqa: F401
    StepRunner,
    TrainStep,
    build_train_step,
    make_embed_fn,
    make_train_step,
)
from gte_jax.training.summary import LOSS_FLOORS, json_safe, write_json  # noqa: F401
