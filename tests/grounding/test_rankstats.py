"""Rank correlation with function and seed specificity match scipy and known cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from repscope.cluster.rankstats import (
    as_distance,
    mean_rank_correlation,
    rank_correlation_with_function,
    same_layer_auc,
    seed_specificity,
)


def test_matches_scipy_on_the_same_vectors():
    rng = np.random.default_rng(0)
    m = 9
    scores = rng.uniform(0.6, 0.9, m)
    d = rng.uniform(0, 1, (m, m))
    rank = rank_correlation_with_function(d, scores, [f"m{i}" for i in range(m)], "l1")
    ref = int(np.argmax(scores))
    others = [j for j in range(m) if j != ref]
    x, y = d[ref, others], np.abs(scores[others] - scores[ref])
    assert rank.reference == f"m{ref}"
    assert (rank.spearman_rho, rank.spearman_p) == pytest.approx(tuple(stats.spearmanr(x, y)))
    assert (rank.kendall_tau, rank.kendall_p) == pytest.approx(tuple(stats.kendalltau(x, y)))


def test_monotone_relation_gives_rho_one_and_mean_over_layers():
    scores = np.array([0.9, 0.5, 0.8, 0.7, 0.6])
    gap = np.abs(scores - scores.max())
    # distance a strictly increasing (non-linear) function of the score gap
    d = np.add.outer(gap, gap) ** 2
    models = list("abcde")
    layers = [rank_correlation_with_function(d * (k + 1), scores, models, f"l{k}")
              for k in range(3)]
    assert all(r.spearman_rho == pytest.approx(1.0) for r in layers)
    assert all(r.kendall_tau == pytest.approx(1.0) for r in layers)
    flat = rank_correlation_with_function(np.ones((5, 5)), scores, models, "flat")
    assert np.isnan(flat.spearman_rho)
    summary = mean_rank_correlation([*layers, flat])
    assert summary == {"spearman_rho": pytest.approx(1.0), "kendall_tau": pytest.approx(1.0),
                       "layers": 3}


def test_as_distance():
    assert as_distance("linear_cka", 0.75) == 0.25
    assert as_distance("procrustes", 0.3) == 0.3


def test_auc_and_specificity():
    assert same_layer_auc(np.array([0.1, 0.2]), np.array([0.3, 0.4]))[0] == 1.0
    assert same_layer_auc(np.array([0.3]), np.array([0.3]))[0] == 0.5
    # 2 models x 2 layers: same-layer CKA 0.9, different-layer 0.2
    model_of, layer_of = ["a", "a", "b", "b"], ["l1", "l2", "l1", "l2"]
    cka = np.array([[1, .5, .9, .2], [.5, 1, .2, .9], [.9, .2, 1, .5], [.2, .9, .5, 1]])
    sep = seed_specificity({"linear_cka": cka}, model_of, layer_of)["linear_cka"]
    np.testing.assert_allclose(sep.same, [0.1, 0.1])
    np.testing.assert_allclose(sep.different, [0.8, 0.8])
    assert sep.auc == 1.0 and sep.summary()["same_layer"]["count"] == 2
