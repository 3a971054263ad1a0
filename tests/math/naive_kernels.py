"""Straightforward float64 in-memory versions of the kernel and shape metrics, for tests only.

Each works on the whole n x n matrices at once, written from the metric's definition (the
reference code's recipe) rather than from the streamed statistics.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def gram_rbf(x: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """Kornblith et al.'s RBF Gram: bandwidth^2 = threshold^2 * median squared distance."""
    x = np.asarray(x, dtype=np.float64)
    dots = x @ x.T
    sq = np.diag(dots)
    dist = -2.0 * dots + sq[:, None] + sq[None, :]
    return np.exp(-dist / (2.0 * threshold**2 * np.median(dist)))


def center(k: np.ndarray) -> np.ndarray:
    n = k.shape[0]
    h = np.eye(n) - 1.0 / n
    return h @ k @ h


def cka(k: np.ndarray, ell: np.ndarray) -> float:
    kc, lc = center(k), center(ell)
    return float(np.sum(kc * lc) / (np.linalg.norm(kc) * np.linalg.norm(lc)))


def rbf_cka(x, y, threshold: float = 1.0) -> float:
    return cka(gram_rbf(x, threshold), gram_rbf(y, threshold))


def rdm(x: np.ndarray, method: str = "correlation") -> np.ndarray:
    """Upper triangle (i < j, row-major) of the RDM, as rsatoolbox's calc_rdm."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if method == "correlation":
        full = 1.0 - np.corrcoef(x)
    else:
        diff = x[:, None, :] - x[None, :, :]
        full = np.sum(diff * diff, axis=2) / d
    return full[np.triu_indices(n, 1)]


def rsa(x, y, rdm_method: str = "correlation", compare: str = "spearman") -> float:
    a, b = rdm(x, rdm_method), rdm(y, rdm_method)
    if compare == "spearman":
        a, b = rankdata(a), rankdata(b)
    return float(np.corrcoef(a, b)[0, 1])


def knn_sets(x: np.ndarray, k: int) -> list[set[int]]:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return [set(row.tolist()) for row in order]


def mutual_knn(x, y, k: int = 10) -> float:
    a, b = knn_sets(x, k), knn_sets(y, k)
    return float(np.mean([len(p & q) / k for p, q in zip(a, b, strict=True)]))


def netrep_whiten(x: np.ndarray, alpha: float, eigval_tol: float = 1e-7) -> np.ndarray:
    """netrep.utils.whiten(x, alpha, preserve_variance=True), written out: x @ Z."""
    if alpha > 1 - eigval_tol:
        return x
    lam, v = np.linalg.eigh(x.T @ x)
    lam = np.maximum(lam, eigval_tol)
    d = alpha + (1 - alpha) * lam ** (-0.5)
    new_var = np.sum(alpha**2 * lam + 2 * alpha * (1 - alpha) * lam**0.5 + (1 - alpha) ** 2)
    d *= np.sqrt(np.sum(lam) / new_var)
    return x @ ((v * d[None, :]) @ v.T)


def shape_angular(x, y, alpha: float = 0.5) -> float:
    """netrep's LinearMetric(alpha, center_columns=True, zero_pad=True,
    score_method="angular").fit_score(x, y), written out: zero-pad the narrower side, center,
    partially whiten each side, rotate x onto y by orthogonal Procrustes, angle between."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    width = max(x.shape[1], y.shape[1])
    x = np.pad(x, ((0, 0), (0, width - x.shape[1])))
    y = np.pad(y, ((0, 0), (0, width - y.shape[1])))
    xw = netrep_whiten(x - x.mean(axis=0), alpha)
    yw = netrep_whiten(y - y.mean(axis=0), alpha)
    u, _, vt = np.linalg.svd(xw.T @ yw)
    xa, ya = xw @ u, yw @ vt.T
    corr = np.dot(xa.ravel(), ya.ravel()) / (np.linalg.norm(xa) * np.linalg.norm(ya))
    return float(np.arccos(np.clip(corr, -1.0, 1.0)))
