"""Per-pair work: each metric's formula from two units' caches and their cross moments.

:func:`compare_pair` finishes one pair, returning both orders of an asymmetric metric (PWCCA)
from one decomposition. Formulas (Kornblith et al. 2019; Song et al. 2012; sim_metric's
``cca_decomp``, ``pwcca_dist``, ``mean_cca_corr``, ``procrustes``) in docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from repscope.cluster.caches import UnitCache, check_finite, debiased_hsic
from repscope.cluster.moments import PairMoments
from repscope.cluster.registry import CCA_FAMILY, METRICS, check_metrics
from repscope.errors import InputError

__all__ = [
    "linear_cka",
    "linear_cka_debiased",
    "pwcca_weights",
    "procrustes",
    "nuclear_norms",
    "canonical_pairs",
    "compare_pair",
    "self_pair",
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


def pwcca_weights(root: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """PWCCA's weights of the k canonical variates that exist: shape (k,), summing to 1.

    ``root`` (p, r) is the unit's ``Cxx basis`` and ``directions`` (r, k) its first k =
    min(rank x, rank y) canonical directions in that basis, so column i of ``root @
    directions`` holds the covariances of the p features with canonical variate h_i.
    alpha_i = sum_j |<h_i, x_j>| (Morcos et al. 2018), normalised over the k variates; the
    directions without a partner (there are none beyond k) and any basis completion play
    no part, so the value does not depend on LAPACK's choices (docs/metrics.md).
    """
    weights = np.abs(root @ directions).sum(axis=0)
    return weights / weights.sum()


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


def _smaller_grams(blocks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``M M^T`` or ``M^T M``, whichever is smaller, of each matrix (one GEMM each)."""
    return [b @ b.T if b.shape[0] <= b.shape[1] else b.T @ b for b in blocks]


def _stacked(fn, grams: Sequence[np.ndarray]) -> list:
    """``fn`` (a numpy.linalg routine) on each matrix, one stacked LAPACK call per shape:
    numpy holds the GIL through the decomposition of a single small matrix but not through
    a stack, so threads finishing pairs then run in parallel."""
    out: list = [None] * len(grams)
    by_shape: dict[tuple, list[int]] = {}
    for k, g in enumerate(grams):
        by_shape.setdefault(g.shape, []).append(k)
    for ks in by_shape.values():
        result = fn(np.stack([grams[k] for k in ks]))
        for pos, k in enumerate(ks):
            out[k] = (tuple(r[pos] for r in result) if isinstance(result, tuple)
                      else result[pos])
    return out


def nuclear_norms(blocks: Sequence[np.ndarray], exact: bool = True) -> list[float]:
    """The nuclear norm (sum of singular values) of each matrix, stacked per shape.

    ``exact``: from the SVD's values. Otherwise from the eigenvalues of the smaller Gram
    (``sqrt(eigvalsh(M^T M))``, about 3x faster at widths 256-1,024), where a singular value
    that is truly 0 comes back as about sqrt(eps) ||M|| (1.5e-8 relative): below the
    rounding of float32 statistics, so the pipeline uses it for them only
    (docs/metrics.md, section 4).
    """
    if exact:
        return [float(v.sum()) for v in
                _stacked(lambda a: np.linalg.svd(a, compute_uv=False), list(blocks))]
    spectra = _stacked(np.linalg.eigvalsh, _smaller_grams(blocks))
    return [float(np.sqrt(np.maximum(e, 0.0)).sum()) for e in spectra]


def canonical_pairs(blocks: Sequence[np.ndarray], vectors: bool,
                    exact: bool = True) -> list[tuple]:
    """Canonical correlations of each whitened cross moment ``M = Bx^T Cxy By`` (rx, ry):
    ``(rho, u, v)`` with rho (k,) descending, k = min(rx, ry), and with ``vectors`` the
    directions u (rx, k), v (ry, k) (else None). Stacked LAPACK calls per shape.

    ``exact``: from the thin SVD. Otherwise from the eigendecomposition of the smaller Gram
    (``M M^T`` when rx <= ry): its eigenvalues are rho^2 (absolute error eps, since rho <=
    1, so a rho that is truly 0 comes back near sqrt(eps)) and its eigenvectors one side's
    directions; the other side's are ``M^T u`` normalised (``M^T u_i = rho_i v_i``). The
    same up to rounding, signs and rotations within equal correlations, which PWCCA's
    absolute weights and the correlations ignore; about 2x faster than the SVD with
    vectors and 3x without. The pipeline uses it for float32 statistics only.
    """
    if exact:
        if not vectors:
            return [(rho, None, None) for rho in
                    _stacked(lambda a: np.linalg.svd(a, compute_uv=False), list(blocks))]
        return [(rho, u, vt.T) for u, rho, vt in
                _stacked(lambda a: np.linalg.svd(a, full_matrices=False), list(blocks))]
    grams = _smaller_grams(blocks)
    if not vectors:
        return [(np.sqrt(np.maximum(e[::-1], 0.0)), None, None)
                for e in _stacked(np.linalg.eigvalsh, grams)]
    out = []
    for m, (evals, evecs) in zip(blocks, _stacked(np.linalg.eigh, grams), strict=True):
        rho = np.sqrt(np.maximum(evals[::-1], 0.0))
        side = evecs[:, ::-1]
        other = m.T @ side if m.shape[0] <= m.shape[1] else m @ side
        norms = np.linalg.norm(other, axis=0)
        other = other / np.where(norms > 0, norms, 1.0)
        u, v = (side, other) if m.shape[0] <= m.shape[1] else (other, side)
        out.append((rho, u, v))
    return out


