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
from repscope.cluster.caches import ambiguous_units, prepare_unit
from repscope.cluster.kernel_tiles import kernel_matrices
from repscope.cluster.moments import pair_moments, unit_moments
from repscope.cluster.pairs import compare_pair
from repscope.cluster.rank import AmbiguousRankError
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
    eig_floor: float | None = None,
    ambiguous_rank: str = "recompute",
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
    family = {f: [k for k in metrics if METRICS[k].family == f]
              for f in ("moments", "shape", "kernel")}
    data = [a.dtype if a.dtype.kind == "f" else np.float64 for a in (x, y)]
    z = np.hstack([x, y]) if family["moments"] or family["shape"] else None

    def moment_values(dtype) -> dict[str, float]:
        tile = block_moments(z, widths_a=(x.shape[1], y.shape[1]), fourth=fourth,
                             gemm_dtype=dtype)
        out: dict[str, float] = {}
        if family["moments"]:
            cx, cy = (prepare_unit(unit_moments(tile, u), family["moments"], precision=dtype,
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
                return moment_values(np.float64)
            values = compare_pair(cx, cy, pair_moments(tile, 0, 1), family["moments"])
            out.update({k: xy for k, (xy, _yx) in values.items()})
        for k in family["shape"]:
            alpha = metric_options(k, (options or {}).get(k))["alpha"]
            sx = prepare_shape(unit_moments(tile, 0), alpha, name="x")
            sy = prepare_shape(unit_moments(tile, 1), alpha, name="y")
            out[k] = shape_angular(sx, sy, pair_moments(tile, 0, 1).cxy)
        return out

    out = moment_values(np.dtype(gemm_dtype)) if z is not None else {}
    if family["kernel"]:
        mats = kernel_matrices([x, y], family["kernel"], options, names=("x", "y"))
        out.update({k: float(v[0, 1]) for k, v in mats.items()})
    return {k: out[k] for k in metrics}
