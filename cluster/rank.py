"""Which eigenvalues of a unit's second moments are signal: the rank cut, its ambiguity test,
and zero variance. One rule for both spaces (docs/metrics.md, "The rank of a unit").

A unit's centered second moments C (feature space: Cxx, p x p; sample space: the centered
Gram K, n x n, whose nonzero eigenvalues are Cxx's) are known only up to the rounding of the
products that built them. Rounding turns a true zero eigenvalue (a dead feature, a repeated
direction, a layer whose rank is below its width, a null space when n < d) into noise of
either sign. Whitening such a direction as if it were signal gives it a canonical
correlation it does not have, so every metric that whitens (the CCA family, SVCCA, the
PC-deletion probes) keeps only the eigenvalues above a *cut* that knows the precision:

    cut = max(GEMM_FACTOR * eps_gemm * lambda_max + eps_data^2 * ||X||_F^2,
              NEGATIVE_FACTOR * nu)

- ``eps_gemm * lambda_max``: the products' own rounding. Measured on null spaces of every
  kind (dead, duplicated, low-rank linear, ReLU, heavy-tailed, power-law, n < d, widths 4 to
  60,000, 1,000 to 400,000 rows in one product, both spaces) the noise eigenvalues of a
  float32 product stay below 5.5 * eps32 * lambda_max; they do not grow with the rows, because
  BLAS sums each entry in short register chunks and the blocks are added in float64 (which
  averages their errors down). GEMM_FACTOR = 32 leaves a factor 6 over the worst case.
- ``eps_data^2 * ||X||_F^2`` with ``||X||_F^2 = tr C + n |mean|^2``: the activations' own
  rounding (float32 storage, or coarser). A direction whose variance is below what rounding
  every stored value by eps_data could produce (|dX v|^2 <= eps_data^2 ||X||_F^2) is not
  resolved by the data itself, however exact the products. It matters for float64 products
  only (float32: 1e-14 of ||X||^2, far below the first term unless means exceed ~1e3 std).
- ``nu``, the largest negative eigenvalue magnitude before clipping: the noise measured on
  this unit. Rounding noise has both signs, so with a null space of more than a few
  dimensions nu is about the largest noise eigenvalue (measured 1-4x); the cut never drops
  below 4 nu, which covers a BLAS whose rounding is worse than the one measured here.

A unit's spectrum is *ambiguous* when the cut cannot separate signal from noise: an
eigenvalue lies within a factor BAND of the cut on either side (no clear gap), or a feature
has a positive variance no larger than BAND * cut (a nearly dead feature: it is a real
direction the cut would drop). Float32 statistics of such a unit must be recomputed in
float64 (or the unit refused); the docs say how the pipeline does it.

Zero variance (every metric undefined) uses the same precision: the unit's total variance
``tr C`` is no larger than the data's rounding of its means, ``eps_data^2 n |mean|^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repscope.errors import InputError

__all__ = [
    "RANK_RULE",
    "AmbiguousRankError",
    "GEMM_FACTOR",
    "NEGATIVE_FACTOR",
    "BAND",
    "Rank",
    "gemm_eps",
    "data_eps",
    "rounding_floor",
    "zero_variance",
    "spectrum",
    "decide_rank",
    "ambiguous_rank",
]

#: The rule in one line, recorded with every result (``rank_rule``).
RANK_RULE = ("eigenvalues of each unit's centered second moments at or below max(32 eps_gemm "
             "lambda_max + eps_data^2 ||X||_F^2, 4 x the largest negative eigenvalue) are "
             "rounding noise and dropped by every metric that whitens (docs/metrics.md)")

#: Multiple of eps_gemm * lambda_max below which an eigenvalue is rounding noise.
GEMM_FACTOR = 32.0
#: The cut is at least this multiple of the largest negative eigenvalue's magnitude.
NEGATIVE_FACTOR = 4.0
#: An eigenvalue (or a feature's variance) within this factor of the cut is ambiguous.
BAND = 4.0


class AmbiguousRankError(InputError):
    """Float32 statistics cannot decide a unit's rank (``compute.ambiguous_rank: refuse``)."""


@dataclass(frozen=True)
class Rank:
    """A unit's rank decision.

    Attributes
    ----------
    rank : eigenvalues kept (above ``cut``); the unit's effective rank.
    cut : the absolute cut, in the units of the eigenvalues (sums of squares).
    ambiguous : why the cut cannot separate signal from noise for this unit, or None.
    """

    rank: int
    cut: float
    ambiguous: str | None = None


