"""Entries of n x n matrices over rows, one row block against another (pure numpy).

The sample-space kernel metrics (RBF CKA, RSA, mutual k-NN) need, per unit, an n x n matrix
of some function of two rows: squared distances, cosines of the raw rows, correlations of the
rows' feature vectors. All of them come from one product per pair of row blocks,

    P = (X_I - c) (X_J - c)^T        (b_I x b_J, in the GEMM dtype),

and float64 per-row sums of the same blocks (:class:`RowBlock`), for any shift c common to
both blocks: ``|x_i - x_j|^2 = q_i + q_j - 2 P_ij`` with ``q_i = |x_i - c|^2``, and the raw
inner product ``x_i.x_j = P_ij + a_i + a_j + |c|^2`` with ``a_i = (x_i - c).c``. A shift near
the rows' mean keeps P's entries small, so a float32 product loses no more than it would on
centered data (the per-row terms are float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repscope.errors import InputError

__all__ = ["RowBlock", "row_block", "products", "sq_distances", "cosines", "correlations"]


@dataclass(frozen=True)
class RowBlock:
    """One unit's rows of one block, shifted by c, with their float64 row sums.

    xc : ndarray (b, d), x - c in the GEMM dtype.
    q : (b,) |x - c|^2;  a : (b,) (x - c).c;  norm2 : (b,) |x|^2;  mean : (b,) the mean of each
    row's features;  spread : (b,) |x - mean 1|^2 (the row's feature variance times d);
    cc : |c|^2.  All float64.
    """

    xc: np.ndarray
    q: np.ndarray
    a: np.ndarray
    norm2: np.ndarray
    mean: np.ndarray
    spread: np.ndarray
    cc: float

    @property
    def features(self) -> int:
        return self.xc.shape[1]


def row_block(x: np.ndarray, shift: np.ndarray, dtype=np.float32) -> RowBlock:
    """Prepare rows (b, d) for :func:`products` with the shift c (d,), float64.

    Cost O(b d) in float64; memory one float64 copy of the block while it is prepared.
    """
    x64 = np.asarray(x, dtype=np.float64)
    xs = x64 - shift
    mean = x64.mean(axis=1)
    centered_rows = x64 - mean[:, None]
    return RowBlock(
        xc=xs.astype(dtype, copy=False),
        q=np.einsum("ij,ij->i", xs, xs),
        a=xs @ shift,
        norm2=np.einsum("ij,ij->i", x64, x64),
        mean=mean,
        spread=np.einsum("ij,ij->i", centered_rows, centered_rows),
        cc=float(shift @ shift),
    )


def products(bi: RowBlock, bj: RowBlock, rows: slice) -> np.ndarray:
    """P for rows ``rows`` of block I against all of block J: float64 (r, b_J)."""
    return np.asarray(bi.xc[rows] @ bj.xc.T, dtype=np.float64)


def sq_distances(p: np.ndarray, bi: RowBlock, bj: RowBlock, rows: slice) -> np.ndarray:
    """Squared Euclidean distances from :func:`products`, clipped at 0 (rounding): (r, b_J)."""
    d = bi.q[rows, None] + bj.q[None, :] - 2.0 * p
    return np.maximum(d, 0.0, out=d)


def _raw_dots(p: np.ndarray, bi: RowBlock, bj: RowBlock, rows: slice) -> np.ndarray:
    return p + bi.a[rows, None] + bj.a[None, :] + bi.cc


def cosines(p: np.ndarray, bi: RowBlock, bj: RowBlock, rows: slice) -> np.ndarray:
    """Inner products of the L2-normalised raw rows: (r, b_J). A zero row has cosine 0 with
    everything (torch's ``F.normalize`` leaves it zero)."""
    inv_i = _inverse_norms(bi.norm2[rows])
    inv_j = _inverse_norms(bj.norm2)
    return _raw_dots(p, bi, bj, rows) * inv_i[:, None] * inv_j[None, :]


def _inverse_norms(norm2: np.ndarray) -> np.ndarray:
    out = np.zeros_like(norm2)
    keep = norm2 > 0
    out[keep] = 1.0 / np.sqrt(norm2[keep])
    return out


def correlations(p: np.ndarray, bi: RowBlock, bj: RowBlock, rows: slice,
                 name: str = "unit") -> np.ndarray:
    """Pearson correlations between rows' feature vectors (each row centered over its own
    features): (r, b_J). A row whose features are all equal has no correlation.

    Raises
    ------
    InputError
        If a row of either block is constant (rsatoolbox would return NaN there).
    """
    for block, sel in ((bi, rows), (bj, slice(None))):
        if not np.all(block.spread[sel] > 0):
            raise InputError(
                f"unit {name!r} has rows whose features are all equal: their correlation "
                "(rsa with rdm: correlation) is undefined; use rdm: euclidean"
            )
    d = bi.features
    centered = _raw_dots(p, bi, bj, rows) - d * bi.mean[rows, None] * bj.mean[None, :]
    return centered / np.sqrt(bi.spread[rows, None] * bj.spread[None, :])
