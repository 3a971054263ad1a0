"""Rank statistics of the seed paper: agreement with function, specificity to seeds.

Ding, Denain & Steinhardt (2021) ground a similarity metric in function: the more two
representations differ functionally (e.g. in out-of-distribution accuracy), the farther apart
a good metric should put them (rank correlation with function), while models that differ only
in their seed should look alike layer for layer (specificity). Pure numpy/scipy, no I/O.

Distances: every metric is turned into a distance with :func:`as_distance` (1 - similarity for
the similarity metrics, Procrustes as is), so "larger = farther" everywhere below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from repscope.cluster.registry import METRICS, check_metrics
from repscope.errors import InputError

__all__ = [
    "as_distance",
    "LayerRank",
    "rank_correlation_with_function",
    "mean_rank_correlation",
    "Separation",
    "layer_pair_distances",
    "same_layer_auc",
    "seed_specificity",
]


def as_distance(metric: str, value):
    """Distance form of a metric value: ``1 - s`` for similarities, the value for distances."""
    check_metrics([metric])
    return value if METRICS[metric].direction == "distance" else 1.0 - value


# --- rank correlation with function ------------------------------------------------------


@dataclass(frozen=True)
class LayerRank:
    """One layer's test: the reference model (best score), the other models, their metric
    distances to the reference and absolute score differences, and the two rank correlations
    (NaN when undefined, e.g. constant distances)."""

    layer: str
    reference: str
    models: tuple[str, ...]
    distance: np.ndarray
    score_gap: np.ndarray
    spearman_rho: float
    spearman_p: float
    kendall_tau: float
    kendall_p: float


def rank_correlations(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """(Spearman rho, its p-value, Kendall tau-b, its p-value) of paired vectors, via scipy;
    all NaN when a vector is constant (ranks undefined) or has fewer than 2 entries."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return (np.nan,) * 4
    from scipy import stats  # 2 s to import: only when a test runs

    rho = stats.spearmanr(x, y)
    tau = stats.kendalltau(x, y)
    return float(rho.statistic), float(rho.pvalue), float(tau.statistic), float(tau.pvalue)


def rank_correlation_with_function(
    distances: np.ndarray, scores: Sequence[float], models: Sequence[str], layer: str = ""
) -> LayerRank:
    """The paper's test at one layer.

    Parameters
    ----------
    distances : ndarray of shape (M, M), metric distance between model i's and model j's unit
        at this layer ([i, j] weighted by model i for an asymmetric metric such as PWCCA).
    scores : M functional scores (larger = better, e.g. accuracy).
    models : M model names.

    The reference is the best-scoring model (the first on ties); for every other model j the
    pair is (distances[ref, j], |score_j - score_ref|). Spearman's rho and Kendall's tau-b
    with their two-sided p-values come from scipy.stats.
    """
    distances = np.asarray(distances, float)
    scores = np.asarray(scores, float)
    m = len(models)
    if distances.shape != (m, m) or scores.shape != (m,):
        raise InputError(
            f"layer {layer!r}: distances of shape {distances.shape} and {scores.size} scores "
            f"for {m} models"
        )
    ref = int(np.argmax(scores))
    others = [j for j in range(m) if j != ref]
    d = distances[ref, others]
    gap = np.abs(scores[others] - scores[ref])
    rho, rho_p, tau, tau_p = rank_correlations(d, gap)
    return LayerRank(layer, models[ref], tuple(models[j] for j in others), d, gap,
                     rho, rho_p, tau, tau_p)


def mean_rank_correlation(ranks: Sequence[LayerRank]) -> dict[str, float]:
    """The paper's summary: the unweighted mean over layers of rho and of tau.

    Layers where a correlation is undefined (NaN) are left out of that mean; ``layers`` counts
    those used. No p-value is combined: the layers share models and scores, so their tests are
    not independent (read the per-layer p-values).
    """
    rho = np.array([r.spearman_rho for r in ranks], float)
    tau = np.array([r.kendall_tau for r in ranks], float)
    ok = np.isfinite(rho)
    return {
        "spearman_rho": float(rho[ok].mean()) if ok.any() else np.nan,
        "kendall_tau": float(tau[np.isfinite(tau)].mean()) if np.isfinite(tau).any() else np.nan,
        "layers": int(ok.sum()),
    }


# --- specificity to seeds ----------------------------------------------------------------


@dataclass(frozen=True)
class Separation:
    """Distances of same-layer pairs vs different-layer pairs (across different models).

    ``auc`` is P(a same-layer distance < a different-layer distance) + P(tie) / 2: 1 means
    every corresponding pair is closer than every non-corresponding one, 0.5 no separation.
    ``p_value`` is the one-sided Mann-Whitney U test of that ordering.
    """

    same: np.ndarray
    different: np.ndarray
    auc: float
    p_value: float

    def summary(self) -> dict[str, dict[str, float]]:
        """count, mean, median, std, min, max of each group."""
        def describe(v: np.ndarray) -> dict[str, float]:
            if v.size == 0:
                return {"count": 0}
            return {"count": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
                    "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}
        return {"same_layer": describe(self.same), "different_layer": describe(self.different)}


def layer_pair_distances(
    distance: np.ndarray, model_of: Sequence[str], layer_of: Sequence[str], symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Split a unit-by-unit distance matrix (U, U) into same-layer and different-layer values.

    Only pairs of units of *different* models count, so both groups carry the seed change and
    differ only in whether the layers correspond (matched by layer name). A symmetric metric
    uses each unordered pair once; an asymmetric one (PWCCA) both orders.
    """
    same, diff = [], []
    count = len(model_of)
    for i in range(count):
        for j in range(count):
            if model_of[i] == model_of[j] or (symmetric and j <= i):
                continue
            value = distance[i, j]
            if np.isfinite(value):
                (same if layer_of[i] == layer_of[j] else diff).append(value)
    return np.array(same), np.array(diff)


def same_layer_auc(same: np.ndarray, different: np.ndarray) -> tuple[float, float]:
    """(AUC, one-sided p) that a same-layer distance is smaller than a different-layer one.

    AUC = U / (n_same n_diff) with U the Mann-Whitney statistic of (different, same): the
    probability that a random different-layer pair is farther than a random same-layer pair,
    ties counted one half.
    """
    if same.size == 0 or different.size == 0:
        return np.nan, np.nan
    from scipy import stats

    test = stats.mannwhitneyu(different, same, alternative="greater")
    return float(test.statistic / (same.size * different.size)), float(test.pvalue)


def seed_specificity(
    matrices: Mapping[str, np.ndarray], model_of: Sequence[str], layer_of: Sequence[str]
) -> dict[str, Separation]:
    """Per metric, the separation of corresponding layers across seeds (see
    :class:`Separation`). ``matrices`` are (U, U) metric values (as in a results store)."""
    out = {}
    for metric, values in matrices.items():
        d = as_distance(metric, np.asarray(values, float))
        same, diff = layer_pair_distances(d, model_of, layer_of, METRICS[metric].symmetric)
        auc, p = same_layer_auc(same, diff)
        out[metric] = Separation(same, diff, auc, p)
    return out
