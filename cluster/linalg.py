"""Small linear-algebra helpers shared by the moments, the accumulator and the metrics.

Pure numpy/scipy, no I/O. Column groups are described by unit widths: a group of k units of
widths (w1, ..., wk) is the matrix [X1 .. Xk] with w1 + ... + wk columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "unit_offsets",
    "unit_slice",
    "unit_sums",
    "centered_gram",
    "cross_product",
    "zeros",
]


def zeros(shape, dtype=np.float64, order: str = "C") -> np.ndarray:
    """``np.zeros`` for large accumulators, its pages touched now: ``np.empty``, then filled.

    ``np.zeros`` maps zero pages lazily, so their page faults would come in the first
    product; a task builds its accumulator while its first block is read
    (:mod:`repscope.cluster.tasks`), and fresh pages cost more than the arithmetic on them
    on some machines (docs/performance.md).
    """
    out = np.empty(shape, dtype=dtype, order=order)
    out.fill(0)
    return out


def unit_offsets(widths: Sequence[int]) -> np.ndarray:
    """Start column of each unit: ndarray of shape (n_units,), int."""
    return np.concatenate(([0], np.cumsum(widths[:-1]))).astype(np.intp)


def unit_slice(widths: Sequence[int], u: int) -> slice:
    """Columns of unit ``u`` inside a group with unit widths ``widths``."""
    start = int(sum(widths[:u]))
    return slice(start, start + int(widths[u]))


def unit_sums(a: np.ndarray, widths: Sequence[int], axis: int) -> np.ndarray:
    """Sum ``a`` over each unit's columns (``axis`` runs over a group's columns).

    One ``np.add.reduceat`` pass: O(size of ``a``). Units of width 0 are not supported (a unit
    has at least one feature), which keeps the reduceat offsets strictly increasing.
    """
    return np.add.reduceat(a, unit_offsets(widths), axis=axis)


def centered_gram(zc: np.ndarray) -> np.ndarray:
    """Symmetric product ``zc^T zc`` as float64: ndarray of shape (d, d).

    numpy recognises ``a.T @ a`` (same buffer) and calls BLAS syrk, half the flops of a GEMM,
    mirroring the triangle itself; measured faster here than scipy's ``dsyrk``/``ssyrk``
    wrappers (OpenBLAS 0.3.31, 2 cores: 0.10 s vs 0.19 s for 4096 x 2048 float32).
    """
    return (zc.T @ zc).astype(np.float64, copy=False)


def cross_product(za: np.ndarray, zb: np.ndarray) -> np.ndarray:
    """``za^T zb`` as float64 for za (n_rows, d_a) and zb (n_rows, d_b): one BLAS GEMM."""
    # numpy passes the transposed view to gemm with a transpose flag: no copy of za.
    return (za.T @ zb).astype(np.float64, copy=False)
