"""Orbax checkpoints with exact resume: train state (params, optimizer, step, RNG) + data state.

One checkpoint = two items saved together under ``<workdir>/checkpoints/<step>/``:
``state`` (a pytree of jax.Arrays, saved with their shardings) and ``data`` (the data iterator's
JSON state, so a resumed run draws exactly the batches it would have drawn). Orbax writes each step
into a temporary directory and renames it when complete, so a run killed mid-save leaves no
half-written step behind; a step that is complete on disk but unreadable (bit rot, a truncated copy)
is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

import gte_jax.models.scan as scan

log = logging.getLogger(__name__)


from gte_jax.errors import CheckpointError  # noqa: E402,F401  (re-exported)


def absolute_path(path: str | epath.PathLike) -> epath.Path:
    """Local paths made absolute (orbax refuses relative ones); gs:// and other URLs unchanged."""
    text = os.fspath(path)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs that carry each leaf's sharding, so restore places arrays where they live."""

    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(one, tree)


class Checkpointer:
    """Saves every ``every_steps`` steps (and on demand), keeps ``max_to_keep``, restores the newest
    readable step."""

    def __init__(
        self,
        directory: str | epath.PathLike,
        *,
        every_steps: int,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ):
        self.directory = absolute_path(directory)
        self.every_steps = int(every_steps)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, self.every_steps),
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a save that a kill interrupted
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
            },
        )

    @property
    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(
        self, step: int, state: Any, data_state: Mapping[str, Any], *, force: bool = False
    ) -> bool:
        """Save if ``step`` is due (or ``force``); returns whether a save was started."""
        if not force and (self.every_steps <= 0 or step % self.every_steps != 0):
            return False
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state))
            ),
            force=True,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict] | None:
        """Restore ``step`` (default: the newest readable one). Returns (step, state, data_state),
        or None when the directory holds no checkpoint at all."""
        candidates = self.steps
        if step is not None:
            if step not in candidates:
                raise CheckpointError(
                    f"no checkpoint for step {step} in {self.directory}; available: {candidates}"
                )
            candidates = [step]
        if not candidates:
            return None
        self._check_layout(abstract_state, candidates[-1])
        failures = []
        for s in reversed(candidates):
            try:
                restored = self._manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # orbax raises many types for a damaged step
                failures.append(f"step {s}: {type(e).__name__}: {e}")
                log.warning(
                    "checkpoint %s/%d is unreadable (%s: %s); trying the previous one",
                    self.directory,
                    s,
                    type(e).__name__,
                    str(e)[:300],
                )
                continue
            if failures:
                log.warning(
                    "resumed from step %d after skipping %d damaged step(s)", s, len(failures)
                )
            return s, restored["state"], dict(restored["data"])
        raise CheckpointError(
            f"none of the checkpoints in {self.directory} could be restored:\n  "
            + "\n  ".join(failures)
            + "\nMove the damaged step directories away (or start a fresh --workdir) and rerun."
        )

    def _check_layout(self, abstract_state: Any, step: int) -> None:
        """Refuses (one line) to resume a run whose layers are laid out otherwise than the
        checkpoint's (``model.scan_layers`` changed): orbax would report every step damaged."""
        try:
            meta = self._manager.item_metadata(step)["state"]
        except Exception:  # unreadable: restore() skips the step with its own message
            return
        saved, wanted = scan.layout(getattr(meta, "tree", meta)), scan.layout(abstract_state)
        if saved and wanted and saved != wanted:
            setting = {"stacked": "true", "unrolled": "false"}
            raise CheckpointError(
                f"{self.directory}/{step} was written with model.scan_layers="
                f"{setting[saved]} and this run has model.scan_layers={setting[wanted]}: resume "
                "with the setting the run started with"
            )

    def restore_unsharded(self, step: int | None = None, *, host: bool = False) -> tuple[int, Any]:
        """The saved state as arrays on one local device (``host``: NumPy arrays in host memory,
        so a later stage can place a model bigger than one chip straight onto its shards),
        without knowing its structure in advance (for export and for initialising a later stage
        from this run). Damaged steps are skipped as in :meth:`restore`."""
        candidates = self.steps if step is None else [step]
        if not candidates:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        failures = []
        for s in reversed(candidates):
            try:
                meta = self._manager.item_metadata(s)["state"]
                meta = getattr(meta, "tree", meta)
                abstract = jax.tree.map(
                    (lambda m: np.zeros(m.shape, m.dtype))
                    if host
                    else (lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)),
                    meta,
                )
                # The fallback covers checkpoints written by another topology (e.g. 2 processes).
                restore = ocp.args.StandardRestore(abstract, fallback_sharding=device)
                restored = self._manager.restore(s, args=ocp.args.Composite(state=restore))
                return s, restored["state"]
            except Exception as e:  # orbax raises many types for a damaged step
                failures.append(f"step {s}: {type(e).__name__}: {e}")
                log.warning(
                    "checkpoint %s/%d is unreadable (%s); trying the previous one",
                    self.directory,
                    s,
                    str(e)[:300],
                )
        raise CheckpointError(
            f"none of the checkpoints {candidates} in {self.directory} could be restored:\n  "
            + "\n  ".join(failures)
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class PreemptionFlag:
    """Stop requests the loop honours at a step boundary, with a checkpoint: SIGTERM (what a TPU
    VM gets before preemption, and SLURM before a time limit) and SIGINT (Ctrl-C).

    :meth:`due` is asked after every step and is True at the step where *every* process stops:
    - one process: the local flag (a Python signal handler sets it);
    - several processes (``jax.distributed``): JAX's preemption sync point
      (``multihost_utils.reached_preemption_sync_point``). A SIGTERM on any host reaches the others
      through the coordination service, which picks the step (the furthest host's next one); each
      step's check is local, so no host waits on the others at every step. JAX's own notifier
      owns SIGTERM there (no Python handler replaces it), and a Ctrl-C is passed to it as a
      SIGTERM to this process. Without JAX's preemption service
      (``jax_enable_preemption_service=False``) the local flags are all-gathered every
      ``fallback_every`` steps only.
    A second Ctrl-C interrupts at once (Python's KeyboardInterrupt).
    """

    def __init__(self, fallback_every: int = 1) -> None:
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self.reason: str | None = None  # "SIGTERM" / "SIGINT" when this process got one
        self.fallback_every = max(1, int(fallback_every))
        self._sync = False

    def install(self) -> PreemptionFlag:
        from jax._src import distributed

        state = distributed.global_state
        self._sync = state.client is not None and state.preemption_sync_manager is not None
        if threading.current_thread() is not threading.main_thread():
            return self
        if not self._sync:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.reason = self.reason or name
        log.warning("%s received: saving a checkpoint at the next step, then stopping", name)
        if signum == signal.SIGINT:  # the next Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if self._sync:  # JAX's notifier tells every host
                os.kill(os.getpid(), signal.SIGTERM)
        self._event.set()

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()

    def due(self, step: int) -> bool:
        """Whether every process stops after ``step`` (call it after every step, on every
        process, with the same steps)."""
        if self._sync:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        if jax.process_count() == 1:
            return self.is_set()
        if step % self.fallback_every:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.is_set()))
        return bool(np.asarray(flags).max())
