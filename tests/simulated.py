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

    def __init__(self, n: int):
        self.slots = [None] * n
        # A thread that dies breaks the barriers for the others (BrokenBarrierError), rather than
        # leaving them waiting for the test's join timeout.
        self.gathered, self.read = (
            threading.Barrier(n, timeout=600),
            threading.Barrier(n, timeout=600),
        )

    def for_process(self, i: int):
        def agree(local):
            try:
                self.slots[i] = local
                self.gathered.wait()
                out = np.max(np.stack(self.slots), axis=0)
                self.read.wait()
            except BaseException:
                self.gathered.abort()
                self.read.abort()
                raise
            return out

        return agree
