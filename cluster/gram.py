"""Sample space: metrics finished from centered Gram matrices instead of feature moments.

With n rows and a unit of d features, the centered Gram ``K = Xc Xc^T`` (n x n) costs n^2 d
once per unit, while feature-space moments cost n d^2 per unit pair: with a few thousand rows
and wide layers (n << d) the Grams are far cheaper (docs/design.md, section 4). The work
splits as netrep's ``partial_fit`` / ``finalize``: :func:`unit_gram` once per unit (the
Gram, and its eigendecomposition when a metric needs one), then small per-pair work
(:func:`gram_products`, :func:`pair_metrics`).

Every quantity here equals its feature-space counterpart (:mod:`repscope.cluster.caches`,
:mod:`repscope.cluster.pairs`):

- ``<K, L>_F = ||Xc^T Yc||_F^2`` and ``||K||_F = ||Cxx||_F``: linear CKA (Kornblith et al.
  2019) is ``<K, L> / (||K|| ||L||)``.
- Debiased CKA (Song et al. 2012): with centered linear kernels, ``K~`` the Gram without its
  diagonal, ``tr(K~ L~) = <K, L> - diag(K).diag(L)``, ``1^T K~ 1 = -tr K`` and
  ``1^T K~ L~ 1 = diag(K).diag(L)``, so the unbiased HSIC needs only the off-diagonal inner
  product, the diagonals and the traces.
- CCA family: ``K = U S^2 U^T``; the columns of U with eigenvalues above the floor are an
  orthonormal basis of X's column space, and the canonical correlations are the singular
  values of ``Ux^T Uy`` (zeros pad them to min(p, q), as the floored directions do there).
- SVCCA: the top-k columns of U (k from the eigenvalues, which are Cxx's nonzero ones).
- Procrustes: the singular values of ``Xc^T Yc`` are those of ``Sx Ux^T Uy Sy``; its nuclear
  norm is that of ``K^(1/2) L^(1/2)``.

PWCCA weights canonical variates by their covariance with each *feature* (an L1 norm in the
feature basis), which Grams do not determine: it has no sample-space form here.

Precision: the Gram is one float32 (or float64) syrk of the centered rows; its diagonal is
kept apart in float64 and the inner products of Grams are summed in float64, so debiased
CKA (which subtracts the diagonal's large share of ``<K, L>``) loses no digits to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from repscope.cluster.caches import check_finite, svcca_dims
from repscope.cluster.rank import AmbiguousRankError, decide_rank, spectrum, zero_variance
from repscope.cluster.registry import check_metrics
from repscope.errors import InputError

__all__ = [
    "SAMPLE_METRICS",
    "BASIS_METRICS",
    "UnitGram",
    "GramTile",
    "unit_gram",
    "gram_products",
    "pair_metrics",
    "gram_tile",
    "gram_similarity_matrices",
    "sample_space_metrics",
    "sample_space_flops",
]

#: Metrics with a sample-space form (all but PWCCA).
SAMPLE_METRICS = ("linear_cka", "linear_cka_debiased", "mean_cca", "mean_sq_cca", "svcca",
                  "procrustes")
#: Metrics finished from each unit's Gram eigendecomposition (O(n^3) per unit).
BASIS_METRICS = ("mean_cca", "mean_sq_cca", "svcca", "procrustes")
# float64 Gram entries of all units in flight per slab of gram_products.
_SLAB_BYTES = 128 << 20


def check_sample_metrics(metrics: Iterable[str] | None) -> tuple[str, ...]:
    """Validated names, refusing those without a sample-space form (PWCCA)."""
    metrics = check_metrics(SAMPLE_METRICS if metrics is None else metrics)
    unsupported = [m for m in metrics if m not in SAMPLE_METRICS]
    if unsupported:
        raise InputError(
            f"{', '.join(unsupported)} has no sample-space form (it weights by features); "
            "use the feature space (compute.space: feature)"
        )
    return metrics


@dataclass(frozen=True)
class UnitGram:
    """Sample-space statistics of one unit over n rows, computed once per unit.

    Attributes
    ----------
    name : the unit's name, for messages.
    features : the unit's width d.
    off : ndarray (n, n), the centered Gram ``K = Xc Xc^T`` with its diagonal set to 0, in
        the GEMM dtype (float32 or float64; float64 when extreme values needed rescaling);
        symmetric.
    diag : ndarray (n,), float64, K's diagonal (squared norms of the centered rows).
    precision : the GEMM dtype ("float32" or "float64").
    evals : ndarray (rank,), descending, and evecs : ndarray (n, rank), float64, the
        eigenpairs of K above the rank cut (:mod:`repscope.cluster.rank`; K's nonzero
        eigenvalues are Cxx's). None unless a basis metric needs them.
    rank, cut, ambiguous : the unit's rank decision (None without the basis), as
        :class:`~repscope.cluster.caches.UnitCache`'s.
    """

    name: str
    features: int
    off: np.ndarray
    diag: np.ndarray
    precision: str = "float32"
    evals: np.ndarray | None = None
    evecs: np.ndarray | None = None
    rank: int | None = None
    cut: float | None = None
    ambiguous: str | None = None

    @property
    def n(self) -> int:
        return self.diag.shape[0]

    @property
    def trace(self) -> float:
        return float(self.diag.sum())


def _centered(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Features centered on their float64 mean, rounded once to ``dtype``: (n, d), and the
    mean (d,)."""
    x = np.asarray(x)
    mean = x.mean(axis=0, dtype=np.float64)
    # The subtraction runs in float64 (the mean's type) in numpy's buffered chunks, so no
    # float64 copy of x is made; each entry is rounded once, into the output.
    return np.subtract(x, mean, out=np.empty(x.shape, dtype), casting="unsafe"), mean


def _row_scales(xc: np.ndarray, name: str) -> np.ndarray | None:
    """Powers of two that bring each row's largest magnitude into the range where the Gram's
    products neither overflow nor underflow in the GEMM dtype, or None when every row is
    already there (the usual case). O(n d), no temporary of the rows' size."""
    n, d = xc.shape
    info = np.finfo(xc.dtype)
    peak = np.maximum(xc.max(axis=1), -xc.min(axis=1)).astype(np.float64)
    if not np.all(np.isfinite(peak)):
        rows = np.flatnonzero(~np.isfinite(peak))[:5].tolist()
        raise InputError(f"unit {name!r} has values beyond the {xc.dtype} range in rows "
                         f"{rows}; check the activations")
    high = np.sqrt(float(info.max) / (4.0 * d))
    low = np.sqrt(float(info.tiny) / float(info.eps))
    extreme = (peak > high) | ((peak > 0) & (peak < low))
    if not extreme.any():
        return None
    scale = np.ones(n)
    scale[extreme] = np.ldexp(1.0, -np.frexp(peak[extreme])[1])
    return scale


def unit_gram(
    x: np.ndarray,
    *,
    dtype=np.float32,
    basis: bool = False,
    eig_floor: float | None = None,
    name: str = "unit",
) -> UnitGram:
    """The unit's centered Gram (and, when ``basis``, its rank and kept eigenpairs).

    Parameters
    ----------
    x : ndarray (n_rows, d), the unit's activations (their dtype is the data precision).
    dtype : the GEMM dtype of the Gram (float32: BLAS peak; float64: exact reference).
    basis : also the eigendecomposition of K in float64 and the rank decision (for
        :data:`BASIS_METRICS`), by the same rule as feature space.
    eig_floor : an explicit relative rank cut (``compute.eig_floor``), None: derived.

    Raises
    ------
    InputError
        Fewer than 2 rows; zero variance (the same rule as feature space); no direction
        above the rank cut; values beyond the GEMM dtype's range.

    Notes
    -----
    Cost: one syrk, n^2 d flops (numpy calls syrk for ``a @ a.T``), O(n d) for the checks,
    plus O(n^3) for the basis. Rows whose values would overflow (or underflow) the products
    are scaled by powers of two first and the Gram unscaled in float64, exactly. Memory:
    the centered rows, K (n^2 in ``dtype``), and with the basis a float64 K.
    """
    xc, mean = _centered(x, dtype)
    n, d = xc.shape
    if n < 2:
        raise InputError(f"unit {name!r} has {n} rows; similarity needs at least 2")
    diag = np.einsum("ij,ij->i", xc, xc, dtype=np.float64)
    trace = float(diag.sum())
    if zero_variance(trace, n, mean, np.asarray(x).dtype):
        raise InputError(
            f"unit {name!r} has zero variance (all {d} features constant over {n} rows): "
            "similarity undefined; drop the unit or check the activations"
        )
    scale = _row_scales(xc, name)
    if scale is None:
        off = xc @ xc.T
    else:
        scaled = xc * scale[:, None].astype(xc.dtype)
        off = (scaled @ scaled.T).astype(np.float64) / np.outer(scale, scale)
    np.fill_diagonal(off, 0)
    check_finite(diag, f"unit {name!r}: its Gram")
    precision = np.dtype(dtype).name
    if not basis:
        return UnitGram(name, d, off, diag, precision)
    k = off.astype(np.float64)
    k[np.diag_indices(n)] = diag
    evals, evecs = spectrum(k)
    del k
    decision = decide_rank(
        evals, gemm_dtype=dtype, sum_squares=trace + n * float(mean @ mean),
        variances=np.einsum("ij,ij->j", xc, xc, dtype=np.float64),
        data_dtype=np.asarray(x).dtype, eig_floor=eig_floor)
    # Centered rows span at most min(n - 1, d) directions.
    r = min(decision.rank, n - 1, d)
    if r == 0:
        raise InputError(
            f"unit {name!r} has no direction above the precision of its statistics "
            f"({precision}): its variance is rounding noise; check the activations")
    return UnitGram(name, d, off, diag, precision, evals[:r].copy(),
                    np.ascontiguousarray(evecs[:, :r]), r, decision.cut, decision.ambiguous)


def decided_gram(
    x: np.ndarray,
    *,
    dtype=np.float32,
    basis: bool = False,
    eig_floor: float | None = None,
    ambiguous_rank: str = "recompute",
    name: str = "unit",
) -> UnitGram:
    """:func:`unit_gram`, with a float32 Gram whose rank is ambiguous recomputed in float64
    (``ambiguous_rank="recompute"``, the default) or refused (``"refuse"``:
    AmbiguousRankError naming the unit). The rows are in memory, so the recomputation
    costs one more Gram of this unit (n^2 d flops in float64) and nothing else."""
    if ambiguous_rank not in ("recompute", "refuse"):
        raise InputError(f"ambiguous_rank must be 'recompute' or 'refuse', got {ambiguous_rank!r}")
    g = unit_gram(x, dtype=dtype, basis=basis, eig_floor=eig_floor, name=name)
    if g.ambiguous is None or g.precision != "float32":
        return g
    if ambiguous_rank == "refuse":
        raise AmbiguousRankError(
            f"unit {name!r}: float32 statistics cannot decide its rank ({g.ambiguous}); "
            "recompute it in float64 (compute.ambiguous_rank: recompute, or "
            "compute.precision: float64) or set compute.eig_floor")
    return unit_gram(x, dtype=np.float64, basis=basis, eig_floor=eig_floor, name=name)


def _slab_vectors(grams: Sequence[UnitGram], i0: int, i1: int) -> np.ndarray:
    """Entries ``[K[I, I], sqrt(2) K[I, i1:]]`` of each Gram as float64: (units, entries).

    Summed over the slabs I = [i0, i1), their inner products are the off-diagonal
    ``<K, L>``: diagonal blocks once, the strictly upper part twice (K is symmetric).
    """
    m = i1 - i0
    n = grams[0].n
    out = np.empty((len(grams), m * (n - i0)))
    for u, g in enumerate(grams):
        row = out[u].reshape(m, n - i0)
        row[:] = g.off[i0:i1, i0:]
        row[:, m:] *= np.sqrt(2.0)
    return out


def gram_products(
    a: Sequence[UnitGram], b: Sequence[UnitGram] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Off-diagonal inner products ``<K~_u, K~_v>`` and ``diag(K_u).diag(K_v)``, float64.

    a, b : the units of two groups (b None: a with itself). Returns two (len(a), len(b))
    arrays. Cost U_a U_b n^2 float64 flops plus one float64 copy of each Gram's triangle,
    small next to the Grams' n^2 d each; memory one slab of every unit (_SLAB_BYTES).
    """
    n = a[0].n
    units = len(a) + (0 if b is None else len(b))
    slab = int(max(16, min(n, _SLAB_BYTES // (8 * n * units))))
    kl = np.zeros((len(a), len(a) if b is None else len(b)))
    for i0 in range(0, n, slab):
        i1 = min(n, i0 + slab)
        va = _slab_vectors(a, i0, i1)
        vb = va if b is None else _slab_vectors(b, i0, i1)
        kl += va @ vb.T
    da = np.stack([g.diag for g in a])
    db = da if b is None else np.stack([g.diag for g in b])
    return kl, da @ db.T


def pair_metrics(
    gx: UnitGram,
    gy: UnitGram,
    metrics: Iterable[str],
    *,
    svcca_threshold: float = 0.99,
) -> dict[str, float]:
    """The :data:`BASIS_METRICS` among ``metrics`` of one pair, from the units' kept
    eigenpairs (the rank decided in :func:`unit_gram`).

    Cost: one (n x r_x)^T (n x r_y) product and one or two SVDs of r_x x r_y.
    """
    wanted = [m for m in metrics if m in BASIS_METRICS]
    if not wanted:
        return {}
    if gx.evals is None or gy.evals is None:
        raise ValueError("pair_metrics needs unit_gram(..., basis=True)")
    ex, ux, ey, uy = gx.evals, gx.evecs, gy.evals, gy.evecs
    m = ux.T @ uy  # cosines between the two column spaces' bases: (r_x, r_y)
    out: dict[str, float] = {}
    if "mean_cca" in wanted or "mean_sq_cca" in wanted:
        # As feature space: over min(p, q), directions below the cut count as 0.
        rho = np.linalg.svd(m, compute_uv=False)
        width = min(gx.features, gy.features)
        out["mean_cca"] = float(rho.sum() / width)
        out["mean_sq_cca"] = float(np.sum(rho * rho) / width)
    if "svcca" in wanted:
        sx = svcca_dims(ex, svcca_threshold, gx.rank, gx.trace)
        sy = svcca_dims(ey, svcca_threshold, gy.rank, gy.trace)
        out["svcca"] = float(np.linalg.svd(m[:sx, :sy], compute_uv=False).mean())
    if "procrustes" in wanted:
        rx, ry = np.sqrt(ex), np.sqrt(ey)
        nuclear = np.linalg.svd(rx[:, None] * m * ry[None, :], compute_uv=False).sum()
        out["procrustes"] = float(2.0 - 2.0 * nuclear / np.sqrt(gx.trace * gy.trace))
    for k in wanted:
        check_finite(out[k], f"{k} of units {gx.name!r} and {gy.name!r}")
    return {k: out[k] for k in wanted}


@dataclass(frozen=True)
class GramTile:
    """Sample-space statistics of a tile (unit group a x unit group b), float64.

    kl_off : ndarray (k_a, k_b), ``<K~_u, K~_v>`` (Grams without their diagonals).
    dd : ndarray (k_a, k_b), ``diag(K_u) . diag(K_v)``.
    trace_a : ndarray (k_a,); trace_b : ndarray (k_b,).
    values : {metric: ndarray (k_a, k_b)} of the :data:`BASIS_METRICS` asked for (in a
        diagonal tile only the upper triangle, i <= j, is filled).
    ranks_a : ndarray (k_a,) of group a's effective ranks (-1 where no basis was computed);
    precision_a : the GEMM dtype of each of group a's Grams ("float64" where recomputed).
    """

    kl_off: np.ndarray
    dd: np.ndarray
    trace_a: np.ndarray
    trace_b: np.ndarray
    values: dict
    ranks_a: np.ndarray | None = None
    precision_a: tuple[str, ...] = ()


def gram_tile(
    a: Sequence[UnitGram],
    b: Sequence[UnitGram] | None,
    metrics: Iterable[str],
    *,
    svcca_threshold: float = 0.99,
) -> GramTile:
    """Per-pair work of a tile: Gram inner products, and the basis metrics of each pair
    (each unit's rank was decided by :func:`unit_gram`)."""
    kl, dd = gram_products(a, b)
    bb = a if b is None else b
    basis = [m for m in metrics if m in BASIS_METRICS]
    values = {m: np.full((len(a), len(bb)), np.nan) for m in basis}
    if basis:
        for i, gx in enumerate(a):
            for j in range(i if b is None else 0, len(bb)):
                pair = pair_metrics(gx, bb[j], basis, svcca_threshold=svcca_threshold)
                for m, v in pair.items():
                    values[m][i, j] = v
    traces_a = np.array([g.trace for g in a])
    traces_b = traces_a if b is None else np.array([g.trace for g in b])
    ranks_a = np.array([-1 if g.rank is None else g.rank for g in a])
    return GramTile(kl, dd, traces_a, traces_b, values, ranks_a, tuple(g.precision for g in a))


def gram_similarity_matrices(
    n: int,
    kl_off: np.ndarray,
    dd: np.ndarray,
    trace: np.ndarray,
    metrics: Iterable[str],
    names: Sequence[str] | None = None,
    computed: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """(U, U) matrices of linear and debiased CKA from the assembled statistics.

    kl_off, dd : ndarray (U, U), ``<K~_u, K~_v>`` and ``diag(K_u).diag(K_v)``; trace : (U,).
    Other metrics in ``metrics`` are ignored (they come from :func:`pair_metrics`).
    names : the units' names, for the error on a non-finite entry (default "unit i").
    computed : (U, U) bool, the pairs the job computes (default all); the others are NaN
        by construction (a nightly run's reused pairs) and not checked.

    Raises
    ------
    InputError
        A non-finite entry, naming its units (never a NaN in a finished matrix).
    """
    out = {}
    if "linear_cka" in metrics:
        kl = kl_off + dd
        fro = np.sqrt(np.diag(kl))
        out["linear_cka"] = kl / np.outer(fro, fro)
    if "linear_cka_debiased" in metrics:
        if n < 4:
            raise InputError(f"linear_cka_debiased needs at least 4 rows, got {n}")
        # debiased_hsic(kl, dd, ...) with kl = kl_off + dd, the diagonal terms combined.
        hsic = kl_off - 2.0 / (n - 2.0) * dd + np.outer(trace, trace) / ((n - 1.0) * (n - 2.0))
        with np.errstate(invalid="ignore"):
            self_ = np.sqrt(np.diag(hsic))
        out["linear_cka_debiased"] = hsic / np.outer(self_, self_)
    computed = np.ones(kl_off.shape, bool) if computed is None else computed
    for m, v in out.items():
        bad = np.argwhere(~np.isfinite(v) & computed)
        if bad.size:
            i, j = bad[0]
            label = (lambda k: f"unit {k}") if names is None else (lambda k: repr(names[k]))
            check_finite(v[i, j], f"{m} of {label(i)} and {label(j)} ({len(bad)} entries)")
    return out


def sample_space_metrics(
    x: np.ndarray,
    y: np.ndarray,
    metrics: Iterable[str] | None = None,
    *,
    svcca_threshold: float = 0.99,
    dtype=np.float64,
    eig_floor: float | None = None,
    ambiguous_rank: str = "recompute",
) -> dict[str, float]:
    """value(x, y) of each metric from the two centered Grams (module notes).

    Parameters
    ----------
    x : ndarray of shape (n_rows, p); y : ndarray of shape (n_rows, q)
    metrics : names among :data:`SAMPLE_METRICS` (None: all of them).
    dtype : the Grams' GEMM dtype (float64 default; float32 as a job's default precision).
    eig_floor : an explicit relative rank cut (None: derived from the precision).
    ambiguous_rank : with float32 Grams, a unit whose rank is ambiguous is recomputed in
        float64 ("recompute", default) or refused ("refuse"), as ``compute.ambiguous_rank``.

    Notes
    -----
    The job path's code (:func:`unit_gram`, :func:`gram_tile`) on two in-memory units.
    Cost: two n x n Grams (n^2 (p + q)), and for the CCA family or Procrustes two n x n
    eigendecompositions (O(n^3)); memory a few n x n float64 matrices.
    """
    metrics = check_sample_metrics(metrics)
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[0] != y.shape[0]:
        raise InputError(f"x and y must have the same rows: {x.shape[0]} vs {y.shape[0]}")
    basis = any(m in BASIS_METRICS for m in metrics)
    grams = [decided_gram(a, dtype=dtype, basis=basis, eig_floor=eig_floor,
                          ambiguous_rank=ambiguous_rank, name=name)
             for a, name in ((x, "x"), (y, "y"))]
    gx, gy = grams
    kl, dd = gram_products([gx, gy])  # CKA's normalisers need the self products too
    mats = gram_similarity_matrices(x.shape[0], kl, dd, np.array([gx.trace, gy.trace]),
                                    metrics, names=["x", "y"])
    out = {m: float(v[0, 1]) for m, v in mats.items()}
    out.update(pair_metrics(gx, gy, metrics, svcca_threshold=svcca_threshold))
    return {m: out[m] for m in metrics}


def sample_space_flops(n: int, widths: Sequence[int], metrics: Iterable[str] = ()) -> float:
    """Flops of the sample path: the Grams (n^2 d per unit, syrk), their float64 inner
    products (U^2 n^2, counted twice for the lower float64 rate) and, for the basis metrics,
    an n x n eigendecomposition per unit (about 10 n^3) and per pair one n r^2 product and
    SVDs of r x r (about 10 r^3), r = min(n, d)."""
    u = len(widths)
    total = float(n) ** 2 * sum(widths) + 2.0 * u**2 * float(n) ** 2
    if any(m in BASIS_METRICS for m in metrics):
        r = min(n, max(widths))
        total += 10.0 * u * float(n) ** 3 + u * (u + 1) / 2 * (2.0 * n * r**2 + 10.0 * r**3)
    return total
