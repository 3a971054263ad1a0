"""Sample space: metrics finished from centered Gram matrices instead of feature moments.

With n rows and a unit of d features, the centered Gram ``K = Xc Xc^T`` (n x n) costs n^2 d
once per unit, while feature-space moments cost n d^2 per unit pair: with a few thousand rows
and wide layers (n << d) the Grams are far cheaper (docs/design.md, section 4).

Every quantity here equals its feature-space counterpart in :mod:`cluster.metrics`:

- ``<K, L>_F = ||Xc^T Yc||_F^2`` and ``||K||_F = ||Cxx||_F``: linear CKA (Kornblith et al.
  2019) is ``<K, L> / (||K|| ||L||)``.
- Debiased CKA (Song et al. 2012): with centered linear kernels, ``K~`` the Gram without its
  diagonal, ``tr(K~ L~) = <K, L> - diag(K).diag(L)``, ``1^T K~ 1 = -tr K`` and
  ``1^T K~ L~ 1 = diag(K).diag(L)``, so the unbiased HSIC needs only ``<K, L>``, the diagonals
  and the traces: the feature-space formula with ``sum_ab = diag(K).diag(L)``.
- CCA family: ``K = U S^2 U^T``; the columns of U with eigenvalues above the floor are an
  orthonormal basis of X's column space, and the canonical correlations are the singular
  values of ``Ux^T Uy`` (zeros pad them to min(p, q), as the floored directions do there).
- SVCCA: the top-k columns of U (k from the eigenvalues, which are Cxx's nonzero ones).
- Procrustes: the singular values of ``Xc^T Yc`` are those of ``Sx Ux^T Uy Sy``; its nuclear
  norm is that of ``K^(1/2) L^(1/2)``.

PWCCA weights canonical variates by their covariance with each *feature* (an L1 norm in the
feature basis), which Grams do not determine: it has no sample-space form here.

The streaming job path (:func:`gram_tile`) computes ``<K_u, K_v>`` for all unit pairs of a
tile without holding any whole Gram: row slab by row slab of the upper triangle.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from cluster.linalg import inverse_sqrt, sorted_eigh
from cluster.metrics import EIG_FLOOR, check_metrics, debiased_hsic
from store.errors import InputError

__all__ = [
    "SAMPLE_METRICS",
    "STREAMED_SAMPLE_METRICS",
    "GramTask",
    "GramStats",
    "centered_gram",
    "sample_space_metrics",
    "gram_tile",
    "merge_gram_stats",
    "gram_similarity_matrices",
    "sample_space_flops",
]

#: Metrics with a sample-space form (in memory, :func:`sample_space_metrics`).
SAMPLE_METRICS = ("linear_cka", "linear_cka_debiased", "mean_cca", "mean_sq_cca", "svcca",
                  "procrustes")
#: Metrics the streaming job path finishes from Gram inner products alone.
STREAMED_SAMPLE_METRICS = ("linear_cka", "linear_cka_debiased")


def _centered(x: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Features centered on their float64 mean, rounded once to ``dtype``: (n, d)."""
    x = np.asarray(x)
    return (x - x.mean(axis=0, dtype=np.float64)).astype(dtype, copy=False)


def centered_gram(x: np.ndarray) -> np.ndarray:
    """``K = Xc Xc^T`` for x of shape (n_rows, n_features): ndarray (n_rows, n_rows), float64."""
    xc = _centered(x)
    return xc @ xc.T


# --- in memory: every metric with a sample-space form --------------------------------------


