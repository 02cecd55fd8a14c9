"""Tolerances for comparing two float32 computations of the same value, derived from the
computation rather than measured on one CPU.

Two float32 evaluations that differ only in summation order (devices, GradCache chunks, XLA's
kernels per instruction set: AVX2, AVX-512, AMX) differ by at most about ``n * eps`` of the
largest magnitude in play, where ``n`` is the length of the reduction whose order changed
(Higham, *Accuracy and Stability of Numerical Algorithms*, §4.2: |error| <= gamma_n sum|x_i|,
gamma_n = n eps / (1 - n eps)). A tolerance measured at one machine's edge fails on the next
machine; this one holds on any, and still sits orders of magnitude below what a real bug moves
(a wrong dropout key, a missing chunk: O(1) of the scale).
"""

from __future__ import annotations

import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)  # 2^-23 ~ 1.19e-7


def reorder_atol(scale: float, n_terms: int) -> float:
    """Absolute tolerance for a float32 sum of ``n_terms`` terms of magnitude up to ``scale``
    computed in two different orders."""
    n = int(n_terms)
    return n * F32_EPS / (1 - n * F32_EPS) * float(scale)


def reorder_rtol(n_terms: int) -> float:
    """Relative form of :func:`reorder_atol` (a value whose terms share its sign, e.g. a loss)."""
    return reorder_atol(1.0, n_terms)
