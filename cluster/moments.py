"""Centered moments of column groups and their exact merges (the functional half).

Every metric is a function of centered second moments (and, for debiased CKA, a few
fourth-order sums). :mod:`repscope.cluster.accumulate` streams row blocks into them in place;
here are the immutable results and the pairwise update of Chan, Golub & LeVeque (1979) that
merges the moments of two row ranges, exact and associative: any split of the rows, merged in
any order, gives the one-shot statistics up to rounding.

A *group* is several units' columns side by side, ``Z = [X1 .. Xk]`` with unit widths
``(w1, .., wk)``. A *tile* is a pair of groups (a, b); ``a == b`` is a diagonal tile. One GEMM
per row block of a tile gives every cross block of its units ("read once, compute many").

Notation (per tile, rows i = 1..n):
    za_i, zb_i       rows of groups a and b; mean_a, mean_b their means
    za^_i, zb^_i     the rows centered on the current means
    a_iu = ||x^_iu||^2   squared norm of unit u's part of za^_i (b_iv likewise for group b)

References
----------
Chan, Golub & LeVeque (1979), "Updating formulae and a pairwise algorithm for computing sample
variances". Song et al. (2012), "Feature selection via dependence maximization" (unbiased HSIC).
Kornblith et al. (2019), "Similarity of neural network representations revisited".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from repscope.cluster.linalg import unit_slice, unit_sums, zeros
from repscope.errors import InputError

__all__ = [
    "CrossMoments",
    "UnitMoments",
    "PairMoments",
    "empty_moments",
    "merge",
    "merge_all",
    "unit_moments",
    "pair_moments",
]


@dataclass(frozen=True)
class CrossMoments:
    """Centered moments of two column groups over ``n`` rows (all float64).

    Attributes
    ----------
    n : int, number of rows.
    mean_a : ndarray of shape (d_a,); mean_b : ndarray of shape (d_b,)
    c : ndarray of shape (d_a, d_b), ``sum_i za^_i zb^_i^T``.
    widths_a, widths_b : unit widths inside each group (sums d_a, d_b).
    s : ndarray of shape (k_a, k_b) or None, ``sum_i a_iu b_iv``.
    p : ndarray of shape (d_a, k_b) or None, ``sum_i b_iv za^_i``.
    q : ndarray of shape (d_b, k_a) or None, ``sum_i a_iu zb^_i``.
    ta : ndarray of shape (k_a,) or None, ``sum_i a_iu`` (the trace of unit u's own Cxx, which an
        off-diagonal tile does not contain but needs when its mean shifts).
    tb : ndarray of shape (k_b,) or None, ``sum_i b_iv``.
    diagonal : True when group b is group a (then mean_b, tb, q repeat mean_a, ta, p).

    The fourth-order fields (s, p, q, ta, tb) are None unless requested with ``fourth=True``;
    they are what the debiased CKA estimator needs beyond ``c``.
    """

    n: int
    mean_a: np.ndarray
    mean_b: np.ndarray
    c: np.ndarray
    widths_a: tuple[int, ...]
    widths_b: tuple[int, ...]
    s: np.ndarray | None = None
    p: np.ndarray | None = None
    q: np.ndarray | None = None
    ta: np.ndarray | None = None
    tb: np.ndarray | None = None
    diagonal: bool = False

    @property
    def fourth(self) -> bool:
        """Whether the fourth-order terms (debiased CKA) are carried."""
        return self.s is not None


@dataclass(frozen=True)
class UnitMoments:
    """Moments of one unit X of shape (n, p), read from a diagonal tile.

    Attributes
    ----------
    n : int
    mean : ndarray of shape (p,)
    cxx : ndarray of shape (p, p), centered ``X^T X``.
    sum_a2 : ``sum_i ||x^_i||^4`` (debiased CKA), or None when not accumulated.
    """

    n: int
    mean: np.ndarray
    cxx: np.ndarray
    sum_a2: float | None = None


@dataclass(frozen=True)
class PairMoments:
    """Cross moments of units X (n, p) and Y (n, q).

    Attributes
    ----------
    cxy : ndarray of shape (p, q), centered ``X^T Y``.
    sum_ab : ``sum_i ||x^_i||^2 ||y^_i||^2`` (debiased CKA), or None when not accumulated.
    """

    cxy: np.ndarray
    sum_ab: float | None = None

    def swapped(self) -> PairMoments:
        """The moments of (Y, X)."""
        return PairMoments(self.cxy.T, self.sum_ab)


def empty_moments(
    widths_a: Sequence[int],
    widths_b: Sequence[int] | None = None,
    *,
    fourth: bool = False,
) -> CrossMoments:
    """The moments of zero rows: the identity of :func:`merge`."""
    diagonal = widths_b is None
    wa = tuple(int(w) for w in widths_a)
    wb = wa if diagonal else tuple(int(w) for w in widths_b)
    da, db, ka, kb = sum(wa), sum(wb), len(wa), len(wb)
    extra = {}
    if fourth:
        extra = dict(
            s=np.zeros((ka, kb)), p=np.zeros((da, kb)), q=np.zeros((db, ka)),
            ta=np.zeros(ka), tb=np.zeros(kb),
        )
    return CrossMoments(0, np.zeros(da), np.zeros(db), zeros((da, db)), wa, wb,
                        diagonal=diagonal, **extra)


def _shift_fourth(
    m: CrossMoments, d: np.ndarray, e: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fourth-order terms of ``m`` re-centered on means shifted by -d (group a), -e (group b).

    With rows x~ = x^ + d and y~ = y^ + e (sum_i x^_i = 0, sum_i y^_i = 0), per unit pair (u, v):
        a~ = a + 2 d.x^ + |d|^2
        S~ = S + 2 e.Q + |e|^2 Ta + 2 d.P + 4 d^T C e + |d|^2 Tb + n |d|^2 |e|^2
        P~ = P + 2 C e + Tb d + n |e|^2 d
        Q~ = Q + 2 C^T d + Ta e + n |d|^2 e
        Ta~ = Ta + n |d|^2
    where d, e, C are restricted to unit u's and unit v's columns. All O(d_a d_b).
    """
    wa, wb, n = m.widths_a, m.widths_b, m.n
    d2 = unit_sums(d * d, wa, axis=0)  # |d_u|^2, (k_a,)
    e2 = unit_sums(e * e, wb, axis=0)  # |e_v|^2, (k_b,)
    c_e = unit_sums(m.c * e, wb, axis=1)  # C[:, v] e_v, (d_a, k_b)
    ct_d = unit_sums(m.c.T * d, wa, axis=1)  # C[u, :]^T d_u, (d_b, k_a)
    d_c_e = unit_sums(d[:, None] * c_e, wa, axis=0)  # d_u^T C[u, v] e_v, (k_a, k_b)
    d_p = unit_sums(d[:, None] * m.p, wa, axis=0)  # d_u . P[u, v], (k_a, k_b)
    e_q = unit_sums(e[:, None] * m.q, wb, axis=0)  # e_v . Q[v, u], (k_b, k_a)
    s = (
        m.s + 2 * e_q.T + np.outer(m.ta, e2) + 2 * d_p + 4 * d_c_e
        + np.outer(d2, m.tb) + n * np.outer(d2, e2)
    )
    p = m.p + 2 * c_e + np.outer(d, m.tb) + n * np.outer(d, e2)
    q = m.q + 2 * ct_d + np.outer(e, m.ta) + n * np.outer(e, d2)
    ta = m.ta + n * d2
    tb = m.tb + n * e2
    return s, p, q, ta, tb


