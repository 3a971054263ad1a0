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
from repscope.cluster.caches import ambiguous_units, prepare_unit
from repscope.cluster.moments import pair_moments, unit_moments
from repscope.cluster.pairs import compare_pair
from repscope.cluster.rank import AmbiguousRankError
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
    eig_floor: float | None = None,
    ambiguous_rank: str = "recompute",
) -> dict[str, float]:
    """Similarity of two representations of the same rows.

    Parameters
    ----------
    x : ndarray of shape (n_rows, p)
    y : ndarray of shape (n_rows, q)
    metrics : names (None: all of :data:`~repscope.cluster.registry.METRICS`).
    svcca_threshold : fraction of variance SVCCA keeps per side.
    gemm_dtype : dtype of the centered product (float32 for speed, float64 default).
    eig_floor : an explicit relative rank cut (None: derived from the precision,
        :mod:`repscope.cluster.rank`).
    ambiguous_rank : with float32 products, when a unit's rank is ambiguous (no clear gap
        between signal and rounding noise): "recompute" everything in float64 (default),
        "refuse" (AmbiguousRankError naming the unit). The job's ``compute.ambiguous_rank``.

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
    if ambiguous_rank not in ("recompute", "refuse"):
        raise InputError(f"ambiguous_rank must be 'recompute' or 'refuse', got {ambiguous_rank!r}")
    x, y = _check_array(x, "x"), _check_array(y, "y")
    if x.shape[0] != y.shape[0]:
        raise InputError(
            f"x and y must have the same rows: x has {x.shape[0]}, y has {y.shape[0]}"
        )
    fourth = any(METRICS[k].needs_fourth for k in metrics)
    z = np.hstack([x, y])
    data = [a.dtype if a.dtype.kind == "f" else np.float64 for a in (x, y)]

    def finish(dtype) -> dict[str, tuple[float, float]]:
        tile = block_moments(z, widths_a=(x.shape[1], y.shape[1]), fourth=fourth,
                             gemm_dtype=dtype)
        cx, cy = (prepare_unit(unit_moments(tile, u), metrics, precision=dtype,
                               data_dtype=data[u], svcca_threshold=svcca_threshold,
                               eig_floor=eig_floor, name=name)
                  for u, name in enumerate("xy"))
        bad = ambiguous_units([cx, cy])
        if bad:
            first = (cx, cy)[bad[0]]
            if ambiguous_rank == "refuse":
                raise AmbiguousRankError(
                    f"unit {first.name!r}: float32 statistics cannot decide its rank "
                    f"({first.ambiguous}); use gemm_dtype=float64 or set eig_floor")
            return finish(np.float64)
        return compare_pair(cx, cy, pair_moments(tile, 0, 1), metrics)

    return {k: xy for k, (xy, _yx) in finish(np.dtype(gemm_dtype)).items()}
