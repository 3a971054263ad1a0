"""Uncertainty of similarity values: shard bootstrap from partial moments, permutation null.

Bootstrap (Efron 1979; blocks of rows as in the block bootstrap): a job already holds the
moments of each row shard. A replicate resamples shards with replacement (multinomial counts)
or weights each by an independent Poisson(1) count, and merges the *weighted* partials exactly,
without touching the rows again. A partial of n rows taken w times is the rows repeated w
times, so (Chan, Golub & LeVeque merges stay exact):

    n -> w n,   mean -> mean,   C -> w C,
    S -> w S,   P -> w P,   Q -> w Q,   Ta -> w Ta,   Tb -> w Tb

(every centered sum over the rows is a sum of w identical copies; the means are unchanged,
so nothing is re-centered). w = 0 drops the partial. Percentile intervals of the finalized
replicates bound every matrix entry. Shards should be many (>= 20) and each hold rows that
are independent of other shards' (e.g. not consecutive tokens of one document split across
shards).

Permutation null (Ding et al. 2021 compare metrics against chance): the metric between a unit
and a row-shuffled other unit, at this n and these widths, on an in-memory row sample. A
shuffle destroys the row correspondence, so the values show how large a metric is by chance
(CCA-family metrics are far from 0 at p/n not small). It needs the rows: moments of shuffled
pairs are not functions of the shards' moments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from repscope.cluster.compare import compare_arrays
from repscope.cluster.moments import CrossMoments, merge_all
from repscope.cluster.registry import check_metrics
from repscope.errors import InputError

__all__ = [
    "weighted",
    "merge_weighted",
    "shard_weights",
    "BootstrapResult",
    "bootstrap",
    "percentile_interval",
    "permutation_null",
]


def weighted(m: CrossMoments, w: float) -> CrossMoments:
    """The partial ``m`` counted ``w`` times: n w rows, same means, every centered sum times w.

    For integer w this is exactly the moments of the rows repeated w times; a real w is the
    moments of rows with frequency weight w (Poisson bootstrap).
    """
    if w < 0:
        raise InputError(f"a bootstrap weight must be >= 0, got {w}")
    scale = {k: None if getattr(m, k) is None else getattr(m, k) * w
             for k in ("c", "s", "p", "q", "ta", "tb")}
    return replace(m, n=m.n * w, **scale)


def merge_weighted(parts: Sequence[CrossMoments], weights: Sequence[float]) -> CrossMoments:
    """Exact merge of partials with weights (0 drops a partial); all-zero weights are refused.

    Second-order moments merge in one shot (the k-way form of the Chan-Golub-LeVeque update):
    with N = sum_s w_s n_s, mean = sum_s w_s n_s mean_s / N and

        C = sum_s w_s (C_s + n_s (mean_a,s - mean_a)(mean_b,s - mean_b)^T),

    one weighted sum of the S partials' C (O(S d_a d_b), no Python loop over pairs). With
    fourth-order terms the pairwise :func:`merge_all` re-centers them.
    """
    if len(parts) != len(weights):
        raise InputError(f"{len(parts)} partials but {len(weights)} weights")
    pairs = [(m, w) for m, w in zip(parts, weights, strict=True) if w != 0 and m.n > 0]
    if not pairs:
        raise InputError("every bootstrap weight is 0: no rows to merge")
    if pairs[0][0].fourth:
        return merge_all([weighted(m, w) if w != 1 else m for m, w in pairs])
    first = pairs[0][0]
    w = np.array([wt for _, wt in pairs], float)
    wn = w * np.array([m.n for m, _ in pairs], float)
    total = wn.sum()
    da = np.array([m.mean_a for m, _ in pairs])
    mean_a = wn @ da / total
    da -= mean_a
    if first.diagonal:
        mean_b, db = mean_a, da
    else:
        db = np.array([m.mean_b for m, _ in pairs])
        mean_b = wn @ db / total
        db -= mean_b
    c = np.tensordot(w, np.array([m.c for m, _ in pairs]), axes=1) + (da.T * wn) @ db
    n = int(total) if float(total).is_integer() else total
    return replace(first, n=n, mean_a=mean_a, mean_b=mean_b, c=c)


def shard_weights(
    shards: int, replicates: int, rng: np.random.Generator, scheme: str = "multinomial"
) -> np.ndarray:
    """Weights of shape (replicates, shards): multinomial counts (resampling ``shards`` shards
    with replacement) or independent Poisson(1) counts (each replicate redrawn if all zero)."""
    if scheme == "multinomial":
        return rng.multinomial(shards, np.full(shards, 1.0 / shards), size=replicates)
    if scheme == "poisson":
        w = rng.poisson(1.0, size=(replicates, shards))
        while (empty := ~w.any(axis=1)).any():
            w[empty] = rng.poisson(1.0, size=(int(empty.sum()), shards))
        return w
    raise InputError(f"bootstrap scheme must be 'multinomial' or 'poisson', got {scheme!r}")


@dataclass(frozen=True)
class BootstrapResult:
    """``estimate``: the statistic on all shards; ``lower``/``upper``: the percentile
    interval at ``level``; ``replicates``: ndarray of shape (B, *estimate.shape)."""

    estimate: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    level: float
    replicates: np.ndarray


def percentile_interval(reps: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper ``(1 -+ level) / 2`` quantiles over axis 0 (NaN entries ignored)."""
    if not 0.0 < level < 1.0:
        raise InputError(f"confidence level must be in (0, 1), got {level}")
    tail = (1.0 - level) / 2.0
    return (np.nanquantile(reps, tail, axis=0), np.nanquantile(reps, 1.0 - tail, axis=0))