def merge(x: CrossMoments, y: CrossMoments, *, overwrite_x: bool = False) -> CrossMoments:
    """Moments of the union of the rows of ``x`` and ``y`` (Chan, Golub & LeVeque 1979).

    ``n = nx + ny``, ``delta = mean_y - mean_x``, ``mean = mean_x + delta ny / n`` and
    ``C = Cx + Cy + (nx ny / n) delta_a delta_b^T``. The fourth-order terms of each part are
    re-centered on the merged means and added. Exact and associative up to rounding; O(d_a d_b).
    ``overwrite_x``: C is built in x's array (x is then spent), else in one new array.
    """
    if (x.widths_a, x.widths_b, x.diagonal, x.fourth) != (
        y.widths_a, y.widths_b, y.diagonal, y.fourth
    ):
        raise InputError(
            "cannot merge moments of different tiles: widths "
            f"{x.widths_a}x{x.widths_b} vs {y.widths_a}x{y.widths_b}, diagonal "
            f"{x.diagonal} vs {y.diagonal}, fourth {x.fourth} vs {y.fourth}"
        )
    if y.n == 0:
        return x
    if x.n == 0:
        return y
    n = x.n + y.n
    delta_a = y.mean_a - x.mean_a
    delta_b = y.mean_b - x.mean_b
    mean_a = x.mean_a + delta_a * (y.n / n)
    mean_b = mean_a if x.diagonal else x.mean_b + delta_b * (y.n / n)
    if x.fourth:  # before x.c may be overwritten: the shifts read it
        # Shift of each part's mean relative to the merged mean: d = mean_part - mean.
        fx = _shift_fourth(x, x.mean_a - mean_a, x.mean_b - mean_b)
        fy = _shift_fourth(y, y.mean_a - mean_a, y.mean_b - mean_b)
    c = np.add(x.c, y.c, out=x.c if overwrite_x else None)
    _add_outer(c, x.n * y.n / n, delta_a, delta_b)
    if not x.fourth:
        return CrossMoments(n, mean_a, mean_b, c, x.widths_a, x.widths_b, diagonal=x.diagonal)
    s, p, q, ta, tb = (u + v for u, v in zip(fx, fy, strict=True))
    return CrossMoments(n, mean_a, mean_b, c, x.widths_a, x.widths_b, s, p, q, ta, tb,
                        x.diagonal)


