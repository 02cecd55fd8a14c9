"""Prefetch: the next batches are drawn, read and tokenised in a background thread while the
device runs the current step (``data.prefetch`` batches ahead; 0 = off).

The iterator's work splits in two (:meth:`~gte_jax.data.batching.PairBatchIterator.prepare` /
:meth:`~gte_jax.data.batching.PairBatchIterator.finish`). The thread runs only ``prepare``:
drawing, reading texts and tokenising, host work without a JAX call. ``finish`` (the lengths
agreed across processes, padding or packing) runs in the consumer, the training loop's thread:
with several hosts, a collective started from a background thread could interleave differently
with the train step's collectives on different hosts. Packing's row lengths and floors change
only in ``finish``, in batch order, as without prefetch.

Exact resume: :meth:`Prefetcher.get_state` is the consumer's state, the state right after the last
batch the loop took (the sampler state each prepared batch carries), never the thread's, which
is up to ``depth + 1`` batches ahead. :meth:`Prefetcher.set_state` stops the thread and drops
what it had prepared. An exception in the thread is raised in the consumer, at the batch it would
have produced, as the same exception object (its message and the thread's traceback).
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
        self._thread: threading.Thread | None = None

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
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(
            target=self._produce, args=(self._queue,), name="gte-jax-prefetch", daemon=True
        )
        self._thread.start()

    def _produce(self, out: queue.Queue) -> None:
        while not self._stop.is_set():
            try:
                item: Any = self.iterator.prepare()
            except BaseException as e:  # handed to the consumer, which raises it
                item = _Failure(e)
            while not self._stop.is_set():
                try:
                    out.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failure):
                return

    def __next__(self) -> dict[str, Any]:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return self.iterator.finish(item)

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.close()  # what the thread drew is dropped: the next batch follows ``state``
        self.iterator.set_state(state)

    def prime_row_floor(self, *args: Any, **kwargs: Any) -> Any:
        if self._thread is not None:
            raise RuntimeError("prime_row_floor must run before the first batch is taken")
        return self.iterator.prime_row_floor(*args, **kwargs)

    def close(self) -> None:
        """Stops the thread (it finishes the batch it is preparing) and drops its batches."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = self._queue = None


def with_prefetch(iterator: Any, depth: int) -> Any:
    """``iterator`` prefetching ``depth`` batches ahead, or itself when ``depth`` is 0."""
    return Prefetcher(iterator, depth) if int(depth) > 0 else iterator
