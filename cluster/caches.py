"""Per-unit work, done once per unit and reused for every pair that contains it.

The work that belongs to a unit (traces, ``||Cxx||_F``, the eigendecomposition and the rank
decision, the whitened basis of the kept directions, the debiased self-HSIC) is done once by
:func:`prepare_unit` (netrep's per-network precompute); :mod:`repscope.cluster.pairs` does
the per-pair work. Conventions follow the authors' code (docs/metrics.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from repscope.cluster.moments import UnitMoments
from repscope.cluster.rank import decide_rank, spectrum, zero_variance
from repscope.cluster.registry import METRICS, FewRowsWarning, check_metrics
from repscope.errors import InputError

__all__ = [
    "UnitCache",
    "prepare_unit",
    "ambiguous_units",
    "svcca_dims",
    "debiased_hsic",
    "check_finite",
]


def svcca_dims(evals: np.ndarray, threshold: float, rank: int, total: float) -> int:
    """Principal directions SVCCA keeps: the fewest whose eigenvalues (variances) sum to at
    least ``threshold`` of ``total`` (tr C), never more than the ``rank`` kept ones (Raghu et
    al. 2017, as in the reference values). Both spaces call this."""
    fraction = np.cumsum(evals[:rank]) / total
    return min(rank, int(np.searchsorted(fraction, threshold)) + 1)


def debiased_hsic(
    xty_sq: float, sum_ab: float, trace_x: float, trace_y: float, n: int
) -> float:
    """Unbiased HSIC (Song et al. 2012) of centered linear kernels, times n(n-3).

    ``||X^T Y||_F^2 - n/(n-2) sum_i ||x_i||^2 ||y_i||^2 + tr(X^T X) tr(Y^T Y) / ((n-1)(n-2))``:
    the full U-statistic's row-sum terms collapse because centered kernels have zero row sums
    (Kornblith et al. 2019, ``_debiased_dot_product_similarity_helper``). The n(n-3) factor
    cancels in CKA.
    """
    return xty_sq - n / (n - 2.0) * sum_ab + trace_x * trace_y / ((n - 1.0) * (n - 2.0))


def check_finite(values, what: str) -> None:
    """Raise InputError naming ``what`` when any of ``values`` is NaN or infinite: a result
    that cannot be trusted is an error, never a NaN in a finished matrix."""
    bad = ~np.isfinite(np.asarray(values, dtype=np.float64))
    if np.any(bad):
        raise InputError(
            f"{what} is not finite: the statistics overflowed or lost all precision "
            "(activations with extreme values?); check the unit's rows"
        )


@dataclass(frozen=True)
class UnitCache:
    """Per-unit work, done once and reused for every pair containing the unit.

    Attributes
    ----------
    name : the unit's name, for messages.
    n : rows; dim : features p.
    metrics : the metric names this cache was prepared for.
    precision : dtype of the products its statistics came from ("float32" or "float64").
    trace : tr Cxx. fro : ||Cxx||_F.
    evals : ndarray (p,), eigenvalues of Cxx, descending, clipped at 0; None when no metric
        whitens (CKA and Procrustes only: no O(p^3) work per unit).
    rank : the effective rank, eigenvalues above ``cut`` (None without evals).
    cut : the absolute rank cut (:mod:`repscope.cluster.rank`), None without evals.
    ambiguous : why float32 statistics cannot decide this unit's rank, or None (the pipeline
        recomputes such a unit in float64 or refuses it, ``compute.ambiguous_rank``).
    basis : ndarray (p, rank), ``U_r diag(lambda_r)^(-1/2)``: whitens the kept directions
        (``basis^T Cxx basis = I``); its first ``svcca_dims`` columns are SVCCA's basis.
    root : ndarray (p, rank), ``Cxx basis = U_r diag(lambda_r)^(1/2)``: row j of ``root u``
        is the covariance of feature j with the canonical variate ``X basis u`` (PWCCA).
    svcca_dims : principal directions SVCCA keeps (None unless prepared for it).
    self_hsic : sqrt of the debiased self-HSIC (debiased CKA's normaliser), else None.
    """

    name: str
    n: int
    dim: int
    metrics: tuple[str, ...]
    precision: str
    trace: float
    fro: float
    evals: np.ndarray | None = None
    rank: int | None = None
    cut: float | None = None
    ambiguous: str | None = None
    basis: np.ndarray | None = None
    root: np.ndarray | None = None
    svcca_dims: int | None = None
    self_hsic: float | None = None


def ambiguous_units(caches: dict[int, UnitCache] | Iterable[UnitCache]) -> list:
    """The units whose float32 rank decision is ambiguous: keys of a dict of caches (or
    positions in a sequence), for the pipeline to recompute in float64 or refuse."""
    items = caches.items() if isinstance(caches, dict) else enumerate(caches)
    return [k for k, c in items if c.ambiguous is not None and c.precision == "float32"]


def prepare_unit(
    m: UnitMoments,
    metrics: Iterable[str] | None = None,
    *,
    precision: str | type | np.dtype = "float32",
    data_dtype: str | type | np.dtype = "float32",
    svcca_threshold: float = 0.99,
    eig_floor: float | None = None,
    cut: float | None = None,
    name: str = "unit",
) -> UnitCache:
    """Per-unit work for ``metrics``: the rank decision, cached bases.

    Parameters
    ----------
    m : the unit's moments (n rows, p features).
    metrics : metric names (None: all).
    precision : dtype of the products that built ``m`` (the accumulator's ``gemm_dtype``):
        it sets the rank cut. float32 (the default) is the safe choice when unknown.
    data_dtype : the activations' storage dtype (float32, or float16 for such stores).
    svcca_threshold : fraction of variance SVCCA keeps, in (0, 1].
    eig_floor : an explicit relative cut (``compute.eig_floor``) replacing the
        precision-derived one: eigenvalues <= eig_floor * lambda_max are dropped.
    cut : an explicit absolute cut (a unit derived from another keeps its noise level).
    name : the unit's name in errors and warnings, e.g. "model_a/layer3".

    Raises
    ------
    InputError
        Non-finite moments; zero variance (below the rounding of the stored values: every
        metric is 0/0 there) or no direction above the rank cut; fewer than 2 rows (4 for
        debiased CKA); debiased CKA without fourth-order moments; bad parameters.

    Warns
    -----
    FewRowsWarning
        When p >= n and a whitening metric is asked: Cxx is singular, the cut drops its null
        space and the canonical correlations of the remaining directions tend to 1.

    Notes
    -----
    Cost O(p^3) (one eigh, two p x r scalings) when a metric whitens, else O(p^2); memory
    a few p x p matrices while it runs, two p x r kept.
    """
    metrics = check_metrics(metrics)
    precision = np.dtype(precision).name
    if not 0.0 < svcca_threshold <= 1.0:
        raise InputError(f"svcca_threshold must be in (0, 1], got {svcca_threshold}")
    n, p = m.n, m.cxx.shape[0]
    if n < 2:
        raise InputError(f"unit {name!r} has {n} rows; similarity needs at least 2")
    check_finite(m.cxx, f"unit {name!r}: its second moments")
    trace = float(np.trace(m.cxx))
    if zero_variance(trace, n, m.mean, data_dtype):
        raise InputError(
            f"unit {name!r} has zero variance (all {p} features constant over {n} rows): "
            f"{', '.join(metrics)} undefined; drop the unit or check the activations"
        )
    whiten = any(METRICS[k].needs_whitening for k in metrics)
    if whiten and p >= n:
        warnings.warn(
            f"unit {name!r} has {p} features but only {n} rows: CCA-family metrics are "
            "degenerate (canonical correlations near 1); use more rows or SVCCA/CKA",
            FewRowsWarning,
            stacklevel=2,
        )
    fields: dict = {}
    if whiten:
        evals, evecs = spectrum(m.cxx)
        decision = decide_rank(evals, gemm_dtype=precision,
                               sum_squares=trace + n * float(m.mean @ m.mean),
                               variances=np.diagonal(m.cxx), data_dtype=data_dtype,
                               eig_floor=eig_floor, cut=cut)
        r = decision.rank
        if r == 0:
            raise InputError(
                f"unit {name!r} has no direction above the precision of its statistics "
                f"({precision}): its variance is rounding noise; drop the unit or check "
                "the activations"
            )
        kept = evals[:r]
        fields.update(evals=np.maximum(evals, 0.0), rank=r, cut=decision.cut,
                      ambiguous=decision.ambiguous,
                      basis=np.ascontiguousarray(evecs[:, :r] / np.sqrt(kept)))
        if "pwcca" in metrics:
            fields["root"] = np.ascontiguousarray(evecs[:, :r] * np.sqrt(kept))
        if "svcca" in metrics:
            fields["svcca_dims"] = svcca_dims(kept, svcca_threshold, r, trace)
    fro = float(np.linalg.norm(m.cxx))
    if "linear_cka_debiased" in metrics:
        if m.sum_a2 is None:
            raise InputError(
                f"unit {name!r}: linear_cka_debiased needs fourth-order moments; accumulate "
                "with block_moments(..., fourth=True)"
            )
        if n < 4:
            raise InputError(f"unit {name!r} has {n} rows; linear_cka_debiased needs >= 4")
        hsic = debiased_hsic(fro**2, m.sum_a2, trace, trace, n)
        check_finite(hsic, f"unit {name!r}: its debiased self-HSIC")
        if hsic <= 0:
            raise InputError(f"unit {name!r}: its debiased self-HSIC is {hsic:.3g}, not "
                             "positive: linear_cka_debiased is undefined (too few rows, or "
                             "a few rows with extreme values dominate the unit)")
        fields["self_hsic"] = float(np.sqrt(hsic))
    return UnitCache(name, n, p, metrics, precision, trace, fro, **fields)
