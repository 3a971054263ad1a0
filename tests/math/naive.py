"""An independent, straightforward float64 implementation of every metric, for tests only.

It works on the rows in memory, the way the reference scripts do: center each feature, scale
each matrix to unit Frobenius norm, then the textbook formula. Debiased CKA goes through the
n x n Gram matrices and the full U-statistic of Song et al. (2012), not the feature-space
shortcut the product uses; CCA and SVCCA whiten the data matrices directly.
"""

from __future__ import annotations

import numpy as np


def _prepare(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    a = a - a.mean(axis=0)
    return a / np.linalg.norm(a)


def _unbiased_hsic(k: np.ndarray, ell: np.ndarray) -> float:
    n = k.shape[0]
    k, ell = k.copy(), ell.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(ell, 0.0)
    ones = np.ones(n)
    return (
        np.trace(k @ ell)
        + (ones @ k @ ones) * (ones @ ell @ ones) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (ones @ k @ ell @ ones)
    ) / (n * (n - 3))


def _whiten(a: np.ndarray) -> np.ndarray:
    """(a^T a)^(-1/2), eigenvalues <= 1e-10 * max dropped."""
    evals, evecs = np.linalg.eigh(a.T @ a)
    inv = np.where(evals > 1e-10 * evals.max(), 1.0 / np.sqrt(np.abs(evals)), 0.0)
    return evecs @ np.diag(inv) @ evecs.T


def _cca(a: np.ndarray, b: np.ndarray):
    wa, wb = _whiten(a), _whiten(b)
    u, rho, vt = np.linalg.svd(wa @ a.T @ b @ wb, full_matrices=True)
    # canonical variates of a: columns of a wa u; their inner products with a's features
    variates_a = a @ wa @ u
    variates_b = b @ wb @ vt.T
    return rho, variates_a, variates_b


def _pwcca(a: np.ndarray, variates: np.ndarray, rho: np.ndarray) -> float:
    weights = np.abs(variates.T @ a).sum(axis=1)
    weights = weights / weights.sum()
    return float(weights[: rho.size] @ rho)


def _top_pcs(a: np.ndarray, threshold: float) -> np.ndarray:
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    fraction = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(fraction >= threshold)) + 1
    return u[:, :k] * s[:k]


def naive_metrics(x: np.ndarray, y: np.ndarray, svcca_threshold: float = 0.99) -> dict:
    """{metric: value(x, y)} plus "pwcca_yx" for the other direction."""
    x, y = _prepare(x), _prepare(y)
    out = {}
    out["linear_cka"] = np.linalg.norm(x.T @ y) ** 2 / (
        np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    )
    k, ell = x @ x.T, y @ y.T
    out["linear_cka_debiased"] = _unbiased_hsic(k, ell) / np.sqrt(
        _unbiased_hsic(k, k) * _unbiased_hsic(ell, ell)
    )
    rho, variates_x, variates_y = _cca(x, y)
    out["mean_cca"] = rho.mean()
    out["mean_sq_cca"] = np.mean(rho**2)
    out["pwcca"] = _pwcca(x, variates_x, rho)
    out["pwcca_yx"] = _pwcca(y, variates_y, rho)
    rho_k, _, _ = _cca(_top_pcs(x, svcca_threshold), _top_pcs(y, svcca_threshold))
    out["svcca"] = rho_k.mean()
    out["procrustes"] = 2.0 - 2.0 * np.linalg.svd(x.T @ y, compute_uv=False).sum()
    return {key: float(v) for key, v in out.items()}
