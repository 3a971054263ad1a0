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
  directions with ``lam <= EIG_FLOOR * lam_max`` (rounding noise of dead or collinear
  features) get d = 0 instead of the clip's large d: netrep would amplify their noise.
- Unequal widths: each side is whitened at its own width. netrep zero-pads the narrower side
  first; the padded columns are null directions that add nothing to Xw and change only the
  global factor c, which the angle cancels, so the values are the same (tests check this).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repscope.cluster.caches import EIG_FLOOR
from repscope.cluster.linalg import sorted_eigh
from repscope.cluster.moments import UnitMoments
from repscope.errors import InputError

__all__ = ["NETREP_EIG_TOL", "ShapeCache", "prepare_shape", "shape_angular"]

#: netrep's ``whiten(eigval_tol=1e-7)``: eigenvalues of X^T X are clipped to it (absolute).
NETREP_EIG_TOL = 1e-7


@dataclass(frozen=True)
class ShapeCache:
    """Per-unit work of the shape metric.

    z : ndarray (p, p), the partial whitening matrix (symmetric); norm : ||Xc Z||_F.
    """

    name: str
    dim: int
    alpha: float
    z: np.ndarray
    norm: float


def prepare_shape(m: UnitMoments, alpha: float, *, eig_floor: float = EIG_FLOOR,
                  name: str = "unit") -> ShapeCache:
    """The unit's partial whitening (netrep's ``whiten`` on the centered moments).

    Parameters
    ----------
    m : the unit's moments (Cxx = Xc^T Xc, p x p).
    alpha : 1 is Procrustes (rotations only), 0 full whitening (CCA-like), in [0, 1].

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
    if alpha > 1.0 - NETREP_EIG_TOL:  # netrep returns the data unwhitened
        return ShapeCache(name, p, alpha, np.eye(p), float(np.sqrt(total)))
    evals, evecs = sorted_eigh(cxx)
    lam = np.maximum(evals, NETREP_EIG_TOL)
    d = alpha + (1.0 - alpha) / np.sqrt(lam)
    new_var = np.sum(alpha**2 * lam + 2 * alpha * (1 - alpha) * np.sqrt(lam) + (1 - alpha) ** 2)
    d *= np.sqrt(lam.sum() / new_var)
    d[evals <= eig_floor * evals[0]] = 0.0
    z = (evecs * d) @ evecs.T
    # ||Xc Z||_F^2 = tr(Z Cxx Z) = sum_i lam_i d_i^2 with the true (unclipped) eigenvalues.
    norm = float(np.sqrt(np.sum(np.clip(evals, 0.0, None) * d * d)))
    return ShapeCache(name, p, alpha, z, norm)


def shape_angular(cx: ShapeCache, cy: ShapeCache, cxy: np.ndarray) -> float:
    """The angular shape distance in [0, pi/2] from the caches and Cxy = Xc^T Yc (p x q).

    Cost: two products (p^2 q + p q^2) and the singular values of a p x q matrix.
    """
    if cxy.shape != (cx.dim, cy.dim):
        raise InputError(f"cross moments of shape {cxy.shape} do not match units "
                         f"{cx.name!r} ({cx.dim}) and {cy.name!r} ({cy.dim})")
    nuclear = np.linalg.svd(cx.z @ cxy @ cy.z, compute_uv=False).sum()
    return float(np.arccos(np.clip(nuclear / (cx.norm * cy.norm), -1.0, 1.0)))