def gemm_eps(dtype) -> float:
    """Machine epsilon of the products' dtype (float32: 1.2e-7, float64: 2.2e-16)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InputError(f"precision must be float32 or float64, got {dtype}")
    return float(np.finfo(dtype).eps)


def data_eps(dtype=np.float32) -> float:
    """Precision of the stored activations: their dtype's epsilon, and never finer than
    float32's (activations are computed in float32 or coarser; a float64 copy does not
    make them more precise)."""
    dtype = np.dtype(dtype)
    eps = float(np.finfo(dtype).eps) if dtype.kind == "f" else 0.0
    return max(eps, float(np.finfo(np.float32).eps))


def rounding_floor(sum_squares: float, data_dtype=np.float32) -> float:
    """``eps_data^2 * ||X||_F^2``: the variance the data's own rounding can produce in any
    direction. ``sum_squares`` is the uncentered ``||X||_F^2 = tr C + n |mean|^2``."""
    return data_eps(data_dtype) ** 2 * float(sum_squares)


def zero_variance(trace: float, n: int, mean: np.ndarray, data_dtype=np.float32) -> bool:
    """Whether a unit's variance is below the rounding of its stored values: ``tr C <=
    eps_data^2 n |mean|^2`` (a constant unit has tr C = 0; a float64 mean of equal values
    leaves tr C near n (eps64 |mean|)^2, below this)."""
    if not np.isfinite(trace):
        return False
    return trace <= rounding_floor(n * float(np.dot(mean, mean)), data_dtype)


def spectrum(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of a symmetric PSD matrix, eigenvalues descending and *not* clipped.

    Returns evals (m,) and evecs (m, m), column i for evals[i]. Rounding can make the
    smallest ones negative: :func:`decide_rank` reads the noise level from them.
    """
    evals, evecs = np.linalg.eigh(c)
    return evals[::-1].copy(), evecs[:, ::-1]


def decide_rank(
    evals: np.ndarray,
    *,
    gemm_dtype,
    sum_squares: float,
    variances: np.ndarray | None = None,
    data_dtype=np.float32,
    eig_floor: float | None = None,
    cut: float | None = None,
) -> Rank:
    """The rank of a unit from its eigenvalues and the precision of its statistics.

    Parameters
    ----------
    evals : eigenvalues of C (or of the centered Gram), descending, as :func:`spectrum`
        returns them (unclipped).
    gemm_dtype : dtype the products were computed in (float32 or float64).
    sum_squares : ``||X||_F^2 = tr C + n |mean|^2`` (uncentered), for the data's rounding.
    variances : the features' sums of squares (diagonal of Cxx), for the nearly-dead test;
        None skips it.
    data_dtype : the activations' storage dtype (float32 unless coarser).
    eig_floor : an explicit relative floor (``compute.eig_floor``): cut = eig_floor *
        lambda_max, and no ambiguity test (the user chose the cut).
    cut : an explicit absolute cut (a unit derived from another, e.g. by PC deletion, keeps
        the noise level of the statistics it came from); no ambiguity test either.

    Returns
    -------
    Rank(rank, cut, ambiguous).
    """
    evals = np.asarray(evals, dtype=np.float64)
    top = float(evals.max(initial=0.0))
    if cut is not None:
        return Rank(int(np.count_nonzero(evals > cut)), float(cut))
    if eig_floor is not None:
        if not 0.0 <= eig_floor < 1.0:
            raise InputError(f"eig_floor must be in [0, 1), got {eig_floor}")
        cut = eig_floor * top
        return Rank(int(np.count_nonzero(evals > cut)), cut)
    negative = max(0.0, -float(evals.min(initial=0.0)))
    cut = max(GEMM_FACTOR * gemm_eps(gemm_dtype) * top
              + rounding_floor(sum_squares, data_dtype), NEGATIVE_FACTOR * negative)
    return Rank(int(np.count_nonzero(evals > cut)), cut,
                ambiguous_rank(evals, cut, variances))


def ambiguous_rank(evals: np.ndarray, cut: float,
                   variances: np.ndarray | None = None) -> str | None:
    """Why the cut cannot separate signal from noise, or None when it can.

    Ambiguous: an eigenvalue within a factor :data:`BAND` of the cut (``cut / BAND <
    lambda <= BAND * cut``: no clear gap in the spectrum around it), or a feature whose
    variance is positive but at most ``BAND * cut`` (a nearly dead feature, a real direction
    the cut would drop). O(p).
    """
    evals = np.asarray(evals)
    near = evals[(evals > cut / BAND) & (evals <= cut * BAND)]
    if near.size:
        top = float(evals.max())
        return (f"{near.size} eigenvalue(s) within a factor {BAND:g} of the rank cut "
                f"({cut / top:.1e} of the largest): no clear gap between signal and "
                "rounding noise")
    if variances is not None:
        faint = np.flatnonzero((variances > 0) & (variances <= cut * BAND))
        if faint.size:
            return (f"{faint.size} feature(s) with a variance near or below the rank cut "
                    f"(first: feature {int(faint[0])}): nearly constant features the cut "
                    "would drop")
    return None
