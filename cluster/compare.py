"""In-memory convenience: compare two activation arrays with every metric.

The same path as a distributed job, on one block: the two units form one column group, one
diagonal-tile :func:`~repscope.cluster.accumulate.block_moments` gives both units' moments
and their cross moments, then :func:`~repscope.cluster.caches.prepare_unit` and
:func:`~repscope.cluster.pairs.compare_pair` finish them. There is no second implementation
of any metric.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from repscope.cluster.accumulate import block_moments
from repscope.cluster.caches import prepare_unit
from repscope.cluster.moments import pair_moments, unit_moments
from repscope.cluster.pairs import compare_pair
from repscope.cluster.registry import METRICS, check_metrics
from repscope.errors import InputError

__all__ = ["compare_arrays"]


def _check_array(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise InputError(f"{name} must be 2-D (rows, features), got shape {a.shape}")
    if a.dtype.kind not in "fiu":
        raise InputError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if a.shape[1] == 0:
        raise InputError(f"{name} has no features (shape {a.shape})")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        rows = np.flatnonzero(~np.all(np.isfinite(a), axis=1))
        raise InputError(
            f"{name} has NaN or Inf values in {rows.size} rows (first: {rows[:5].tolist()})"
        )
    return a


def compare_arrays(
    x: np.ndarray,
    y: np.ndarray,
    metrics: str | Iterable[str] | None = None,
    *,
    svcca_threshold: float = 0.99,
    gemm_dtype: type | np.dtype = np.float64,
) -> dict[str, float]:
    """Similarity of two representations of the same rows.

    Parameters
    ----------
    x : ndarray of shape (n_rows, p)
    y : ndarray of shape (n_rows, q)
    metrics : names (None: all of :data:`~repscope.cluster.registry.METRICS`).
    svcca_threshold : fraction of variance SVCCA keeps per side.
    gemm_dtype : dtype of the centered product (float32 for speed, float64 default).

    Returns
    -------
    dict mapping metric name to value(x, y); PWCCA uses x's canonical variates.

    Raises
    ------
    InputError
        Not 2-D, different row counts, NaN/Inf, unknown metric, zero-variance input.

    Notes
    -----
    Memory: a centered copy of [x y] and a (p + q)^2 product; cost n (p + q)^2 / 2.
    """
    metrics = check_metrics(metrics)
    x, y = _check_array(x, "x"), _check_array(y, "y")
    if x.shape[0] != y.shape[0]:
        raise InputError(
            f"x and y must have the same rows: x has {x.shape[0]}, y has {y.shape[0]}"
        )
    fourth = any(METRICS[k].needs_fourth for k in metrics)
    z = np.hstack([x, y])
    tile = block_moments(z, widths_a=(x.shape[1], y.shape[1]), fourth=fourth,
                         gemm_dtype=gemm_dtype)
    cx = prepare_unit(unit_moments(tile, 0), metrics, svcca_threshold=svcca_threshold, name="x")
    cy = prepare_unit(unit_moments(tile, 1), metrics, svcca_threshold=svcca_threshold, name="y")
    values = compare_pair(cx, cy, pair_moments(tile, 0, 1), metrics)
    return {k: xy for k, (xy, _yx) in values.items()}
