"""Test helpers shared by several test files."""

from __future__ import annotations

import copy
import threading

import numpy as np


def process_tokenizer(tokenizer):
    """The tokenizer of one simulated process (thread): its own copy, as a real process has.

    A Hugging Face fast tokenizer is not safe to share between threads: each call first sets the
    Rust tokenizer's truncation (``max_length``) and then encodes, so a thread tokenising queries
    (32) beside one tokenising documents (48) can get 48-token queries (seen once in a full run:
    "text 3 has 48 tokens, more than the packed row length 32")."""
    return copy.deepcopy(tokenizer)


class ThreadAllGather:
    """In-process stand-in for the all-gather (max) that simulated processes (threads) run per
    batch: each thread passes its local array, all get the element-wise max."""

    def __init__(self, n: int, timeout: float = 600):
        self.slots = [None] * n
        self.gathered = threading.Barrier(n, timeout=timeout)
        self.read = threading.Barrier(n, timeout=timeout)

    def abort(self) -> None:
        """Breaks the barriers: threads waiting in :meth:`for_process` raise at once."""
        self.gathered.abort()
        self.read.abort()

    def for_process(self, i: int):
        def agree(local):
            self.slots[i] = local
            self.gathered.wait()
            out = np.max(np.stack(self.slots), axis=0)
            self.read.wait()
            return out

        return agree

    def gather_for_process(self, i: int):
        """Process i's side of an all-gather of any values (``host_gather``): every thread
        gets the list of all threads' values, in process order."""

        def gather(local):
            self.slots[i] = local
            self.gathered.wait()
            out = list(self.slots)
            self.read.wait()
            return out

        return gather


def run_processes(target, n: int = 2, timeout: float = 600, *, gather: bool = False) -> list:
    """``target(p, agree_lengths)`` for p in 0..n-1, each in a thread (a simulated process) with
    its own side of one :class:`ThreadAllGather`; returns the n results in process order.
    ``gather``: ``target(p, agree_lengths, host_gather)``, both sides of the same gather (the
    threads call them in the same order, as processes do).

    An exception in one thread is raised here, as it was raised there: the gather is aborted, so
    the other threads stop at their next all-gather instead of waiting for the timeout, and the
    test fails with the real error (not an empty result found later). A thread still running after
    ``timeout`` seconds (a loaded 2-core CI machine once took over 60 s) fails the test too."""
    exchange = ThreadAllGather(n, timeout)
    results: list = [None] * n
    errors: list[BaseException] = []

    def run(p: int) -> None:
        try:
            sides = (exchange.for_process(p),)
            if gather:
                sides += (exchange.gather_for_process(p),)
            results[p] = target(p, *sides)
        except BaseException as e:  # noqa: BLE001 (re-raised in the calling thread)
            errors.append(e)
            exchange.abort()

    threads = [threading.Thread(target=run, args=(p,)) for p in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    if errors:  # the thread that failed first, not the ones its abort broke
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        raise (real or errors)[0]
    assert not any(t.is_alive() for t in threads), f"a simulated process ran over {timeout} s"
    return results
