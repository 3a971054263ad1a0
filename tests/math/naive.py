"""An independent, straightforward float64 implementation of every metric, for tests only.

It works on the rows in memory, the way the reference scripts do: center each feature, scale
each matrix to unit Frobenius norm, then the textbook formula. Debiased CKA goes through the
n x n Gram matrices and the full U-statistic of Song et al. (2012), not the feature-space
shortcut the product uses; CCA and SVCCA whiten the data matrices directly.

Conventions (docs/metrics.md): eigenvalues of a^T a at or below 1e-10 of the largest are
null (float64 data, or float32 data whose null directions float64 sees near 1e-16); mean CCA
and mean squared CCA average over min(p, q) with null directions counting 0; PWCCA weights
the k = min(rank x, rank y) canonical variates that exist, normalised over those k.
"""

from __future__ import annotations

import numpy as np

FLOOR = 1e-10


def _prepare(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    a = a - a.mean(axis=0)
    return a / np.linalg.norm(a)


def _unbiased_hsic(k: np.ndarray, ell: np.ndarray) -> float:
    n = k.shape[0]
    k, ell = k.copy(), ell.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(ell, 0.0)
    # tr(K L) = sum(K * L) for symmetric K, L; 1^T K 1 = sum(K); 1^T K L 1 = (K 1).(L 1):
    # the textbook U-statistic in O(n^2) instead of the n^3 products.
    return (
        np.sum(k * ell)
        + k.sum() * ell.sum() / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (k.sum(axis=1) @ ell.sum(axis=1))
    ) / (n * (n - 3))


def _whiten(a: np.ndarray) -> tuple[np.ndarray, int]:
    """(a^T a)^(-1/2) with eigenvalues <= FLOOR * max dropped, and the rank kept."""
    evals, evecs = np.linalg.eigh(a.T @ a)
    keep = evals > FLOOR * evals.max()
    inv = np.where(keep, 1.0 / np.sqrt(np.abs(evals)), 0.0)
    return evecs @ np.diag(inv) @ evecs.T, int(keep.sum())


def _cca(a: np.ndarray, b: np.ndarray):
    (wa, ra), (wb, rb) = _whiten(a), _whiten(b)
    u, rho, vt = np.linalg.svd(wa @ a.T @ b @ wb, full_matrices=True)
    # canonical variates of a: columns of a wa u; their inner products with a's features
    variates_a = a @ wa @ u
    variates_b = b @ wb @ vt.T
    return rho, variates_a, variates_b, min(ra, rb)


def _pwcca(a: np.ndarray, variates: np.ndarray, rho: np.ndarray, k: int) -> float:
    """Weights of the first k variates (those with a partner), normalised over them."""
    weights = np.abs(variates[:, :k].T @ a).sum(axis=1)
    return float(weights / weights.sum() @ rho[:k])


def _top_pcs(a: np.ndarray, threshold: float) -> np.ndarray:
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    fraction = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(fraction >= threshold)) + 1
    return u[:, :k] * s[:k]


def naive_metrics(x: np.ndarray, y: np.ndarray, svcca_threshold: float = 0.99,
                  debiased: bool = True) -> dict:
    """{metric: value(x, y)} plus "pwcca_yx" for the other direction (debiased CKA costs
    n^2 memory: ``debiased=False`` leaves it out)."""
    x, y = _prepare(x), _prepare(y)
    out = {}
    out["linear_cka"] = np.linalg.norm(x.T @ y) ** 2 / (
        np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    )
    if debiased:
        k, ell = x @ x.T, y @ y.T
        out["linear_cka_debiased"] = _unbiased_hsic(k, ell) / np.sqrt(
            _unbiased_hsic(k, k) * _unbiased_hsic(ell, ell)
        )
    rho, variates_x, variates_y, k = _cca(x, y)
    out["mean_cca"] = rho.mean()
    out["mean_sq_cca"] = np.mean(rho**2)
    out["pwcca"] = _pwcca(x, variates_x, rho, k)
    out["pwcca_yx"] = _pwcca(y, variates_y, rho, k)
    rho_k, _, _, _ = _cca(_top_pcs(x, svcca_threshold), _top_pcs(y, svcca_threshold))
    out["svcca"] = rho_k.mean()
    out["procrustes"] = 2.0 - 2.0 * np.linalg.svd(x.T @ y, compute_uv=False).sum()
    return {key: float(v) for key, v in out.items()}
