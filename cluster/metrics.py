"""Similarity metrics finished from streamed moments: per-unit caches, per-pair comparisons.

Every metric is a function of the centered moments Cxx, Cyy, Cxy (and, for debiased CKA, three
fourth-order sums), never of the rows themselves; the 1/(n-1) factors and the unit-Frobenius
scaling of the reference code cancel. The work that belongs to a unit (traces, ``||Cxx||_F``,
the eigendecomposition, ``Cxx^(-1/2)``, the SVCCA basis, the debiased self-HSIC) is done once
by :func:`prepare_unit`; :func:`compare_pair` does only the per-pair products and SVDs, and
returns both orders of an asymmetric metric (PWCCA) from one decomposition.
:func:`similarity_matrices` is the one pairwise driver.

Conventions follow the authors' code (docs/metrics.md): Kornblith et al. (2019)
``feature_space_linear_cka``; Song et al. (2012) unbiased HSIC for the debiased variant;
js-d/sim_metric (Ding et al. 2021) ``cca_decomp``, ``pwcca_dist`` (Morcos et al. 2018),
``mean_cca_corr``, ``mean_sq_cca_corr`` and ``procrustes``; SVCCA (Raghu et al. 2017) keeps,
per side, the fewest principal directions explaining a fraction (0.99) of the variance.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from repscope.cluster.linalg import inverse_sqrt, sorted_eigh
from repscope.cluster.moments import PairMoments, UnitMoments
from repscope.errors import InputError

__all__ = [
    "Metric",
    "METRICS",
    "FewRowsWarning",
    "UnitCache",
    "EIG_FLOOR",
    "check_metrics",
    "prepare_unit",
    "compare_pair",
    "similarity_matrices",
]

#: Eigenvalues of Cxx at or below ``EIG_FLOOR * max eigenvalue`` count as zero: their inverse
#: square root is 0 (dead and collinear directions carry no canonical correlation). float64
#: rounding leaves true zeros near 1e-16 * max, well below; real directions of the reference
#: activations are above 1e-7 * max.
EIG_FLOOR = 1e-10


@dataclass(frozen=True)
class Metric:
    """What the planner and finalizers need to know about one metric.

    Attributes
    ----------
    name : the interface name.
    direction : "similarity" (larger is more alike) or "distance" (0 is identical).
    symmetric : whether value(x, y) == value(y, x).
    needs_fourth : needs the fourth-order moments (``block_moments(..., fourth=True)``).
    needs_whitening : needs Cxx^(-1/2) (the CCA family): undefined for a zero-variance unit.
    """

    name: str
    direction: str
    symmetric: bool = True
    needs_fourth: bool = False
    needs_whitening: bool = False


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("linear_cka", "similarity"),
        Metric("linear_cka_debiased", "similarity", needs_fourth=True),
        Metric("mean_cca", "similarity", needs_whitening=True),
        Metric("mean_sq_cca", "similarity", needs_whitening=True),
        Metric("svcca", "similarity", needs_whitening=True),
        Metric("pwcca", "similarity", symmetric=False, needs_whitening=True),
        Metric("procrustes", "distance"),
    )
}

_CCA_FAMILY = ("mean_cca", "mean_sq_cca", "pwcca")


class FewRowsWarning(UserWarning):
    """A unit has at least as many features as rows: the CCA family is degenerate."""


def check_metrics(names: str | Iterable[str] | None) -> tuple[str, ...]:
    """Validated metric names, in the given order without repeats; None means all metrics.

    Raises
    ------
    InputError
        For an unknown name, suggesting the closest known one; for an empty selection.
    """
    if names is None:
        return tuple(METRICS)
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for name in names:
        if name not in METRICS:
            close = difflib.get_close_matches(str(name), list(METRICS), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InputError(
                f"unknown metric {name!r}{hint} (known: {', '.join(METRICS)})"
            )
        if name not in out:
            out.append(name)
    if not out:
        raise InputError(f"no metric selected (known: {', '.join(METRICS)})")
    return tuple(out)


# --- per-unit formulas -------------------------------------------------------------------


def whitening_matrix(evals: np.ndarray, evecs: np.ndarray, floor: float) -> np.ndarray:
    """``Cxx^(-1/2)`` by eigh, floored eigenvalues mapped to 0: ndarray of shape (p, p)."""
    return (evecs * inverse_sqrt(evals, floor)) @ evecs.T


def whitened_root(evals: np.ndarray, evecs: np.ndarray, floor: float) -> np.ndarray:
    """``Cxx Cxx^(-1/2)`` (= Cxx^(1/2) on the kept directions): ndarray of shape (p, p).

    Row j of ``Cxx Wx u_i`` is ``<x_j, h_i>``, the covariance of feature j with canonical
    variate h_i = X Wx u_i: what PWCCA weights by (Morcos et al. 2018).
    """
    return (evecs * (evals * inverse_sqrt(evals, floor))) @ evecs.T


def svcca_basis(
    evals: np.ndarray, evecs: np.ndarray, threshold: float, floor: float
) -> np.ndarray:
    """Whitened top principal directions ``U_k diag(lambda_k)^(-1/2)``: shape (p, k).

    k is the fewest eigendirections whose eigenvalues (variances) sum to at least
    ``threshold`` of the total (Raghu et al. 2017, as in the reference values). In that basis
    Cxx_k = diag(lambda_k), so CCA there needs no further whitening.
    """
    fraction = np.cumsum(evals) / evals.sum()
    k = int(np.searchsorted(fraction, threshold)) + 1
    k = min(k, int(np.count_nonzero(inverse_sqrt(evals, floor))))
    return evecs[:, :k] * inverse_sqrt(evals[:k], floor)


def debiased_hsic(
    xty_sq: float, sum_ab: float, trace_x: float, trace_y: float, n: int
) -> float:
    """Unbiased HSIC (Song et al. 2012) of centered linear kernels, times n(n-3).

    ``||X^T Y||_F^2 - n/(n-2) sum_i ||x_i||^2 ||y_i||^2 + tr(X^T X) tr(Y^T Y) / ((n-1)(n-2))``:
    the full U-statistic's row-sum terms collapse because centered kernels have zero row sums
    (Kornblith et al. 2019, ``_debiased_dot_product_similarity_helper``). The n(n-3) factor
    cancels in CKA.
    """
    return xty_sq - n / (n - 2.0) * sum_ab + trace_x * trace_y / ((n - 1.0) * (n - 2.0))


@dataclass(frozen=True)
class UnitCache:
    """Per-unit work, done once and reused for every pair containing the unit.

    Attributes
    ----------
    name : the unit's name, for messages.
    n : rows; dim : features p.
    metrics : the metric names this cache was prepared for.
    trace : tr Cxx. fro : ||Cxx||_F.
    evals : ndarray of shape (p,), descending; evecs : ndarray of shape (p, p). Both None when
        no metric needs them (CKA and Procrustes only: no O(p^3) work per unit).
    whitening : ndarray of shape (p, p), Cxx^(-1/2) with the floor (CCA family), else None.
    root : ndarray of shape (p, p), Cxx Cxx^(-1/2) (PWCCA weights), else None.
    svcca : ndarray of shape (p, k), whitened top-k principal directions, else None.
    self_hsic : sqrt of the debiased self-HSIC (debiased CKA's normaliser), else None.
    """

    name: str
    n: int
    dim: int
    metrics: tuple[str, ...]
    trace: float
    fro: float
    evals: np.ndarray | None
    evecs: np.ndarray | None
    whitening: np.ndarray | None = None
    root: np.ndarray | None = None
    svcca: np.ndarray | None = None
    self_hsic: float | None = None

    @property
    def svcca_dims(self) -> int | None:
        """Principal directions kept by SVCCA (None unless prepared for it)."""
        return None if self.svcca is None else self.svcca.shape[1]


def _is_constant(m: UnitMoments) -> bool:
    """Zero variance: every feature constant, up to rounding of its mean."""
    trace = float(np.trace(m.cxx))
    scale = float(np.max(np.abs(m.mean), initial=0.0))
    return trace <= m.n * m.cxx.shape[0] * (1e-12 * scale) ** 2


def prepare_unit(
    m: UnitMoments,
    metrics: Iterable[str] | None = None,
    *,
    svcca_threshold: float = 0.99,
    eig_floor: float = EIG_FLOOR,
    name: str = "unit",
) -> UnitCache:
    """Per-unit work for ``metrics``: one eigendecomposition of Cxx, cached matrices.

    Parameters
    ----------
    m : the unit's moments (n rows, p features).
    metrics : metric names (None: all).
    svcca_threshold : fraction of variance SVCCA keeps, in (0, 1].
    eig_floor : relative eigenvalue floor of the whitening (see :data:`EIG_FLOOR`).
    name : the unit's name in errors and warnings, e.g. "model_a/layer3".

    Raises
    ------
    InputError
        Zero-variance unit (every metric is 0/0 there, and CCA undefined); fewer than 2 rows
        (4 for debiased CKA); debiased CKA without fourth-order moments; bad parameters.

    Warns
    -----
    FewRowsWarning
        When p >= n and a CCA-family metric is asked: Cxx is singular, the floor drops its null
        space and the canonical correlations of the remaining directions tend to 1.

    Notes
    -----
    Cost O(p^3) (eigh, two p x p products); memory a few p x p matrices.
    """
    metrics = check_metrics(metrics)
    if not 0.0 < svcca_threshold <= 1.0:
        raise InputError(f"svcca_threshold must be in (0, 1], got {svcca_threshold}")
    if not 0.0 <= eig_floor < 1.0:
        raise InputError(f"eig_floor must be in [0, 1), got {eig_floor}")
    n, p = m.n, m.cxx.shape[0]
    if n < 2:
        raise InputError(f"unit {name!r} has {n} rows; similarity needs at least 2")
    if _is_constant(m):
        raise InputError(
            f"unit {name!r} has zero variance (all {p} features constant over {n} rows): "
            f"{', '.join(metrics)} undefined; drop the unit or check the activations"
        )
    whiten = any(METRICS[k].needs_whitening for k in metrics)
    if whiten and p >= n:
        warnings.warn(
            f"unit {name!r} has {p} features but only {n} rows: CCA-family metrics are "
            "degenerate (canonical correlations near 1); use more rows or SVCCA/CKA",
            FewRowsWarning,
            stacklevel=2,
        )
    evals = evecs = None
    if whiten:
        evals, evecs = sorted_eigh(m.cxx)
    trace = float(np.trace(m.cxx))
    fields: dict = {}
    if any(k in _CCA_FAMILY for k in metrics):
        fields["whitening"] = whitening_matrix(evals, evecs, eig_floor)
    if "pwcca" in metrics:
        fields["root"] = whitened_root(evals, evecs, eig_floor)
    if "svcca" in metrics:
        fields["svcca"] = svcca_basis(evals, evecs, svcca_threshold, eig_floor)
    fro = float(np.linalg.norm(m.cxx))
    if "linear_cka_debiased" in metrics:
        if m.sum_a2 is None:
            raise InputError(
                f"unit {name!r}: linear_cka_debiased needs fourth-order moments; accumulate "
                "with block_moments(..., fourth=True)"
            )
        if n < 4:
            raise InputError(f"unit {name!r} has {n} rows; linear_cka_debiased needs >= 4")
        fields["self_hsic"] = float(np.sqrt(debiased_hsic(fro**2, m.sum_a2, trace, trace, n)))
    return UnitCache(name, n, p, metrics, trace, fro, evals, evecs, **fields)


# --- per-pair formulas -------------------------------------------------------------------


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
    if any(k in _CCA_FAMILY for k in metrics):
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


def similarity_matrices(
    units: Sequence[UnitMoments | None],
    cross: Callable[[int, int], PairMoments],
    metrics: Iterable[str] | None = None,
    *,
    names: Sequence[str] | None = None,
    svcca_threshold: float = 0.99,
    eig_floor: float = EIG_FLOOR,
    pairs: Iterable[tuple[int, int]] | None = None,
    threads: int = 1,
    caches: dict[int, UnitCache] | None = None,
) -> dict[str, np.ndarray]:
    """The pairwise driver: full (U, U) matrices per metric.

    Parameters
    ----------
    units : the U units' moments (None for a unit whose cache is in ``caches``).
    cross : ``cross(i, j)`` for i <= j returns the PairMoments of units i and j (for i == j,
        Cxy = Cxx of the unit).
    metrics : names (None: all).
    names : unit names for messages (default "unit i").
    pairs : the (i, j) to compute (either order; default all i <= j); the others are NaN, for
        incremental runs.
    threads : prepare units and compare pairs on this many threads (one BLAS thread each).
    caches : per-unit work already done, by unit index; units prepared here are added to it,
        so a caller finishing a job tile by tile prepares each unit once.

    Returns
    -------
    dict mapping metric name to ndarray of shape (U, U); entry [i, j] is value(unit i, unit j)
    (PWCCA: weighted by unit i's canonical variates).

    Notes
    -----
    U prepares (each O(p^3), only for units in ``pairs``) and one compare per pair.
    """
    metrics = check_metrics(metrics)
    count = len(units)
    names = [f"unit {i}" for i in range(count)] if names is None else list(names)
    if len(names) != count:
        raise InputError(f"{len(names)} names for {count} units")
    if pairs is None:
        todo = [(i, j) for i in range(count) for j in range(i, count)]
    else:
        todo = []
        for i, j in pairs:
            if not (0 <= i < count and 0 <= j < count):
                raise InputError(f"pair ({i}, {j}) out of range for {count} units")
            todo.append((min(i, j), max(i, j)))
        todo = sorted(set(todo))
    def prepare(i: int) -> UnitCache:
        return prepare_unit(units[i], metrics, svcca_threshold=svcca_threshold,
                            eig_floor=eig_floor, name=names[i])

    def compare_chunk(chunk: list[tuple[int, int]]) -> list[dict]:
        moments = [cross(i, j) for i, j in chunk]
        nuclear = (nuclear_norms([m.cxy for m in moments]) if "procrustes" in metrics
                   else [None] * len(chunk))
        return [compare_pair(caches[i], caches[j], m, metrics, nuclear=nu)
                for (i, j), m, nu in zip(chunk, moments, nuclear, strict=True)]

    caches = {} if caches is None else caches
    needed = sorted({k for pair in todo for k in pair} - set(caches))
    # Pairs in chunks of up to 64 (and 64 MiB of cross moments), so Procrustes' SVDs of a
    # chunk are one stacked call (nuclear_norms).
    widest = max((units[i].cxx.shape[0] if units[i] is not None else caches[i].dim
                  for pair in todo for i in pair), default=1)
    size = max(1, min(64, (64 << 20) // (8 * widest * widest)))
    chunks = [todo[k:k + size] for k in range(0, len(todo), size)]
    if threads > 1:
        # Many small LAPACK calls: one BLAS thread each, `threads` of them at once, beats one
        # call at a time with threaded BLAS (numpy releases the GIL for stacks and for
        # large matrices, hence the chunks).
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
            caches.update(zip(needed, pool.map(prepare, needed), strict=True))
            values = [v for part in pool.map(compare_chunk, chunks) for v in part]
    else:
        caches.update({i: prepare(i) for i in needed})
        values = [v for chunk in chunks for v in compare_chunk(chunk)]

    out = {k: np.full((count, count), np.nan) for k in metrics}
    for (i, j), pair in zip(todo, values, strict=True):
        for k, (xy, yx) in pair.items():
            out[k][i, j] = xy
            out[k][j, i] = yx
    return out
