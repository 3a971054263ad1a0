"""The one accumulator of a tile's moments: ``update`` per row block, ``result`` at the end.

:class:`TileAccumulator` streams row blocks of one tile (group a, group b) into the centered
moments of :class:`~repscope.cluster.moments.CrossMoments`, in place: a task's rows, whatever
their number, cost one float64 accumulator and one GEMM buffer. :func:`block_moments` is the
same accumulator fed one block (the batch path is the streaming path). Partial results of
different row ranges merge exactly with :func:`~repscope.cluster.moments.merge`.

Second order. Each block is shifted by its own column mean rounded to the GEMM dtype (K_b),
so large means never enter the float32 product; its product goes through one BLAS call (syrk
for a diagonal tile, gemm otherwise) into a buffer and is added to the float64 accumulator.
The shifts are undone once, in :meth:`TileAccumulator.result`, by the exact identity (rows i
of block b, e_b = K_b - mean, s_b = sum_i (z_i - K_b) = n_b (mean_b - K_b)):

    C = sum_b sum_i (za_i - K_b)(zb_i - K_b)^T + Sa^T Eb + Ea^T Sb + Ea^T diag(n) Eb

with Sa the rows s_b of group a and Ea the rows e_b (likewise b): up to rounding the
Chan-Golub-LeVeque merge of the blocks.

Fourth order (debiased CKA, optional). The sums ``s = sum_i a_iu b_iv``, ``p = sum_i b_iv
x^_i``, ``q = sum_i a_iu y^_i``, ``ta = sum_i a_iu``, ``tb`` (a_iu = ||x^_iu||^2, rows centered
on the final mean) are accumulated raw around one fixed reference R (the first block's
shift), where every block adds plainly, and centered once at the end (:func:`_center_fourth`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from repscope.cluster.blas import gemm_tn, syrk_upper
from repscope.cluster.linalg import cross_product, unit_sums, zeros
from repscope.cluster.moments import CrossMoments, empty_moments
from repscope.errors import InputError

__all__ = ["ShiftedBlock", "shift_block", "TileAccumulator", "block_moments"]

# Columns per step when the accumulator adds a triangle: bounds the temporaries.
_COLUMN_STEP = 1024
# Side of the square blocks the mirror copies transposed: small enough that a block and its
# transpose stay in a core's L2 cache (blocks of 1,024 took three times as long).
_MIRROR_BLOCK = 256
# Rows per step of the fourth-order terms, which need float64 temporaries of a block's width.
_FOURTH_ROWS = 8192
# Entries per chunk of the shift: a chunk stays in cache for its min and max.
_CHUNK_ELEMENTS = 1 << 16


def _column_mean(z: np.ndarray, side: str) -> np.ndarray:
    """Float64 column mean; a NaN or Inf anywhere in the block makes it non-finite."""
    with np.errstate(over="ignore", invalid="ignore"):  # refused below, by name
        mean = z.mean(axis=0, dtype=np.float64)
    if not np.all(np.isfinite(mean)):
        cols = np.flatnonzero(~np.isfinite(mean))[:5].tolist()
        column = z[:, cols[0]]
        bad = np.flatnonzero(~np.isfinite(column))
        if bad.size:
            raise InputError(f"group {side} has NaN or Inf values in columns {cols} of this "
                             f"block (first at row {int(bad[0])})")
        raise InputError(f"group {side} has values too large to sum in float64 in columns "
                         f"{cols} of this block (largest at row "
                         f"{int(np.argmax(np.abs(column)))})")
    return mean


@dataclass(frozen=True)
class ShiftedBlock:
    """A row block shifted by its own column mean rounded to the GEMM dtype.

    z: (rows, d) = (block - K) * scale in the GEMM dtype, C-contiguous; shift: K as float64,
    (d,); offset: s = rows * (mean - K), float64, (d,); scale: None (the usual case), or the
    powers of two (d,) that brought columns with extreme values into the range where the
    products neither overflow nor underflow (undone exactly, in float64, after the product).
    """

    z: np.ndarray
    shift: np.ndarray
    offset: np.ndarray
    scale: np.ndarray | None = None


def _column_scales(peak: np.ndarray, rows: int, dtype: np.dtype) -> np.ndarray | None:
    """Powers of two for the columns whose largest magnitude ``peak`` would overflow a sum
    of ``rows`` products (or whose products would underflow), None when there is none.

    Overflow: a product entry is at most rows * peak_i * peak_j, so peaks above
    sqrt(max / (4 rows)) are scaled. Underflow: products of two peaks below sqrt(tiny / eps)
    lose digits to subnormals. A scaled column's peak lands in [0.5, 1).
    """
    info = np.finfo(dtype)
    high = np.sqrt(float(info.max) / (4.0 * max(rows, 1)))
    low = np.sqrt(float(info.tiny) / float(info.eps))
    extreme = (peak > high) | ((peak > 0) & (peak < low))
    if not extreme.any():
        return None
    scale = np.ones(peak.shape[0])
    scale[extreme] = np.ldexp(1.0, -np.frexp(peak[extreme])[1])
    return scale


def shift_block(z: np.ndarray, gemm_dtype, side: str = "a",
                overwrite: bool = False) -> ShiftedBlock:
    """Shift a (rows, d) block for :meth:`TileAccumulator.update`; in place when
    ``overwrite`` and z already has the GEMM dtype. A reader thread can do this while the
    previous block's product runs (numpy releases the GIL for the mean and the subtraction).

    The subtraction runs in cache-sized row chunks that also give each column's largest
    magnitude (no extra pass over memory); columns whose values would overflow or underflow
    the products are scaled by powers of two (:func:`_column_scales`), exactly.
    """
    dtype = np.dtype(gemm_dtype)
    z = np.asarray(z)
    if z.ndim != 2:
        raise InputError(f"group {side} block has shape {z.shape}; expected (rows, features)")
    rows, d = z.shape
    mean = _column_mean(z, side) if rows else np.zeros(d)
    shift = mean.astype(dtype)
    if not np.all(np.isfinite(shift)):
        cols = np.flatnonzero(~np.isfinite(shift))[:5].tolist()
        raise InputError(f"group {side} has column means beyond the {dtype} range in columns "
                         f"{cols} of this block; use float64 products")
    if overwrite and z.dtype == dtype and z.flags.writeable and z.flags.c_contiguous:
        zc = z
    else:
        zc = np.empty(z.shape, dtype)
    high = np.full(d, -np.inf, dtype)
    low = np.full(d, np.inf, dtype)
    step = max(16, _CHUNK_ELEMENTS // max(d, 1))
    for lo in range(0, rows, step):
        part = np.subtract(z[lo:lo + step], shift, out=zc[lo:lo + step], dtype=dtype,
                           casting="unsafe")
        np.maximum(high, part.max(axis=0), out=high)
        np.minimum(low, part.min(axis=0), out=low)
    peak = np.maximum(high, -low).astype(np.float64) if rows else np.zeros(d)
    if not np.all(np.isfinite(peak)):
        cols = np.flatnonzero(~np.isfinite(peak))[:5].tolist()
        raise InputError(f"group {side} has values beyond the {dtype} range in columns "
                         f"{cols} of this block; use float64 products")
    scale = _column_scales(peak, rows, dtype)
    if scale is not None:
        zc *= scale.astype(dtype)
    shift64 = shift.astype(np.float64)
    return ShiftedBlock(zc, shift64, rows * (mean - shift64), scale)


def _check_widths(widths: Sequence[int] | None, side: str) -> tuple[int, ...] | None:
    if widths is None:
        return None
    widths = tuple(int(w) for w in widths)
    if not widths or min(widths) < 1:
        raise InputError(f"widths_{side}={widths} must be positive unit widths")
    return widths


@dataclass
class _Fourth:
    """Raw fourth-order sums around the reference R (see the module notes)."""

    ref_a: np.ndarray
    ref_b: np.ndarray
    s: np.ndarray
    p: np.ndarray
    q: np.ndarray
    ta: np.ndarray
    tb: np.ndarray


class TileAccumulator:
    """In-place accumulation of one tile's centered moments over row blocks.

    Parameters
    ----------
    widths_a : unit widths of group a (they sum to its d_a columns).
    widths_b : unit widths of group b; None for a diagonal tile (b is a: one syrk per block).
    fourth : also accumulate the fourth-order sums of debiased CKA.
    gemm_dtype : dtype of the block products, float32 (twice the speed; error about 1e-7
        relative on linear CKA, docs/metrics.md) or float64. Sums are float64 either way.

    Notes
    -----
    Memory: the float64 accumulator and one GEMM-dtype buffer of d_a x d_b (12 bytes per entry
    for float32), whatever the number of rows; with ``fourth`` also (d_a + d_b) x k float64
    sums and per block float64 temporaries of at most _FOURTH_ROWS rows. Cost per block: the
    GEMM (half of it for a diagonal tile), one d_a x d_b addition, and with ``fourth`` two
    n x d x k products.
    """

    def __init__(self, widths_a: Sequence[int], widths_b: Sequence[int] | None = None, *,
                 fourth: bool = False, gemm_dtype: type | np.dtype = np.float32):
        self.diagonal = widths_b is None
        self.widths_a = _check_widths(widths_a, "a")
        self.widths_b = self.widths_a if self.diagonal else _check_widths(widths_b, "b")
        self.fourth = bool(fourth)
        self.dtype = np.dtype(gemm_dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise InputError(f"gemm_dtype must be float32 or float64, got {self.dtype}")
        self.d_a, self.d_b = sum(self.widths_a), sum(self.widths_b)
        # Fortran order for both: cluster.blas writes the buffer in place (BLAS is
        # column-major), and the accumulator then adds it with matching strides. Allocated
        # here, so that a task can construct the accumulator while its first block is read.
        self.acc = zeros((self.d_a, self.d_b), order="F")
        self._buf = zeros((self.d_a, self.d_b), dtype=self.dtype, order="F")
        self._n: list[int] = []
        self._shift_a: list[np.ndarray] = []
        self._sum_a: list[np.ndarray] = []
        self._shift_b: list[np.ndarray] = []
        self._sum_b: list[np.ndarray] = []
        self._raw: _Fourth | None = None

    # -- partial_fit ----------------------------------------------------------------------

    def update(
        self,
        za: np.ndarray | ShiftedBlock,
        zb: np.ndarray | ShiftedBlock | None = None,
        *,
        overwrite: bool = False,
    ) -> None:
        """Add one row block: za (n_rows, d_a); zb (n_rows, d_b), None for a diagonal tile.

        Either may come already shifted (:func:`shift_block`, e.g. by a reader thread). With
        ``overwrite`` a block already of the GEMM dtype is shifted in place (no copy).
        """
        a = za if isinstance(za, ShiftedBlock) else shift_block(za, self.dtype, "a", overwrite)
        self._check(a, "a", self.d_a, None)
        rows = a.z.shape[0]
        if rows == 0:
            return
        if self.diagonal:
            if zb is not None:
                raise InputError("a diagonal tile takes one block per update (zb=None)")
            b = a
        else:
            if zb is None:
                raise InputError("an off-diagonal tile needs the rows of group b (zb)")
            b = zb if isinstance(zb, ShiftedBlock) else shift_block(zb, self.dtype, "b",
                                                                    overwrite)
            self._check(b, "b", self.d_b, rows)
        if self.acc is None:
            raise InputError("the accumulator's result was taken; start a new accumulator")
        # cluster.blas releases the GIL, so a reader thread prefetches during the product.
        scaled = a.scale is not None or b.scale is not None
        if scaled:
            # Undo the columns' powers of two (exact) in float64, where the products fit.
            inv_a = 1.0 / (np.ones(self.d_a) if a.scale is None else a.scale)
            inv_b = 1.0 / (np.ones(self.d_b) if b.scale is None else b.scale)
        if self.diagonal:
            syrk_upper(a.z, self._buf)
            for j in range(0, self.d_b, _COLUMN_STEP):  # only the upper triangle was written
                top, cols = j + _COLUMN_STEP, slice(j, j + _COLUMN_STEP)
                part = self._buf[:top, cols]
                if scaled:
                    part = part * np.outer(inv_a[:top], inv_b[cols])
                np.add(self.acc[:top, cols], part, out=self.acc[:top, cols])
        else:
            gemm_tn(a.z, b.z, self._buf)
            if scaled:
                np.add(self.acc, self._buf * np.outer(inv_a, inv_b), out=self.acc)
            else:
                np.add(self.acc, self._buf, out=self.acc)
            self._shift_b.append(b.shift)
            self._sum_b.append(b.offset)
        if self.fourth:
            self._update_fourth(a, b)
        self._n.append(rows)
        self._shift_a.append(a.shift)
        self._sum_a.append(a.offset)

    def _check(self, block: ShiftedBlock, side: str, width: int, rows: int | None) -> None:
        z = block.z
        if (z.ndim != 2 or z.shape[1] != width or z.dtype != self.dtype
                or (rows is not None and z.shape[0] != rows)):
            want = f"({'rows' if rows is None else rows}, {width}) ({self.dtype})"
            raise InputError(f"group {side} block has shape {z.shape} ({z.dtype}); "
                             f"expected {want}")

    def _update_fourth(self, a: ShiftedBlock, b: ShiftedBlock) -> None:
        if self._raw is None:
            ka, kb = len(self.widths_a), len(self.widths_b)
            self._raw = _Fourth(a.shift.copy(), b.shift.copy(), np.zeros((ka, kb)),
                                np.zeros((self.d_a, kb)), np.zeros((self.d_b, ka)),
                                np.zeros(ka), np.zeros(kb))
        raw = self._raw
        # Rows around R: x~ = z + delta with delta = K_b - R (exact in float64).
        delta_a, delta_b = a.shift - raw.ref_a, b.shift - raw.ref_b
        for lo in range(0, a.z.shape[0], _FOURTH_ROWS):
            za = _unscaled(a.z[lo:lo + _FOURTH_ROWS], a.scale)
            norms_a = _row_norms(za, delta_a, self.widths_a)  # a~_iu, (rows, k_a)
            zb = za if self.diagonal else _unscaled(b.z[lo:lo + _FOURTH_ROWS], b.scale)
            norms_b = norms_a if self.diagonal else _row_norms(zb, delta_b, self.widths_b)
            raw.s += norms_a.T @ norms_b
            raw.ta += norms_a.sum(axis=0)
            tb = norms_b.sum(axis=0)
            raw.tb += tb
            # p~ = sum_i b~_iv x~_i = z^T b~ + delta (sum_i b~_iv): the product in GEMM dtype,
            # unless extreme values (scaled blocks, or norms past its range) need float64.
            raw.p += _product(za, norms_b, self.dtype) + np.outer(delta_a, tb)
            if not self.diagonal:
                raw.q += (_product(zb, norms_a, self.dtype)
                          + np.outer(delta_b, norms_a.sum(axis=0)))

    # -- finalize -------------------------------------------------------------------------

    def result(self, keep: bool = False) -> CrossMoments:
        """The tile's moments over every row added so far (float64). Frees the buffers,
        unless ``keep`` (a snapshot, e.g. for a checkpoint, while accumulation goes on; it
        costs one copy of the accumulator)."""
        if not self._n:
            return empty_moments(self.widths_a, None if self.diagonal else self.widths_b,
                                 fourth=self.fourth)
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
        if not self.fourth:
            return CrossMoments(n, mean_a, mean_b, c, self.widths_a, self.widths_b,
                                diagonal=self.diagonal)
        s, p, q, ta, tb = _center_fourth(self._raw, c, n, mean_a, mean_b, self.widths_a,
                                         self.widths_b, self.diagonal)
        return CrossMoments(n, mean_a, mean_b, c, self.widths_a, self.widths_b, s, p, q, ta,
                            tb, self.diagonal)


def _unscaled(z: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """A chunk of a shifted block without its columns' powers of two (float64 if scaled)."""
    return z if scale is None else z / scale