def _basis(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, >= 0) and eigenvectors of a centered Gram."""
    return sorted_eigh(k)


def sample_space_metrics(
    x: np.ndarray,
    y: np.ndarray,
    metrics: Iterable[str] | None = None,
    *,
    svcca_threshold: float = 0.99,
    eig_floor: float = EIG_FLOOR,
) -> dict[str, float]:
    """value(x, y) of each metric from the two centered Grams (see the module notes).

    Parameters
    ----------
    x : ndarray of shape (n_rows, p); y : ndarray of shape (n_rows, q)
    metrics : names among :data:`SAMPLE_METRICS` (None: all of them).

    Notes
    -----
    Cost: two n x n Grams (n^2 (p + q)), and for the CCA family or Procrustes two n x n
    eigendecompositions (O(n^3)); memory a few n x n float64 matrices.
    """
    metrics = check_metrics(SAMPLE_METRICS if metrics is None else metrics)
    unsupported = [m for m in metrics if m not in SAMPLE_METRICS]
    if unsupported:
        raise InputError(
            f"{', '.join(unsupported)} has no sample-space form (it weights by features); "
            "use the feature space (compute.space: feature)"
        )
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[0] != y.shape[0]:
        raise InputError(f"x and y must have the same rows: {x.shape[0]} vs {y.shape[0]}")
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    k, ell = centered_gram(x), centered_gram(y)
    kl = float(np.sum(k * ell))
    out: dict[str, float] = {}
    if "linear_cka" in metrics:
        out["linear_cka"] = kl / float(np.linalg.norm(k) * np.linalg.norm(ell))
    if "linear_cka_debiased" in metrics:
        if n < 4:
            raise InputError(f"linear_cka_debiased needs at least 4 rows, got {n}")
        dk, dl = np.diag(k), np.diag(ell)
        tk, tl = float(dk.sum()), float(dl.sum())
        hsic = debiased_hsic(kl, float(dk @ dl), tk, tl, n)
        hx = debiased_hsic(float(np.sum(k * k)), float(dk @ dk), tk, tk, n)
        hy = debiased_hsic(float(np.sum(ell * ell)), float(dl @ dl), tl, tl, n)
        out["linear_cka_debiased"] = hsic / float(np.sqrt(hx * hy))
    if any(m in metrics for m in ("mean_cca", "mean_sq_cca", "svcca", "procrustes")):
        ex, ux = _basis(k)
        ey, uy = _basis(ell)
        if "mean_cca" in metrics or "mean_sq_cca" in metrics:
            kx = np.count_nonzero(inverse_sqrt(ex, eig_floor))
            ky = np.count_nonzero(inverse_sqrt(ey, eig_floor))
            rho = np.zeros(min(p, q))
            s = np.linalg.svd(ux[:, :kx].T @ uy[:, :ky], compute_uv=False)
            rho[: s.size] = s[: rho.size]
            if "mean_cca" in metrics:
                out["mean_cca"] = float(rho.mean())
            if "mean_sq_cca" in metrics:
                out["mean_sq_cca"] = float(np.mean(rho * rho))
        if "svcca" in metrics:
            kx = _svcca_dims(ex[:p], svcca_threshold, eig_floor)
            ky = _svcca_dims(ey[:q], svcca_threshold, eig_floor)
            out["svcca"] = float(np.linalg.svd(ux[:, :kx].T @ uy[:, :ky],
                                               compute_uv=False).mean())
        if "procrustes" in metrics:
            sx, sy = np.sqrt(ex), np.sqrt(ey)
            nuclear = np.linalg.svd((ux * sx).T @ (uy * sy), compute_uv=False).sum()
            out["procrustes"] = float(2.0 - 2.0 * nuclear / np.sqrt(ex.sum() * ey.sum()))
    return {m: out[m] for m in metrics}


def _svcca_dims(evals: np.ndarray, threshold: float, floor: float) -> int:
    """As :func:`cluster.metrics.svcca_basis`: fewest directions explaining ``threshold``."""
    fraction = np.cumsum(evals) / evals.sum()
    k = int(np.searchsorted(fraction, threshold)) + 1
    return min(k, int(np.count_nonzero(inverse_sqrt(evals, floor))))


# --- streaming job path: Gram inner products of every unit pair ----------------------------


@dataclass(frozen=True)
class GramTask:
    """One task: Gram inner products of the units of groups a and b (b None: a with itself)
    over the row slabs ``slabs`` of the upper triangle; rows [start, stop) of the store."""

    units_a: tuple[tuple[str, str], ...]
    units_b: tuple[tuple[str, str], ...] | None
    start: int
    stop: int
    slabs: tuple[tuple[int, int], ...]
    precision: str
    threads: int | None = None


@dataclass(frozen=True)
class GramStats:
    """Sample-space statistics of a tile (all float64, ``a`` x ``b`` unit indices).

    kl : ndarray (k_a, k_b), ``<K_u, L_v>_F`` summed over the slabs done so far.
    dd : ndarray (k_a, k_b), ``diag(K_u) . diag(L_v)``.
    trace_a : ndarray (k_a,); trace_b : ndarray (k_b,). n : rows.
    """

    n: int
    kl: np.ndarray
    dd: np.ndarray
    trace_a: np.ndarray
    trace_b: np.ndarray


def gram_slabs(n: int, slab_rows: int) -> list[tuple[int, int]]:
    """Row slabs [i0, i1) of the n x n upper triangle."""
    return [(i, min(i + slab_rows, n)) for i in range(0, n, slab_rows)]


def _slab_vectors(xs: Sequence[np.ndarray], i0: int, i1: int) -> np.ndarray:
    """Rows ``[K[I, I], sqrt(2) K[I, i1:]]`` flattened, one per unit: (units, slab entries).

    Summed over the slabs, their inner products are ``<K, L>_F``: the diagonal blocks once,
    the strictly upper part twice (K is symmetric). GEMMs in the data's dtype; float64 out.
    """
    out = []
    for xc in xs:
        block = xc[i0:i1] @ xc[i0:].T  # (|I|, n - i0)
        block[:, i1 - i0 :] *= np.sqrt(2.0, dtype=block.dtype)
        out.append(block.ravel())
    return np.asarray(out, dtype=np.float64)


def _read_centered(store, units, start: int, stop: int, dtype) -> list[np.ndarray]:
    return [_centered(store.read(m, layer, start, stop), dtype) for m, layer in units]


def gram_tile(store, task: GramTask) -> GramStats:
    """Gram inner products of a tile's unit pairs over ``task.slabs``: plain code, no Ray.

    Memory: the tile's centered rows (n x (d_a + d_b) in the GEMM dtype) and one slab's
    vectors per unit (|I| x n float64 each): no whole Gram is held.
    """
    from cluster.execute import blas_threads

    limit = blas_threads(task.threads)
    dtype = np.float32 if task.precision == "float32" else np.float64
    with limit:
        xa = _read_centered(store, task.units_a, task.start, task.stop, dtype)
        xb = xa if task.units_b is None else _read_centered(
            store, task.units_b, task.start, task.stop, dtype)
        n = task.stop - task.start
        kl = np.zeros((len(xa), len(xb)))
        for i0, i1 in task.slabs:
            va = _slab_vectors(xa, i0, i1)
            vb = va if task.units_b is None else _slab_vectors(xb, i0, i1)
            kl += va @ vb.T
        da = np.asarray([np.einsum("ij,ij->i", x, x, dtype=np.float64) for x in xa])
        db = da if task.units_b is None else np.asarray(
            [np.einsum("ij,ij->i", x, x, dtype=np.float64) for x in xb])
    return GramStats(n, kl, da @ db.T, da.sum(axis=1), db.sum(axis=1))


def merge_gram_stats(*parts: GramStats) -> GramStats:
    """Stats of disjoint slab sets of one tile: the inner products add."""
    first = parts[0]
    return GramStats(first.n, sum(p.kl for p in parts), first.dd, first.trace_a, first.trace_b)


def gram_similarity_matrices(
    n: int,
    kl: np.ndarray,
    dd: np.ndarray,
    trace: np.ndarray,
    metrics: Iterable[str],
) -> dict[str, np.ndarray]:
    """(U, U) matrices of the streamed sample-space metrics from the assembled statistics.

    kl, dd : ndarray (U, U), ``<K_u, K_v>`` and ``diag(K_u).diag(K_v)``; trace : (U,).
    """
    metrics = check_metrics(metrics)
    bad = [m for m in metrics if m not in STREAMED_SAMPLE_METRICS]
    if bad:
        raise InputError(
            f"{', '.join(bad)} cannot be finished from streamed Gram inner products; "
            "use compute.space: feature (or auto)"
        )
    out = {}
    if "linear_cka" in metrics:
        fro = np.sqrt(np.diag(kl))
        out["linear_cka"] = kl / np.outer(fro, fro)
    if "linear_cka_debiased" in metrics:
        if n < 4:
            raise InputError(f"linear_cka_debiased needs at least 4 rows, got {n}")
        hsic = kl - n / (n - 2.0) * dd + np.outer(trace, trace) / ((n - 1.0) * (n - 2.0))
        self_ = np.sqrt(np.diag(hsic))
        out["linear_cka_debiased"] = hsic / np.outer(self_, self_)
    return {m: out[m] for m in metrics}


def sample_space_flops(n: int, widths: Sequence[int]) -> float:
    """Flops of the streamed sample path: the Gram triangles (n^2 d per unit) plus the
    float64 inner products (U^2 n^2, counted twice for their lower GEMM rate)."""
    return float(n) ** 2 * sum(widths) + 2.0 * len(widths) ** 2 * float(n) ** 2