def bootstrap(
    shards: Sequence[Sequence[CrossMoments]],
    statistic: Callable[[list[CrossMoments]], np.ndarray],
    replicates: int = 200,
    *,
    level: float = 0.9,
    scheme: str = "multinomial",
    rng: np.random.Generator | None = None,
) -> BootstrapResult:
    """Percentile bootstrap over row shards.

    Parameters
    ----------
    shards : S sequences, shard s's partial moments of each of T tiles (the same T tiles, in
        the same order, for every shard): ``shards[s][t]``.
    statistic : maps the T merged tiles to an ndarray (e.g. a stacked metric matrix).
    replicates : B, the number of resamples.
    level : coverage of the percentile interval.
    scheme : "multinomial" (classical) or "poisson" (independent weights, as a streaming
        reducer would draw them).

    Notes
    -----
    Every tile of a replicate uses the same shard weights, so the replicate is one resample of
    rows for the whole matrix. Cost: B (S merges per tile + one ``statistic``); memory: the
    S x T partials (kept anyway) and B statistics.
    """
    if replicates < 2:
        raise InputError(f"bootstrap needs at least 2 replicates, got {replicates}")
    count = len(shards)
    if count < 2:
        raise InputError(f"bootstrap needs at least 2 row shards, got {count}")
    tiles = len(shards[0])
    if any(len(s) != tiles for s in shards):
        raise InputError("every shard must hold the partials of the same tiles")
    rng = np.random.default_rng() if rng is None else rng
    by_tile = [[shards[s][t] for s in range(count)] for t in range(tiles)]
    estimate = np.asarray(statistic([merge_all(parts) for parts in by_tile]), float)
    reps = np.empty((replicates, *estimate.shape))
    for b, w in enumerate(shard_weights(count, replicates, rng, scheme)):
        reps[b] = statistic([merge_weighted(parts, w) for parts in by_tile])
    lower, upper = percentile_interval(reps, level)
    return BootstrapResult(estimate, lower, upper, level, reps)


def permutation_null(
    x: np.ndarray,
    y: np.ndarray,
    metrics: str | Iterable[str] | None = None,
    permutations: int = 20,
    *,
    rng: np.random.Generator | None = None,
    svcca_threshold: float = 0.99,
) -> dict[str, np.ndarray]:
    """Metric values between x and row-shuffled y: ``{metric: ndarray of shape (permutations,)}``.

    x : ndarray of shape (n, p); y : ndarray of shape (n, q), the same rows. Each permutation
    shuffles y's rows once (one independent permutation per draw) and compares with
    :func:`cluster.compare.compare_arrays`. Cost: ``permutations`` in-memory comparisons.
    """
    metrics = check_metrics(metrics)
    if permutations < 1:
        raise InputError(f"permutations must be >= 1, got {permutations}")
    rng = np.random.default_rng() if rng is None else rng
    y = np.asarray(y)
    out = {k: np.empty(permutations) for k in metrics}
    for i in range(permutations):
        values = compare_arrays(x, y[rng.permutation(y.shape[0])], metrics,
                                svcca_threshold=svcca_threshold)
        for k, v in values.items():
            out[k][i] = v
    return out
