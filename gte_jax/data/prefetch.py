"""Prefetch: the next batches are drawn, read and tokenised in a background thread while the
device runs the current step (``data.prefetch`` batches ahead; 0 = off).

The thread runs the whole batch: :meth:`~gte_jax.data.batching.PairBatchIterator.prepare`
(drawing, reading texts, tokenising) and :meth:`~gte_jax.data.batching.PairBatchIterator.finish`
(the lengths or rows agreed across processes, padding or packing), in batch order, as without
prefetch. Neither makes a JAX call: the agreement across processes goes through
``jax.distributed``'s key-value store (:class:`~gte_jax.data.batching.HostAllGatherMax`), host
only, so it cannot interleave with the train step's device collectives. That exchange is the one
thing per batch that every host waits for; in the thread it runs ``depth`` batches ahead of the
step, so the step never waits for it unless a host falls that far behind.

Exact resume: :meth:`Prefetcher.get_state` is the consumer's state, the state right after the last
batch the loop took (the iterator's state each finished batch carries: sampler, row floors and
lengths), never the thread's, which is up to ``depth + 1`` batches ahead. :meth:`Prefetcher.set_state` stops the thread and drops
what it had prepared. An exception in the thread is raised in the consumer, at the batch it would
have produced, as the same exception object (its message and the thread's traceback).

Stopping with several processes: every batch's exchanges need every process's thread, so a thread
must not stop at whatever batch it happens to be on (one host's thread waiting at a barrier for a
batch another host's thread never started would hold its ``close`` until the barrier's timeout).
The loops of all processes take the same number of batches, so ``close`` lets the thread fill its
queue and stop at the first batch it cannot put: the same batch on every process.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Mapping
from typing import Any

# How long the thread waits on a full queue before checking whether it should stop (seconds).
_POLL_S = 0.1


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Wraps a :class:`~gte_jax.data.batching.PairBatchIterator`; other attributes (``packing``,
    ``row_length``, ``stats``, ...) are the wrapped iterator's.

    The thread starts at the first batch taken, so start-up calls on the iterator
    (``prime_row_floor``, ``set_state``) run before it; ``close`` stops it."""

    def __init__(self, iterator: Any, depth: int):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.iterator = iterator
        self.depth = int(depth)
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        # Several processes: stop after the batch that finds the queue full (module docstring).
        self._drain = threading.Event()
        self._thread: threading.Thread | None = None
        self._state: dict[str, Any] | None = None  # the iterator's state after the last batch taken

    def __getattr__(self, name: str) -> Any:
        if "iterator" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["iterator"], name)

    def __iter__(self) -> Prefetcher:
        return self

    def _start(self) -> None:
        # The thread gets its own tokenizer: a fast tokenizer changes its truncation settings on
        # each call, and another thread using the same object (evaluation) would then fail with
        # "Already borrowed" or truncate at the other's length.
        it = self.iterator
        it.tokenizer = copy.deepcopy(it.tokenizer)
        if it.prompt_lengths is not None:
            it.prompt_lengths.tokenizer = it.tokenizer
        self._stop.clear()
        self._drain.clear()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(
            target=self._produce, args=(self._queue,), name="gte-jax-prefetch", daemon=True
        )
        self._thread.start()

    def _produce(self, out: queue.Queue) -> None:
        while not self._stop.is_set():
            try:
                batch = self.iterator.finish(self.iterator.prepare())
                item: Any = (batch, copy.deepcopy(self.iterator.get_state()))
            except BaseException as e:  # handed to the consumer, which raises it
                item = _Failure(e)
            while not self._stop.is_set():
                try:
                    out.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    if self._drain.is_set():
                        return
            if isinstance(item, _Failure):
                return

    def __next__(self) -> dict[str, Any]:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        batch, self._state = item
        return batch

    def get_state(self) -> dict[str, Any]:
        if self._state is not None:
            return copy.deepcopy(self._state)
        return self.iterator.get_state()

    def stats(self) -> dict[str, dict[str, Any]]:
        """The iterator's per-source counts, drawn batches as of the last batch taken."""
        return self.iterator.stats(self._state["sampler"] if self._state is not None else None)

    @property
    def row_length(self) -> dict[str, int]:
        """Packed row lengths of the last batch taken (the thread may have switched further)."""
        if self._state is not None and self._state.get("row_length"):
            return dict(self._state["row_length"])
        return self.iterator.row_length

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.close()  # what the thread drew is dropped: the next batch follows ``state``
        self.iterator.set_state(state)
        self._state = None

    def prime_row_floor(self, *args: Any, **kwargs: Any) -> Any:
        if self._thread is not None:
            raise RuntimeError("prime_row_floor must run before the first batch is taken")
        return self.iterator.prime_row_floor(*args, **kwargs)

    def close(self) -> None:
        """Stops the thread (it finishes the batch it is preparing; with several processes, the
        batches up to a full queue) and drops its batches; the iterator is left at the state of
        the last batch taken."""
        if self._thread is None:
            return
        if getattr(self.iterator, "process_count", 1) > 1:
            self._drain.set()
        else:
            self._stop.set()
        self._thread.join()
        self._thread = self._queue = None
        if self._state is not None:  # rewind what the thread drew beyond the last batch taken
            self.iterator.set_state(self._state)
            self.iterator.row_floor = dict(self._state.get("row_floor") or {})


def with_prefetch(iterator: Any, depth: int) -> Any:
    """``iterator`` prefetching ``depth`` batches ahead, or itself when ``depth`` is 0."""
    return Prefetcher(iterator, depth) if int(depth) > 0 else iterator
