"""Streaming centered moments of column groups: block statistics and exact merges.

Every metric in :mod:`cluster.metrics` is a function of centered second moments (and, for
debiased CKA, a few fourth-order sums). They are accumulated over row blocks and merged with
the pairwise update of Chan, Golub & LeVeque (1979), which is exact and associative: any split
of the rows into blocks, merged in any order, gives the one-shot statistics up to rounding.

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

from repscope.cluster.blas import gemm_tn, syrk_upper
from repscope.cluster.linalg import centered_gram, cross_product, unit_slice, unit_sums, zeros
from repscope.errors import InputError

__all__ = [
    "CrossMoments",
    "UnitMoments",
    "PairMoments",
    "block_moments",
    "empty_moments",
    "merge",
    "merge_all",
    "unit_moments",
    "pair_moments",
    "TileAccumulator",
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


def _check_widths(widths: Sequence[int], d: int, side: str) -> tuple[int, ...]:
    widths = tuple(int(w) for w in widths)
    if not widths or min(widths) < 1 or sum(widths) != d:
        raise InputError(
            f"widths_{side}={widths} must be positive unit widths summing to the group's "
            f"{d} columns"
        )
    return widths


def _column_mean(z: np.ndarray, side: str) -> np.ndarray:
    """Float64 column mean; a NaN or Inf anywhere in the block makes it non-finite."""
    mean = z.mean(axis=0, dtype=np.float64)
    if not np.all(np.isfinite(mean)):
        cols = np.flatnonzero(~np.isfinite(mean))[:5].tolist()
        raise InputError(f"group {side} has NaN or Inf values in columns {cols} of this block")
    return mean


def _row_norms(zc: np.ndarray, widths: tuple[int, ...]) -> np.ndarray:
    """a_iu = ||x^_iu||^2: ndarray of shape (n_rows, k). O(n d)."""
    return unit_sums(np.square(zc, dtype=np.float64), widths, axis=1)


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


def block_moments(
    za: np.ndarray,
    zb: np.ndarray | None = None,
    *,
    widths_a: Sequence[int],
    widths_b: Sequence[int] | None = None,
    fourth: bool = False,
    gemm_dtype: type | np.dtype = np.float64,
) -> CrossMoments:
    """Centered moments of one row block of a tile.

    Parameters
    ----------
    za : ndarray of shape (n_rows, d_a), any float dtype
        The block's rows of group a.
    zb : ndarray of shape (n_rows, d_b) or None
        The same rows of group b; None for a diagonal tile (b is a; the symmetric product is
        computed once with BLAS syrk).
    widths_a, widths_b : unit widths of each group; widths_b defaults to widths_a.
    fourth : also accumulate the fourth-order terms of debiased CKA.
    gemm_dtype : dtype of the centered GEMM. float32 roughly doubles the speed; its error on
        linear CKA is about 1e-7 relative (see docs/metrics.md). Results are float64 either way.

    Notes
    -----
    The block is centered on its own float64 mean before the GEMM, so large means never enter
    the product (raw sums in float32 would cancel catastrophically). Cost: one n d_a d_b GEMM
    (half of it for a diagonal tile) plus O(n d) for centering; with ``fourth`` also
    n (d_a k_b + d_b k_a) for ``p``, ``q``. Memory: a centered copy of the block.
    """
    za = np.asarray(za)
    if za.ndim != 2:
        raise InputError(f"group a block must be 2-D (rows, features), got shape {za.shape}")
    diagonal = zb is None
    if diagonal and widths_b is not None and tuple(widths_b) != tuple(widths_a):
        raise InputError("a diagonal tile (zb=None) has widths_b equal to widths_a")
    wa = _check_widths(widths_a, za.shape[1], "a")
    gemm_dtype = np.dtype(gemm_dtype)
    if gemm_dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InputError(f"gemm_dtype must be float32 or float64, got {gemm_dtype}")
    if za.shape[0] == 0:
        return empty_moments(wa, None if diagonal else widths_b, fourth=fourth)
    mean_a = _column_mean(za, "a")
    # Center in float64 (exact mean), then round once to the GEMM dtype.
    za_c = (za - mean_a).astype(gemm_dtype, copy=False)
    if diagonal:
        wb, mean_b, zb_c = wa, mean_a, za_c
        c = centered_gram(za_c)
    else:
        zb = np.asarray(zb)
        if zb.ndim != 2 or zb.shape[0] != za.shape[0]:
            raise InputError(
                f"group b block has shape {zb.shape}; expected 2-D with {za.shape[0]} rows "
                "like group a"
            )
        wb = _check_widths(widths_a if widths_b is None else widths_b, zb.shape[1], "b")
        mean_b = _column_mean(zb, "b")
        zb_c = (zb - mean_b).astype(gemm_dtype, copy=False)
        c = cross_product(za_c, zb_c)
    n = za.shape[0]
    if not fourth:
        return CrossMoments(n, mean_a, mean_b, c, wa, wb, diagonal=diagonal)
    a = _row_norms(za_c, wa)
    b = a if diagonal else _row_norms(zb_c, wb)
    s = a.T @ b
    # p = sum_i b_iv za^_i: an (n x d_a)^T (n x k_b) product, small next to the main GEMM.
    p = cross_product(za_c, b.astype(gemm_dtype))
    q = p if diagonal else cross_product(zb_c, a.astype(gemm_dtype))
    ta = a.sum(axis=0)
    tb = ta if diagonal else b.sum(axis=0)
    return CrossMoments(n, mean_a, mean_b, c, wa, wb, s, p, q, ta, tb, diagonal)


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


def merge(x: CrossMoments, y: CrossMoments) -> CrossMoments:
    """Moments of the union of the rows of ``x`` and ``y`` (Chan, Golub & LeVeque 1979).

    ``n = nx + ny``, ``delta = mean_y - mean_x``, ``mean = mean_x + delta ny / n`` and
    ``C = Cx + Cy + (nx ny / n) delta_a delta_b^T``. The fourth-order terms of each part are
    re-centered on the merged means and added. Exact and associative up to rounding; O(d_a d_b).
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
    c = x.c + y.c + (x.n * y.n / n) * np.outer(delta_a, delta_b)
    if not x.fourth:
        return CrossMoments(n, mean_a, mean_b, c, x.widths_a, x.widths_b, diagonal=x.diagonal)
    # Shift of each part's mean relative to the merged mean: d = mean_part - mean.
    fx = _shift_fourth(x, x.mean_a - mean_a, x.mean_b - mean_b)
    fy = _shift_fourth(y, y.mean_a - mean_a, y.mean_b - mean_b)
    s, p, q, ta, tb = (u + v for u, v in zip(fx, fy, strict=True))
    return CrossMoments(n, mean_a, mean_b, c, x.widths_a, x.widths_b, s, p, q, ta, tb,
                        x.diagonal)


