"""Sample space (Grams) agrees with feature space (moments) for every metric it supports."""

from __future__ import annotations

import numpy as np
import pytest

from repscope.cluster.accumulate import block_moments
from repscope.cluster.compare import compare_arrays
from repscope.cluster.gram import (
    SAMPLE_METRICS,
    gram_similarity_matrices,
    gram_tile,
    sample_space_metrics,
    unit_gram,
)
from repscope.cluster.matrices import similarity_matrices
from repscope.cluster.moments import pair_moments, unit_moments
from repscope.errors import InputError


def _layers(rows: int, widths, seed: int):
    """Hidden layers of a random tanh network (shared inputs, seed changes the weights)."""
    h = np.random.default_rng(99).standard_normal((rows, 10))
    rng = np.random.default_rng(seed)
    out = []
    for w in widths:
        h = np.tanh(h @ rng.standard_normal((h.shape[1], w)) / np.sqrt(h.shape[1]) + 0.1)
        out.append(h)
    return out


@pytest.mark.filterwarnings("ignore::repscope.cluster.registry.FewRowsWarning")
@pytest.mark.parametrize("rows, p, q", [(60, 90, 120), (300, 40, 25)])
def test_every_sample_metric_equals_feature_space(rows, p, q):
    x, y = _layers(rows, [p], 1)[0], _layers(rows, [q], 2)[0]
    feature = compare_arrays(x, y, SAMPLE_METRICS)
    sample = sample_space_metrics(x, y, SAMPLE_METRICS)
    for m in SAMPLE_METRICS:
        assert sample[m] == pytest.approx(feature[m], abs=1e-6), m


def test_pwcca_is_refused_in_sample_space():
    x = np.random.default_rng(0).standard_normal((20, 5))
    with pytest.raises(InputError, match="pwcca has no sample-space form"):
        sample_space_metrics(x, x, ["pwcca"])


@pytest.mark.filterwarnings("ignore::repscope.cluster.registry.FewRowsWarning")
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-9), (np.float32, 1e-6)])
def test_streamed_gram_tiles_equal_feature_space_matrices(dtype, tol):
    """The job path (a Gram per unit, tiles of unit groups) equals feature space, float64."""
    rows = 250
    acts = _layers(rows, [70, 50, 80], 3) + _layers(rows, [60, 90], 4)
    acts = [a.astype(np.float32) for a in acts]
    grams = [unit_gram(x, dtype=dtype, basis=True, name=f"u{i}") for i, x in enumerate(acts)]
    a, b = grams[:2], grams[2:]
    metrics = list(SAMPLE_METRICS)
    aa, ab, bb = gram_tile(a, None, metrics), gram_tile(a, b, metrics), gram_tile(b, None, metrics)
    kl = np.block([[aa.kl_off, ab.kl_off], [ab.kl_off.T, bb.kl_off]])
    dd = np.block([[aa.dd, ab.dd], [ab.dd.T, bb.dd]])
    trace = np.concatenate([aa.trace_a, bb.trace_a])
    got = gram_similarity_matrices(rows, kl, dd, trace, metrics)
    for m in aa.values:
        upper = np.block([[aa.values[m], ab.values[m]], [np.zeros((3, 2)), bb.values[m]]])
        got[m] = np.triu(upper) + np.triu(upper, 1).T

    z = np.hstack([x.astype(np.float64) for x in acts])
    mom = block_moments(z, widths_a=[x.shape[1] for x in acts], fourth=True)
    want = similarity_matrices([unit_moments(mom, i) for i in range(len(acts))],
                               lambda i, j: pair_moments(mom, i, j), metrics)
    for m in metrics:
        np.testing.assert_allclose(got[m], want[m], atol=tol, rtol=0, err_msg=m)


def test_float32_grams_keep_debiased_cka_digits():
    """Large offsets and n << d: the diagonal dominates <K, L>; debiased CKA, which removes
    it, still matches float64 to 1e-6 because the diagonal is kept apart in float64."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 3000)).astype(np.float32) + 50.0
    y = (x[:, :1500] @ rng.standard_normal((1500, 2000)).astype(np.float32) * 0.01
         + rng.standard_normal((200, 2000)).astype(np.float32))
    metrics = ["linear_cka", "linear_cka_debiased"]
    exact = sample_space_metrics(x.astype(np.float64), y.astype(np.float64), metrics)
    g32 = [unit_gram(v, dtype=np.float32) for v in (x, y)]
    t = gram_tile(g32, None, metrics)
    got = gram_similarity_matrices(200, t.kl_off, t.dd, t.trace_a, metrics)
    for m in metrics:
        assert got[m][0, 1] == pytest.approx(exact[m], abs=1e-6), m


def test_zero_variance_unit_is_named():
    with pytest.raises(InputError, match="unit 'm/l3' has zero variance"):
        unit_gram(np.ones((10, 4), np.float32), name="m/l3")
