"""Baseline (a): the naive loop the reference scripts amount to.

Load the two arrays, then each metric on its own, in float64, from the rows: every pair
recomputes its Gram/covariance products and whitening. Written straightforwardly on purpose.
"""

from __future__ import annotations

import numpy as np


def _prep(a):
    a = np.asarray(a, dtype=np.float64)
    return a - a.mean(axis=0)


def linear_cka(x, y):
    """Kornblith et al. (2019) feature_space_linear_cka."""
    x, y = _prep(x), _prep(y)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def linear_cka_debiased(x, y):
    """Kornblith et al. cka(gram_linear(x), gram_linear(y), debiased=True) (n x n Grams)."""
    def hsic(k, ell):
        n = k.shape[0]
        k, ell = k.copy(), ell.copy()
        np.fill_diagonal(k, 0.0)
        np.fill_diagonal(ell, 0.0)
        return (np.sum(k * ell) + k.sum() * ell.sum() / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * k.sum(axis=0) @ ell.sum(axis=0))
    x, y = _prep(x), _prep(y)
    k, ell = x @ x.T, y @ y.T
    return hsic(k, ell) / np.sqrt(hsic(k, k) * hsic(ell, ell))


def _whiten(a):
    evals, evecs = np.linalg.eigh(a.T @ a)
    inv = np.where(evals > 1e-10 * evals.max(), 1.0 / np.sqrt(np.abs(evals)), 0.0)
    return evecs @ np.diag(inv) @ evecs.T


def pwcca(x, y):
    """sim_metric pwcca_dist as a similarity: CCA by whitening, weights from x's variates."""
    x, y = _prep(x), _prep(y)
    wx, wy = _whiten(x), _whiten(y)
    u, rho, _ = np.linalg.svd(wx @ x.T @ y @ wy, full_matrices=True)
    variates = x @ wx @ u
    weights = np.abs(variates.T @ x).sum(axis=1)
    weights = weights / weights.sum()
    return float(weights[: rho.size] @ rho)


def procrustes(x, y):
    """sim_metric procrustes: unit-Frobenius centered data, 2 - 2 ||X^T Y||_*."""
    x, y = _prep(x), _prep(y)
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    return 2.0 - 2.0 * np.linalg.svd(x.T @ y, compute_uv=False).sum()


METRICS = {"linear_cka": linear_cka, "linear_cka_debiased": linear_cka_debiased,
           "pwcca": pwcca, "procrustes": procrustes}


def naive_pair(store, u, v, metrics):
    """{metric: value(u, v)}: load both units, then every metric from scratch."""
    x = store.read(*u).astype(np.float64)
    y = store.read(*v).astype(np.float64)
    return {m: float(METRICS[m](x, y)) for m in metrics}