# Columns per step of the in-place outer product: a temporary of d_a x 256, not d_a x d_b
# (fresh memory costs more than the arithmetic on it: docs/performance.md).
_OUTER_STEP = 256


def _add_outer(c: np.ndarray, k: float, u: np.ndarray, v: np.ndarray) -> None:
    """``c += k u v^T`` in place, a block of columns at a time."""
    for j in range(0, c.shape[1], _OUTER_STEP):
        cols = slice(j, j + _OUTER_STEP)
        c[:, cols] += np.outer(k * u, v[cols])


def merge_all(parts: Sequence[CrossMoments]) -> CrossMoments:
    """Merge many partial moments in a balanced pairwise tree (log depth, stable). The parts
    are left as they were; the merges above the first level reuse the first level's arrays."""
    parts = list(parts)
    if not parts:
        raise InputError("merge_all needs at least one partial moments object")
    mine = [False] * len(parts)  # whether a part is this function's own (overwritable) result
    while len(parts) > 1:
        merged, flags = [], []
        for i in range(0, len(parts) - 1, 2):
            x, y = parts[i], parts[i + 1]
            m = merge(x, y, overwrite_x=mine[i])
            merged.append(m)
            flags.append(m is not y and (m is not x or mine[i]))
        if len(parts) % 2:
            merged.append(parts[-1])
            flags.append(mine[-1])
        parts, mine = merged, flags
    return parts[0]


def _check_unit(widths: tuple[int, ...], u: int, side: str) -> int:
    if not 0 <= u < len(widths):
        raise InputError(f"unit index {u} out of range for group {side} of {len(widths)} units")
    return u


def unit_moments(tile: CrossMoments, u: int) -> UnitMoments:
    """The moments of unit ``u`` of a diagonal tile."""
    if not tile.diagonal:
        raise InputError(
            "unit moments come from a diagonal tile: use block_moments(z) with zb=None"
        )
    _check_unit(tile.widths_a, u, "a")
    cols = unit_slice(tile.widths_a, u)
    sum_a2 = float(tile.s[u, u]) if tile.fourth else None
    return UnitMoments(tile.n, tile.mean_a[cols], tile.c[cols, cols], sum_a2)


def pair_moments(tile: CrossMoments, u: int, v: int) -> PairMoments:
    """The cross moments of unit ``u`` of group a and unit ``v`` of group b."""
    _check_unit(tile.widths_a, u, "a")
    _check_unit(tile.widths_b, v, "b")
    rows, cols = unit_slice(tile.widths_a, u), unit_slice(tile.widths_b, v)
    sum_ab = float(tile.s[u, v]) if tile.fourth else None
    return PairMoments(tile.c[rows, cols], sum_ab)