def _product(z: np.ndarray, norms: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``z^T norms`` as float64: in the GEMM dtype when both fit its range, else float64."""
    limit = float(np.finfo(dtype).max) / (4.0 * max(z.shape[0], 1))
    if z.dtype == dtype and float(norms.max(initial=0.0)) ** 2 < limit:
        return cross_product(z, norms.astype(dtype))
    return cross_product(z.astype(np.float64, copy=False), norms)


def _row_norms(z: np.ndarray, delta: np.ndarray, widths: tuple[int, ...]) -> np.ndarray:
    """a~_iu = ||z_iu + delta_u||^2 in float64: ndarray of shape (rows, k). O(rows d)."""
    shifted = np.add(z, delta, dtype=np.float64)
    np.square(shifted, out=shifted)
    return unit_sums(shifted, widths, axis=1)


def _center_fourth(raw: _Fourth, c: np.ndarray, n: int, mean_a: np.ndarray,
                   mean_b: np.ndarray, wa: tuple[int, ...], wb: tuple[int, ...],
                   diagonal: bool):
    """The raw sums around R re-centered on the final means, exactly.

    With x~ = x^ + d (d = mean - R, so sum_i x~_i = n d) and C the centered cross moments
    (sum_i x~ y~^T = C + n d e^T), per unit pair (u, v), d and e restricted to their units:
        s^  = s~ - 2 e.q~ - 2 d.p~ + |e|^2 ta~ + |d|^2 tb~ + 4 d^T C e + n |d|^2 |e|^2
        p^  = p~ - d tb~ - 2 C e,    q^ = q~ - e ta~ - 2 C^T d
        ta^ = ta~ - n |d|^2,         tb^ = tb~ - n |e|^2
    All O(d_a d_b).
    """
    d = mean_a - raw.ref_a
    e = mean_b - raw.ref_b
    d2 = unit_sums(d * d, wa, axis=0)  # |d_u|^2, (k_a,)
    e2 = unit_sums(e * e, wb, axis=0)  # |e_v|^2, (k_b,)
    c_e = unit_sums(c * e, wb, axis=1)  # C[:, v] e_v, (d_a, k_b)
    d_c_e = unit_sums(d[:, None] * c_e, wa, axis=0)  # d_u^T C[u, v] e_v, (k_a, k_b)
    d_p = unit_sums(d[:, None] * raw.p, wa, axis=0)  # d_u . p~[u, v], (k_a, k_b)
    q_raw = raw.p if diagonal else raw.q
    e_q = unit_sums(e[:, None] * q_raw, wb, axis=0)  # e_v . q~[v, u], (k_b, k_a)
    s = (raw.s - 2 * e_q.T - 2 * d_p + np.outer(raw.ta, e2) + np.outer(d2, raw.tb)
         + 4 * d_c_e + n * np.outer(d2, e2))
    p = raw.p - np.outer(d, raw.tb) - 2 * c_e
    ta = raw.ta - n * d2
    tb = raw.tb - n * e2
    if diagonal:
        return s, p, p, ta, ta
    ct_d = unit_sums(c.T * d, wa, axis=1)  # C[u, :]^T d_u, (d_b, k_a)
    q = raw.q - np.outer(e, raw.ta) - 2 * ct_d
    return s, p, q, ta, tb


def _mirror_upper(c: np.ndarray, block: int = _MIRROR_BLOCK) -> None:
    """Copy the upper triangle of square ``c`` onto its lower one, in place, by blocks."""
    d = c.shape[0]
    for i in range(0, d, block):
        ie = min(i + block, d)
        for j in range(0, i, block):
            c[i:ie, j:j + block] = c[j:j + block, i:ie].T
        diag = c[i:ie, i:ie]
        diag[...] = np.triu(diag) + np.triu(diag, 1).T


def block_moments(
    za: np.ndarray,
    zb: np.ndarray | None = None,
    *,
    widths_a: Sequence[int],
    widths_b: Sequence[int] | None = None,
    fourth: bool = False,
    gemm_dtype: type | np.dtype = np.float64,
) -> CrossMoments:
    """Centered moments of one row block of a tile: :class:`TileAccumulator` fed once.

    Parameters
    ----------
    za : ndarray of shape (n_rows, d_a), any float dtype; the block's rows of group a.
    zb : ndarray of shape (n_rows, d_b) or None; the same rows of group b (None: a diagonal
        tile, b is a).
    widths_a, widths_b : unit widths of each group.
    fourth : also the fourth-order terms of debiased CKA.
    gemm_dtype : dtype of the products (float64 by default here: the exact reference).
    """
    za = np.asarray(za)
    if za.ndim != 2:
        raise InputError(f"group a block must be 2-D (rows, features), got shape {za.shape}")
    if sum(int(w) for w in widths_a) != za.shape[1]:
        raise InputError(f"widths_a={tuple(widths_a)} must sum to the block's {za.shape[1]} "
                         "columns")
    if zb is None and widths_b is not None and tuple(widths_b) != tuple(widths_a):
        raise InputError("a diagonal tile (zb=None) has widths_b equal to widths_a")
    if zb is not None:
        zb = np.asarray(zb)
        widths_b = widths_a if widths_b is None else widths_b
        if zb.ndim != 2 or zb.shape[0] != za.shape[0]:
            raise InputError(f"group b block has shape {zb.shape}; expected 2-D with "
                             f"{za.shape[0]} rows like group a")
        if sum(int(w) for w in widths_b) != zb.shape[1]:
            raise InputError(f"widths_b={tuple(widths_b)} must sum to the block's "
                             f"{zb.shape[1]} columns")
    acc = TileAccumulator(widths_a, None if zb is None else widths_b, fourth=fourth,
                          gemm_dtype=gemm_dtype)
    acc.update(za, zb)
    return acc.result()