def merge_all(parts: Sequence[CrossMoments]) -> CrossMoments:
    """Merge many partial moments in a balanced pairwise tree (log depth, stable)."""
    parts = list(parts)
    if not parts:
        raise InputError("merge_all needs at least one partial moments object")
    while len(parts) > 1:
        merged = [merge(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            merged.append(parts[-1])
        parts = merged
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


@dataclass(frozen=True)
class ShiftedBlock:
    """A row block shifted by its own column mean rounded to the GEMM dtype.

    z: (rows, d) = block - K in the GEMM dtype, C-contiguous; shift: K as float64, (d,);
    offset: s = rows * (mean - K), float64, (d,). See :class:`TileAccumulator`.
    """

    z: np.ndarray
    shift: np.ndarray
    offset: np.ndarray


def shift_block(z: np.ndarray, gemm_dtype, side: str = "a",
                overwrite: bool = False) -> ShiftedBlock:
    """Shift a (rows, d) block for :meth:`TileAccumulator.update`; in place when
    ``overwrite`` and z already has the GEMM dtype. A reader thread can do this while the
    previous block's product runs (numpy releases the GIL for the mean and the subtraction).
    """
    dtype = np.dtype(gemm_dtype)
    if z.ndim != 2:
        raise InputError(f"group {side} block has shape {z.shape}; expected (rows, features)")
    mean = _column_mean(z, side)
    shift = mean.astype(dtype)
    if overwrite and z.dtype == dtype and z.flags.writeable and z.flags.c_contiguous:
        zc = z
        zc -= shift
    else:
        zc = np.subtract(z, shift, dtype=dtype)
    shift64 = shift.astype(np.float64)
    return ShiftedBlock(zc, shift64, z.shape[0] * (mean - shift64))


class TileAccumulator:
    """In-place accumulation of one tile's moments over many row blocks (no fourth order).

    The streaming counterpart of ``merge(total, block_moments(block))`` for a task's blocks,
    without allocating a d_a x d_b matrix per block: each block is shifted by its own mean
    rounded to the GEMM dtype (K_b), its product goes through one BLAS call (syrk for a
    diagonal tile, gemm otherwise) into a preallocated buffer, and is added to one float64
    accumulator. The per-block shifts are undone once, in :meth:`result`, by the exact identity
    (rows i of block b, e_b = K_b - mean, s_b = sum_i (z_i - K_b) = n_b (mean_b - K_b)):

        C = sum_b sum_i (za_i - K_b)(zb_i - K_b)^T + Sa^T Eb + Ea^T Sb + Ea^T diag(n) Eb

    with Sa the rows s_b of group a, Ea the rows e_b (likewise b): a GEMM whose inner size is
    the number of blocks. Up to rounding this is the Chan-Golub-LeVeque merge of the blocks.

    Memory: the float64 accumulator and one GEMM-dtype buffer of d_a x d_b (12 bytes per entry
    for float32), whatever the number of rows. Cost per block: the GEMM (half of it for a
    diagonal tile) plus one d_a x d_b addition.
    """

    def __init__(self, widths_a: Sequence[int], widths_b: Sequence[int] | None = None,
                 gemm_dtype: type | np.dtype = np.float32):
        self.diagonal = widths_b is None
        self.widths_a = tuple(int(w) for w in widths_a)
        self.widths_b = self.widths_a if self.diagonal else tuple(int(w) for w in widths_b)
        self.dtype = np.dtype(gemm_dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise InputError(f"gemm_dtype must be float32 or float64, got {self.dtype}")
        da, db = sum(self.widths_a), sum(self.widths_b)
        # Fortran order for both: cluster.blas writes the buffer in place (BLAS is
        # column-major), and the accumulator then adds it with matching strides.
        self.acc = zeros((da, db), order="F")
        self._buf = zeros((da, db), dtype=self.dtype, order="F")
        self._n: list[int] = []
        self._shift_a: list[np.ndarray] = []
        self._sum_a: list[np.ndarray] = []
        self._shift_b: list[np.ndarray] = []
        self._sum_b: list[np.ndarray] = []

    def update(
        self,
        za: np.ndarray | ShiftedBlock,
        zb: np.ndarray | ShiftedBlock | None = None,
        *,
        overwrite: bool = False,
    ) -> None:
        """Add one row block: za (n_rows, d_a); zb (n_rows, d_b), None for a diagonal tile.
        Either may come already shifted (:func:`shift_block`, e.g. by a reader thread). With
        ``overwrite`` a block already of the GEMM dtype is shifted in place (no copy)."""
        a = za if isinstance(za, ShiftedBlock) else shift_block(np.asarray(za), self.dtype,
                                                                "a", overwrite)
        if a.z.ndim != 2 or a.z.shape[1] != self.acc.shape[0] or a.z.dtype != self.dtype:
            raise InputError(f"group a block has shape {a.z.shape} ({a.z.dtype}); expected "
                             f"(rows, {self.acc.shape[0]}) ({self.dtype})")
        rows = a.z.shape[0]
        if rows == 0:
            return
        # cluster.blas releases the GIL, so the reader thread prefetches during the product.
        if self.diagonal:
            syrk_upper(a.z, self._buf)
        else:
            b = zb if isinstance(zb, ShiftedBlock) else shift_block(np.asarray(zb), self.dtype,
                                                                    "b", overwrite)
            if b.z.shape != (rows, self.acc.shape[1]) or b.z.dtype != self.dtype:
                raise InputError(f"group b block has shape {b.z.shape} ({b.z.dtype}); "
                                 f"expected ({rows}, {self.acc.shape[1]}) ({self.dtype})")
            gemm_tn(a.z, b.z, self._buf)
            self._shift_b.append(b.shift)
            self._sum_b.append(b.offset)
        if self.diagonal:
            # Only the upper triangle holds the product: add it by column blocks.
            for j in range(0, self.acc.shape[1], 1024):
                cols = slice(j, j + 1024)
                np.add(self.acc[: j + 1024, cols], self._buf[: j + 1024, cols],
                       out=self.acc[: j + 1024, cols])
        else:
            np.add(self.acc, self._buf, out=self.acc)
        self._n.append(rows)
        self._shift_a.append(a.shift)
        self._sum_a.append(a.offset)

    def result(self, keep: bool = False) -> CrossMoments:
        """The tile's moments over every row added so far (float64). Frees the buffers,
        unless ``keep`` (a snapshot, e.g. for a checkpoint, while accumulation goes on; it
        costs one copy of the accumulator)."""
        if not self._n:
            return empty_moments(self.widths_a, None if self.diagonal else self.widths_b)
        counts = np.asarray(self._n, dtype=np.float64)
        n = int(counts.sum())
        ka, sa = np.array(self._shift_a), np.array(self._sum_a)
        mean_a = (counts @ ka + sa.sum(axis=0)) / n
        ea = ka - mean_a
        if keep:
            c = self.acc.copy(order="F")
        else:
            c = self.acc
            self._buf = self.acc = None
        if self.diagonal:
            mean_b, eb, sb = mean_a, ea, sa
        else:
            kb, sb = np.array(self._shift_b), np.array(self._sum_b)
            mean_b = (counts @ kb + sb.sum(axis=0)) / n
            eb = kb - mean_b
        # C += [sa; ea; ea]^T [eb; sb; n eb], in place (c is Fortran-ordered for BLAS).
        from scipy.linalg import blas

        left = np.vstack([sa, ea, ea])
        right = np.vstack([eb, sb, counts[:, None] * eb])
        blas.dgemm(1.0, left, right, trans_a=1, beta=1.0, c=c, overwrite_c=1)
        if self.diagonal:
            _mirror_upper(c)  # syrk filled the upper triangle only
        return CrossMoments(n, mean_a, mean_b, c, self.widths_a, self.widths_b,
                            diagonal=self.diagonal)


def _mirror_upper(c: np.ndarray, block: int = 1024) -> None:
    """Copy the upper triangle of square ``c`` onto its lower one, in place, by blocks."""
    d = c.shape[0]
    for i in range(0, d, block):
        ie = min(i + block, d)
        for j in range(0, i, block):
            c[i:ie, j:j + block] = c[j:j + block, i:ie].T
        diag = c[i:ie, i:ie]
        diag[...] = np.triu(diag) + np.triu(diag, 1).T
