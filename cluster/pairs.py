"""Per-pair work: each metric's formula from two units' caches and their cross moments.

:func:`compare_pair` finishes one pair, returning both orders of an asymmetric metric (PWCCA)
from one decomposition. Formulas (Kornblith et al. 2019; Song et al. 2012; sim_metric's
``cca_decomp``, ``pwcca_dist``, ``mean_cca_corr``, ``procrustes``) in docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from repscope.cluster.caches import UnitCache, debiased_hsic
from repscope.cluster.moments import PairMoments
from repscope.cluster.registry import CCA_FAMILY, check_metrics
from repscope.errors import InputError

__all__ = [
    "linear_cka",
    "linear_cka_debiased",
    "pwcca_weights",
    "procrustes",
    "nuclear_norms",
    "compare_pair",
]

def linear_cka(cxy: np.ndarray, cx: UnitCache, cy: UnitCache) -> float:
    """``||Cxy||_F^2 / (||Cxx||_F ||Cyy||_F)`` (Kornblith et al. 2019, feature space)."""
    return float(np.sum(cxy * cxy) / (cx.fro * cy.fro))


def linear_cka_debiased(m: PairMoments, cx: UnitCache, cy: UnitCache) -> float:
    """Debiased linear CKA: unbiased HSIC(x, y) / sqrt(HSIC(x, x) HSIC(y, y))."""
    if m.sum_ab is None:
        raise InputError(
            f"pair ({cx.name!r}, {cy.name!r}): linear_cka_debiased needs fourth-order "
            "moments; accumulate with block_moments(..., fourth=True)"
        )
    hsic = debiased_hsic(float(np.sum(m.cxy * m.cxy)), m.sum_ab, cx.trace, cy.trace, cx.n)
    return float(hsic / (cx.self_hsic * cy.self_hsic))


def pwcca_weights(root: np.ndarray, directions: np.ndarray, k: int) -> np.ndarray:
    """Weights alpha_i = sum_j |(Cxx Wx U)_ji| over all p directions, normalised, first k.

    As sim_metric's ``pwcca_dist``: the normaliser runs over every column of the full U (the
    p - min(p, q) directions without a correlation included), then the weights are truncated.
    """
    weights = np.abs(root @ directions).sum(axis=0)
    return weights[:k] / weights.sum()


def procrustes(cxy: np.ndarray, cx: UnitCache, cy: UnitCache,
               nuclear: float | None = None) -> float:
    """Squared orthogonal Procrustes distance ``2 - 2 ||Cxy||_* / sqrt(tr Cxx tr Cyy)``.

    After centering and scaling each side to unit Frobenius norm, min_R ||X - Y R||_F^2 over
    orthogonal R is 2 - 2 ||X^T Y||_* (Ding et al. 2021). In [0, 2]. ``nuclear``:
    ||Cxy||_* if already computed (see :func:`nuclear_norms`).
    """
    if nuclear is None:
        nuclear = nuclear_norms([cxy])[0]
    return float(2.0 - 2.0 * nuclear / np.sqrt(cx.trace * cy.trace))


def nuclear_norms(blocks: Sequence[np.ndarray]) -> list[float]:
    """The nuclear norm (sum of singular values) of each matrix.

    Matrices of one shape go through one stacked LAPACK call: numpy holds the GIL through
    the SVD of a single small matrix but not through a stack, so threads finishing pairs
    then run in parallel (256 x 256 on two threads: 5.2 ms per matrix one by one, 2.5 ms
    stacked).
    """
    out = [0.0] * len(blocks)
    by_shape: dict[tuple, list[int]] = {}
    for k, block in enumerate(blocks):
        by_shape.setdefault(block.shape, []).append(k)
    for ks in by_shape.values():
        stack = np.stack([blocks[k] for k in ks])
        for k, value in zip(ks, np.linalg.svd(stack, compute_uv=False).sum(axis=1),
                            strict=True):
            out[k] = float(value)
    return out


def compare_pair(
    cx: UnitCache,
    cy: UnitCache,
    m: PairMoments,
    metrics: Iterable[str] | None = None,
    *,
    nuclear: float | None = None,
) -> dict[str, tuple[float, float]]:
    """Per-pair finalisation: ``{metric: (value(x, y), value(y, x))}``.

    Parameters
    ----------
    cx, cy : caches of units X (p features) and Y (q features), prepared for ``metrics``.
    m : their cross moments, Cxy of shape (p, q).
    metrics : names (None: those both caches were prepared for).
    nuclear : ||Cxy||_* for Procrustes, if already computed (None: computed here).

    Both orders come from one decomposition: the full SVD ``Wx Cxy Wy = U S V^T`` gives the
    canonical correlations S (length min(p, q)), x's canonical directions U (p x p) and y's V
    (q x q). Only PWCCA differs between the orders. Cost: O((p + q)^3) per pair (the whitened
    product, one SVD for the CCA family, one for SVCCA, one of Cxy for Procrustes).
    """
    if metrics is None:
        metrics = tuple(k for k in cx.metrics if k in cy.metrics)
    metrics = check_metrics(metrics)
    for c in (cx, cy):
        missing = [k for k in metrics if k not in c.metrics]
        if missing:
            raise InputError(f"unit {c.name!r} was not prepared for {', '.join(missing)}")
    if cx.n != cy.n:
        raise InputError(f"units {cx.name!r} and {cy.name!r} have {cx.n} and {cy.n} rows")
    if m.cxy.shape != (cx.dim, cy.dim):
        raise InputError(
            f"cross moments of shape {m.cxy.shape} do not match units {cx.name!r} "
            f"({cx.dim} features) and {cy.name!r} ({cy.dim} features)"
        )
    out: dict[str, tuple[float, float]] = {}

    def both(name: str, value: float) -> None:
        out[name] = (value, value)

    if "linear_cka" in metrics:
        both("linear_cka", linear_cka(m.cxy, cx, cy))
    if "linear_cka_debiased" in metrics:
        both("linear_cka_debiased", linear_cka_debiased(m, cx, cy))
    if any(k in CCA_FAMILY for k in metrics):
        whitened = cx.whitening @ m.cxy @ cy.whitening
        if "pwcca" in metrics:
            u, rho, vt = np.linalg.svd(whitened, full_matrices=True)
            k = rho.size
            xy = float(pwcca_weights(cx.root, u, k) @ rho)
            yx = float(pwcca_weights(cy.root, vt.T, k) @ rho)
            out["pwcca"] = (xy, yx)
        else:
            rho = np.linalg.svd(whitened, compute_uv=False)
        if "mean_cca" in metrics:
            both("mean_cca", float(rho.mean()))
        if "mean_sq_cca" in metrics:
            both("mean_sq_cca", float(np.mean(rho * rho)))
    if "svcca" in metrics:
        rho_k = np.linalg.svd(cx.svcca.T @ m.cxy @ cy.svcca, compute_uv=False)
        both("svcca", float(rho_k.mean()))
    if "procrustes" in metrics:
        both("procrustes", procrustes(m.cxy, cx, cy, nuclear))
    return {k: out[k] for k in metrics}
