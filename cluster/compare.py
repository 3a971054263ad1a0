"""In-memory convenience: compare two activation arrays with every metric.

The same path as a distributed job, on one block: the two units form one column group, one
diagonal-tile :func:`~repscope.cluster.accumulate.block_moments` gives both units' moments
and their cross moments, then :func:`~repscope.cluster.caches.prepare_unit` and
:func:`~repscope.cluster.pairs.compare_pair` finish them. There is no second implementation
of any metric. The shape metric comes from the same moments (:mod:`repscope.cluster.shape`),
the kernel metrics from the row-block tiles of a job (:mod:`repscope.cluster.kernel_tiles`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from repscope.cluster.accumulate import block_moments
from repscope.cluster.caches import prepare_unit
from repscope.cluster.kernel_tiles import kernel_matrices
from repscope.cluster.moments import pair_moments, unit_moments
from repscope.cluster.pairs import compare_pair
from repscope.cluster.registry import METRICS, check_metrics, metric_options
from repscope.cluster.shape import prepare_shape, shape_angular
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
    options: dict | None = None,
) -> dict[str, float]:
    """Similarity of two representations of the same rows.

    Parameters
    ----------
    x : ndarray of shape (n_rows, p)
    y : ndarray of shape (n_rows, q)
    metrics : names (None: the moment metrics, :data:`~repscope.cluster.registry.
        MOMENT_METRICS`); the shape and kernel metrics are computed when named.
    svcca_threshold : fraction of variance SVCCA keeps per side.
    gemm_dtype : dtype of the centered product (float32 for speed, float64 default).
    options : parameters of metrics that have them, {metric: {name: value}}.

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
    family = {f: [k for k in metrics if METRICS[k].family == f]
              for f in ("moments", "shape", "kernel")}
    out: dict[str, float] = {}
    if family["moments"] or family["shape"]:
        z = np.hstack([x, y])
        tile = block_moments(z, widths_a=(x.shape[1], y.shape[1]), fourth=fourth,
                             gemm_dtype=gemm_dtype)
    if family["moments"]:
        moments = family["moments"]
        cx = prepare_unit(unit_moments(tile, 0), moments, svcca_threshold=svcca_threshold,
                          name="x")
        cy = prepare_unit(unit_moments(tile, 1), moments, svcca_threshold=svcca_threshold,
                          name="y")
        values = compare_pair(cx, cy, pair_moments(tile, 0, 1), moments)
        out.update({k: xy for k, (xy, _yx) in values.items()})
    for k in family["shape"]:
        alpha = metric_options(k, (options or {}).get(k))["alpha"]
        sx = prepare_shape(unit_moments(tile, 0), alpha, name="x")
        sy = prepare_shape(unit_moments(tile, 1), alpha, name="y")
        out[k] = shape_angular(sx, sy, pair_moments(tile, 0, 1).cxy)
    if family["kernel"]:
        mats = kernel_matrices([x, y], family["kernel"], options, names=("x", "y"))
        out.update({k: float(v[0, 1]) for k, v in mats.items()})
    return {k: out[k] for k in metrics}