def self_pair(c: UnitCache, metrics: Iterable[str]) -> dict[str, tuple[float, float]]:
    """A unit against itself, from the definitions (no decomposition): ``{metric: (v, v)}``.

    CKA (plain and debiased) is 1 and Procrustes 0 (Cxx is positive semi-definite, so its
    nuclear norm is its trace). In the whitened basis of the r kept directions the cross
    moments are ``basis^T Cxx basis = I_r``: r canonical correlations of 1, so mean CCA and
    mean squared CCA are r / p under the published convention, PWCCA and SVCCA are 1.
    What computing them would add is rounding noise, and a decomposition per unit.
    """
    r = c.rank if c.rank is not None else c.dim
    closed = {"linear_cka": 1.0, "linear_cka_debiased": 1.0, "procrustes": 0.0,
              "mean_cca": r / c.dim, "mean_sq_cca": r / c.dim, "pwcca": 1.0, "svcca": 1.0}
    return {k: (closed[k], closed[k]) for k in check_metrics(metrics)}


def compare_pair(
    cx: UnitCache,
    cy: UnitCache,
    m: PairMoments,
    metrics: Iterable[str] | None = None,
    *,
    nuclear: float | None = None,
    whitened: np.ndarray | None = None,
    cca: tuple | None = None,
) -> dict[str, tuple[float, float]]:
    """Per-pair finalisation: ``{metric: (value(x, y), value(y, x))}``.

    Parameters
    ----------
    cx, cy : caches of units X (p features) and Y (q features), prepared for ``metrics``.
    m : their cross moments, Cxy of shape (p, q).
    metrics : names (None: those both caches were prepared for).
    nuclear : ||Cxy||_* for Procrustes, if already computed (None: computed here).
    whitened, cca : ``Bx^T Cxy By`` and its :func:`canonical_pairs` entry, if already
        computed (the pairwise driver stacks them over a chunk of pairs).

    Both orders come from one decomposition: with Bx (p, rx) and By (q, ry) the whitened
    bases of the units' kept directions, ``Bx^T Cxy By = U S V^T`` (:func:`canonical_pairs`)
    gives the k = min(rx, ry) canonical correlations S, x's canonical directions U (rx, k)
    and y's V (ry, k). Only PWCCA differs between the orders. SVCCA reads the top-left block
    of the same product (its bases are the first columns of Bx, By). Cost: O(p q r + r^3)
    per pair (r the larger rank) and one eigvalsh of a Gram of Cxy for Procrustes.

    Raises
    ------
    InputError
        Mismatched units or moments; a non-finite value (naming the pair).
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
    exact = "float64" in (cx.precision, cy.precision)  # SVDs for float64 statistics

    def both(name: str, value: float) -> None:
        out[name] = (value, value)

    if "linear_cka" in metrics:
        both("linear_cka", linear_cka(m.cxy, cx, cy))
    if "linear_cka_debiased" in metrics:
        both("linear_cka_debiased", linear_cka_debiased(m, cx, cy))
    if whitened is None and any(METRICS[k].needs_whitening for k in metrics):
        # The cross moments in the whitened bases of the kept directions: (rank x, rank y).
        whitened = cx.basis.T @ m.cxy @ cy.basis
    if any(k in CCA_FAMILY for k in metrics):
        # Published convention: the mean runs over min(p, q); directions below the rank
        # cut (and beyond min(rank x, rank y)) count as correlation 0.
        width = min(cx.dim, cy.dim)
        rho, u, v = cca or canonical_pairs([whitened], "pwcca" in metrics, exact)[0]
        if "pwcca" in metrics:
            out["pwcca"] = (float(pwcca_weights(cx.root, u) @ rho),
                            float(pwcca_weights(cy.root, v) @ rho))
        if "mean_cca" in metrics:
            both("mean_cca", float(rho.sum() / width))
        if "mean_sq_cca" in metrics:
            both("mean_sq_cca", float(np.sum(rho * rho) / width))
    if "svcca" in metrics:
        block = whitened[: cx.svcca_dims, : cy.svcca_dims]
        both("svcca", float(np.linalg.svd(block, compute_uv=False).mean()))
    if "procrustes" in metrics:
        both("procrustes", procrustes(m.cxy, cx, cy, nuclear))
    for k, (xy, yx) in out.items():
        check_finite([xy, yx], f"{k} of units {cx.name!r} and {cy.name!r}")
    return {k: out[k] for k in metrics}
