"""Test helpers shared by several test files."""

from __future__ import annotations

import threading

import numpy as np


class ThreadAllGather:
    """In-process stand-in for the all-gather (max) that simulated processes (threads) run per
    batch: each thread passes its local array, all get the element-wise max."""

    def __init__(self, n: int):
        self.slots = [None] * n
        self.gathered, self.read = threading.Barrier(n), threading.Barrier(n)

    def for_process(self, i: int):
        def agree(local):
            self.slots[i] = local
            self.gathered.wait()
            out = np.max(np.stack(self.slots), axis=0)
            self.read.wait()
            return out

        return agree
