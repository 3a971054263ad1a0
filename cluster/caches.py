"""Per-unit work, done once per unit and reused for every pair that contains it.

The work that belongs to a unit (traces, ``||Cxx||_F``, the eigendecomposition,
``Cxx^(-1/2)``, the SVCCA basis, the debiased self-HSIC) is done once by :func:`prepare_unit`
(netrep's per-network precompute); :mod:`repscope.cluster.pairs` does the per-pair work.
Conventions follow the authors' code (docs/metrics.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from repscope.cluster.linalg import inverse_sqrt, sorted_eigh
from repscope.cluster.moments import UnitMoments
from repscope.cluster.registry import CCA_FAMILY, METRICS, FewRowsWarning, check_metrics
from repscope.errors import InputError

__all__ = [
    "EIG_FLOOR",
    "UnitCache",
    "prepare_unit",
    "whitening_matrix",
    "whitened_root",
    "svcca_basis",
    "debiased_hsic",
]

#: Eigenvalues of Cxx at or below ``EIG_FLOOR * max eigenvalue`` count as zero: their inverse
#: square root is 0 (dead and collinear directions carry no canonical correlation). float64
#: rounding leaves true zeros near 1e-16 * max, well below; real directions of the reference
#: activations are above 1e-7 * max.
EIG_FLOOR = 1e-10

def whitening_matrix(evals: np.ndarray, evecs: np.ndarray, floor: float) -> np.ndarray:
    """``Cxx^(-1/2)`` by eigh, floored eigenvalues mapped to 0: ndarray of shape (p, p)."""
    return (evecs * inverse_sqrt(evals, floor)) @ evecs.T


def whitened_root(evals: np.ndarray, evecs: np.ndarray, floor: float) -> np.ndarray:
    """``Cxx Cxx^(-1/2)`` (= Cxx^(1/2) on the kept directions): ndarray of shape (p, p).

    Row j of ``Cxx Wx u_i`` is ``<x_j, h_i>``, the covariance of feature j with canonical
    variate h_i = X Wx u_i: what PWCCA weights by (Morcos et al. 2018).
    """
    return (evecs * (evals * inverse_sqrt(evals, floor))) @ evecs.T


def svcca_basis(
    evals: np.ndarray, evecs: np.ndarray, threshold: float, floor: float
) -> np.ndarray:
    """Whitened top principal directions ``U_k diag(lambda_k)^(-1/2)``: shape (p, k).

    k is the fewest eigendirections whose eigenvalues (variances) sum to at least
    ``threshold`` of the total (Raghu et al. 2017, as in the reference values). In that basis
    Cxx_k = diag(lambda_k), so CCA there needs no further whitening.
    """
    fraction = np.cumsum(evals) / evals.sum()
    k = int(np.searchsorted(fraction, threshold)) + 1
    k = min(k, int(np.count_nonzero(inverse_sqrt(evals, floor))))
    return evecs[:, :k] * inverse_sqrt(evals[:k], floor)


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


@dataclass(frozen=True)
class UnitCache:
    """Per-unit work, done once and reused for every pair containing the unit.

    Attributes
    ----------
    name : the unit's name, for messages.
    n : rows; dim : features p.
    metrics : the metric names this cache was prepared for.
    trace : tr Cxx. fro : ||Cxx||_F.
    evals : ndarray of shape (p,), descending; evecs : ndarray of shape (p, p). Both None when
        no metric needs them (CKA and Procrustes only: no O(p^3) work per unit).
    whitening : ndarray of shape (p, p), Cxx^(-1/2) with the floor (CCA family), else None.
    root : ndarray of shape (p, p), Cxx Cxx^(-1/2) (PWCCA weights), else None.
    svcca : ndarray of shape (p, k), whitened top-k principal directions, else None.
    self_hsic : sqrt of the debiased self-HSIC (debiased CKA's normaliser), else None.
    """

    name: str
    n: int
    dim: int
    metrics: tuple[str, ...]
    trace: float
    fro: float
    evals: np.ndarray | None
    evecs: np.ndarray | None
    whitening: np.ndarray | None = None
    root: np.ndarray | None = None
    svcca: np.ndarray | None = None
    self_hsic: float | None = None

    @property
    def svcca_dims(self) -> int | None:
        """Principal directions kept by SVCCA (None unless prepared for it)."""
        return None if self.svcca is None else self.svcca.shape[1]


def _is_constant(m: UnitMoments) -> bool:
    """Zero variance: every feature constant, up to rounding of its mean."""
    trace = float(np.trace(m.cxx))
    scale = float(np.max(np.abs(m.mean), initial=0.0))
    return trace <= m.n * m.cxx.shape[0] * (1e-12 * scale) ** 2


def prepare_unit(
    m: UnitMoments,
    metrics: Iterable[str] | None = None,
    *,
    svcca_threshold: float = 0.99,
    eig_floor: float = EIG_FLOOR,
    name: str = "unit",
) -> UnitCache:
    """Per-unit work for ``metrics``: one eigendecomposition of Cxx, cached matrices.

    Parameters
    ----------
    m : the unit's moments (n rows, p features).
    metrics : metric names (None: all).
    svcca_threshold : fraction of variance SVCCA keeps, in (0, 1].
    eig_floor : relative eigenvalue floor of the whitening (see :data:`EIG_FLOOR`).
    name : the unit's name in errors and warnings, e.g. "model_a/layer3".

    Raises
    ------
    InputError
        Zero-variance unit (every metric is 0/0 there, and CCA undefined); fewer than 2 rows
        (4 for debiased CKA); debiased CKA without fourth-order moments; bad parameters.

    Warns
    -----
    FewRowsWarning
        When p >= n and a CCA-family metric is asked: Cxx is singular, the floor drops its null
        space and the canonical correlations of the remaining directions tend to 1.

    Notes
    -----
    Cost O(p^3) (eigh, two p x p products); memory a few p x p matrices.
    """
    metrics = check_metrics(metrics)
    if not 0.0 < svcca_threshold <= 1.0:
        raise InputError(f"svcca_threshold must be in (0, 1], got {svcca_threshold}")
    if not 0.0 <= eig_floor < 1.0:
        raise InputError(f"eig_floor must be in [0, 1), got {eig_floor}")
    n, p = m.n, m.cxx.shape[0]
    if n < 2:
        raise InputError(f"unit {name!r} has {n} rows; similarity needs at least 2")
    if _is_constant(m):
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
    evals = evecs = None
    if whiten:
        evals, evecs = sorted_eigh(m.cxx)
    trace = float(np.trace(m.cxx))
    fields: dict = {}
    if any(k in CCA_FAMILY for k in metrics):
        fields["whitening"] = whitening_matrix(evals, evecs, eig_floor)
    if "pwcca" in metrics:
        fields["root"] = whitened_root(evals, evecs, eig_floor)
    if "svcca" in metrics:
        fields["svcca"] = svcca_basis(evals, evecs, svcca_threshold, eig_floor)
    fro = float(np.linalg.norm(m.cxx))
    if "linear_cka_debiased" in metrics:
        if m.sum_a2 is None:
            raise InputError(
                f"unit {name!r}: linear_cka_debiased needs fourth-order moments; accumulate "
                "with block_moments(..., fourth=True)"
            )
        if n < 4:
            raise InputError(f"unit {name!r} has {n} rows; linear_cka_debiased needs >= 4")
        fields["self_hsic"] = float(np.sqrt(debiased_hsic(fro**2, m.sum_a2, trace, trace, n)))
    return UnitCache(name, n, p, metrics, trace, fro, evals, evecs, **fields)
