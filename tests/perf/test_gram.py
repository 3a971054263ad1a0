"""Sample space (Grams) agrees with feature space (moments) for every metric it supports."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.compare import compare_arrays
from cluster.gram import (
    SAMPLE_METRICS,
    GramTask,
    gram_similarity_matrices,
    gram_slabs,
    gram_tile,
    merge_gram_stats,
    sample_space_metrics,
)
from cluster.metrics import similarity_matrices
from cluster.moments import block_moments, pair_moments, unit_moments
from store.errors import InputError


def _layers(rows: int, widths, seed: int):
    """Hidden layers of a random tanh network (shared inputs, seed changes the weights)."""
    h = np.random.default_rng(99).standard_normal((rows, 10))
    rng = np.random.default_rng(seed)
    out = []
    for w in widths:
        h = np.tanh(h @ rng.standard_normal((h.shape[1], w)) / np.sqrt(h.shape[1]) + 0.1)
        out.append(h)
    return out


@pytest.mark.filterwarnings("ignore::cluster.metrics.FewRowsWarning")
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


class _MemoryStore:
    def __init__(self, data):
        self.data = data

    def read(self, model, layer, start=0, stop=None):
        return self.data[(model, layer)][start:stop].astype(np.float32)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_streamed_gram_tiles_equal_feature_space_matrices(precision):
    rows = 250
    acts = _layers(rows, [70, 50, 80], 3) + _layers(rows, [60, 90], 4)
    acts = [a.astype(np.float32) for a in acts]
    units = tuple((f"m{i // 3}", f"l{i}") for i in range(len(acts)))
    store = _MemoryStore(dict(zip(units, acts, strict=True)))
    a, b = units[:2], units[2:]
    slabs = gram_slabs(rows, 64)

    def tile(ua, ub):
        # Two tasks over interleaved slabs, merged: as the job path splits them.
        parts = [gram_tile(store, GramTask(ua, ub, 0, rows, tuple(slabs[k::2]), precision))
                 for k in range(2)]
        return merge_gram_stats(*parts)

    aa, ab, bb = tile(a, None), tile(a, b), tile(b, None)
    kl = np.block([[aa.kl, ab.kl], [ab.kl.T, bb.kl]])
    dd = np.block([[aa.dd, ab.dd], [ab.dd.T, bb.dd]])
    trace = np.concatenate([aa.trace_a, bb.trace_a])
    metrics = ["linear_cka", "linear_cka_debiased"]
    got = gram_similarity_matrices(rows, kl, dd, trace, metrics)

    z = np.hstack([x.astype(np.float64) for x in acts])
    mom = block_moments(z, widths_a=[x.shape[1] for x in acts], fourth=True)
    want = similarity_matrices([unit_moments(mom, i) for i in range(len(acts))],
                               lambda i, j: pair_moments(mom, i, j), metrics)
    for m in metrics:
        np.testing.assert_allclose(got[m], want[m], atol=1e-6, rtol=0)
