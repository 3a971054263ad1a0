"""Generalized shape metrics (Williams et al. 2021) from feature-space moments.

``shape_angular`` is netrep's ``LinearMetric(alpha, center_columns=True,
score_method="angular")``: each side is centered and partially whitened,

    Z = V diag(d) V^T,  d = c (alpha + (1 - alpha) lam^(-1/2)),  lam = eig(Xc^T Xc) clipped at 1e-7,

with c chosen so that ``||Xc Z||_F^2 = tr(Xc^T Xc)`` (netrep's ``preserve_variance``), then
aligned by the best rotation; the distance is the angle

    arccos( ||Zx^T Cxy Zy||_* / (||Xc Zx||_F ||Yc Zy||_F) )  in [0, pi/2],

since ``max_Q <Xw Q, Yw> = ||Xw^T Yw||_*`` and ``||Xw Q||_F = ||Xw||_F``. Everything comes from
the centered moments Cxx = Xc^T Xc, Cyy and Cxy, so it streams like the other linear metrics:
:func:`prepare_shape` once per unit (one eigh, O(p^3)), :func:`shape_angular` per pair.

Conventions (docs/metrics.md):

- netrep's clip ``lam >= 1e-7`` is absolute, on the unnormalised X^T X, as there. In addition,
  directions below the unit's rank cut (rounding noise of dead or collinear features at the
  precision of the statistics, :mod:`repscope.cluster.rank`, the same rule as the CCA family)
  get d = 0 instead of the clip's large d: netrep would amplify their noise.
- Unequal widths: each side is whitened at its own width. netrep zero-pads the narrower side
  first; the padded columns are null directions that add nothing to Xw and change only the
  global factor c, which the angle cancels, so the values are the same (tests check this).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repscope.cluster.moments import UnitMoments
from repscope.cluster.rank import decide_rank, spectrum
from repscope.errors import InputError

__all__ = ["NETREP_EIG_TOL", "ShapeCache", "prepare_shape", "shape_angular"]

#: netrep's ``whiten(eigval_tol=1e-7)``: eigenvalues of X^T X are clipped to it (absolute).
NETREP_EIG_TOL = 1e-7


@dataclass(frozen=True)
class ShapeCache:
    """Per-unit work of the shape metric.

    z : ndarray (p, p), the partial whitening matrix (symmetric); norm : ||Xc Z||_F.
    rank, ambiguous, precision : the unit's rank decision and the products' dtype, as
    :class:`~repscope.cluster.caches.UnitCache`'s (rank None when alpha = 1: nothing whitens).
    """

    name: str
    dim: int
    alpha: float
    z: np.ndarray
    norm: float
    rank: int | None = None
    ambiguous: str | None = None
    precision: str = "float32"


def prepare_shape(m: UnitMoments, alpha: float, *, precision="float32",
                  data_dtype="float32", eig_floor: float | None = None,
                  name: str = "unit") -> ShapeCache:
    """The unit's partial whitening (netrep's ``whiten`` on the centered moments).

    Parameters
    ----------
    m : the unit's moments (Cxx = Xc^T Xc, p x p).
    alpha : 1 is Procrustes (rotations only), 0 full whitening (CCA-like), in [0, 1].
    precision, data_dtype, eig_floor : the rank decision's inputs, as
        :func:`~repscope.cluster.caches.prepare_unit`'s.

    Raises
    ------
    InputError
        For a zero-variance unit (the angle is 0/0) or alpha outside [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"shape_angular alpha must be in [0, 1], got {alpha}")
    cxx = m.cxx
    p = cxx.shape[0]
    total = float(np.trace(cxx))
    if not total > 0:
        raise InputError(f"unit {name!r} has zero variance: shape_angular undefined")
    precision = np.dtype(precision).name
    if alpha > 1.0 - NETREP_EIG_TOL:  # netrep returns the data unwhitened
        return ShapeCache(name, p, alpha, np.eye(p), float(np.sqrt(total)),
                          precision=precision)
    raw, evecs = spectrum(cxx)
    decision = decide_rank(raw, gemm_dtype=precision,
                           sum_squares=total + m.n * float(m.mean @ m.mean),
                           variances=np.diagonal(cxx), data_dtype=data_dtype,
                           eig_floor=eig_floor)
    evals = np.maximum(raw, 0.0)
    lam = np.maximum(evals, NETREP_EIG_TOL)
    d = alpha + (1.0 - alpha) / np.sqrt(lam)
    new_var = np.sum(alpha**2 * lam + 2 * alpha * (1 - alpha) * np.sqrt(lam) + (1 - alpha) ** 2)
    d *= np.sqrt(lam.sum() / new_var)
    d[decision.rank:] = 0.0
    z = (evecs * d) @ evecs.T
    # ||Xc Z||_F^2 = tr(Z Cxx Z) = sum_i lam_i d_i^2 with the true (unclipped) eigenvalues.
    norm = float(np.sqrt(np.sum(evals * d * d)))
    return ShapeCache(name, p, alpha, z, norm, decision.rank, decision.ambiguous, precision)


def shape_angular(cx: ShapeCache, cy: ShapeCache, cxy: np.ndarray) -> float:
    """The angular shape distance in [0, pi/2] from the caches and Cxy = Xc^T Yc (p x q).

    Cost: two products (p^2 q + p q^2) and the singular values of a p x q matrix.
    """
    if cxy.shape != (cx.dim, cy.dim):
        raise InputError(f"cross moments of shape {cxy.shape} do not match units "
                         f"{cx.name!r} ({cx.dim}) and {cy.name!r} ({cy.dim})")
    nuclear = np.linalg.svd(cx.z @ cxy @ cy.z, compute_uv=False).sum()
    return float(np.arccos(np.clip(nuclear / (cx.norm * cy.norm), -1.0, 1.0)))
