"""PC-deletion probes from moments equal deleting the components from the rows."""

from __future__ import annotations

import numpy as np
import pytest

from repscope.cluster.accumulate import block_moments
from repscope.cluster.compare import compare_arrays
from repscope.cluster.moments import unit_moments
from repscope.cluster.probes import (
    PROBE_METRICS,
    deleted_moments,
    deletion_projection,
    pc_deletion_probe,
)
from repscope.cluster.rankstats import as_distance
from repscope.errors import InputError


def correlated(n: int, p: int, seed: int) -> np.ndarray:
    """Rows with distinct principal variances and a large mean (n, p)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, p)) @ rng.standard_normal((p, p)) * np.linspace(0.2, 3, p) + 5


@pytest.mark.parametrize("n,p", [(300, 12), (40, 30)])
def test_probe_equals_deleting_from_raw_rows(n, p):
    x = correlated(n, p, seed=p)
    m = unit_moments(block_moments(x, widths_a=(p,)), 0)
    points = pc_deletion_probe(m, fractions=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9), precision="float64")
    # An independent basis: the SVD of the centered rows (signs do not matter in P).
    _, _, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    assert {pt.end for pt in points} == {"lowest", "highest"}
    for pt in points:
        gone = vt[:pt.k] if pt.end == "highest" else vt[p - pt.k:]
        raw = compare_arrays(x, x @ (np.eye(p) - gone.T @ gone), PROBE_METRICS)
        for metric, value in raw.items():
            assert pt.distance[metric] == pytest.approx(as_distance(metric, value), abs=1e-8)


def test_moments_of_projection_match_rows():
    x = correlated(200, 8, seed=1)
    m = unit_moments(block_moments(x, widths_a=(8,)), 0)
    evecs = np.linalg.eigh(m.cxx)[1]
    p_mat = deletion_projection(evecs, np.array([0, 3]))
    unit, cross = deleted_moments(m, p_mat)
    xp = x @ p_mat
    tile = block_moments(np.hstack([x, xp]), widths_a=(8, 8))
    np.testing.assert_allclose(unit.mean, xp.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(unit.cxx, tile.c[8:, 8:], atol=1e-9)
    np.testing.assert_allclose(cross.cxy, tile.c[:8, 8:], atol=1e-9)


def test_ladder_shape_and_monotone_cka():
    x = correlated(300, 10, seed=2)
    m = unit_moments(block_moments(x, widths_a=(10,)), 0)
    points = pc_deletion_probe(m, fractions=(0.0, 0.5, 1.0), metrics=["linear_cka"])
    assert [(pt.end, pt.k) for pt in points] == [
        ("lowest", 0), ("lowest", 5), ("lowest", 9), ("highest", 0), ("highest", 5),
        ("highest", 9)]
    assert points[0].distance["linear_cka"] == pytest.approx(0.0, abs=1e-12)
    low = [pt.distance["linear_cka"] for pt in points[:3]]
    high = [pt.distance["linear_cka"] for pt in points[3:]]
    # Deleting high-variance directions moves CKA much more than deleting low-variance ones.
    assert low == sorted(low) and high == sorted(high) and high[1] > low[1]


def test_unsupported_metrics_refused():
    m = unit_moments(block_moments(correlated(50, 4, 0), widths_a=(4,)), 0)
    with pytest.raises(InputError, match="debiased CKA needs fourth-order"):
        pc_deletion_probe(m, metrics=["linear_cka_debiased"])
    with pytest.raises(InputError, match="fractions must be in"):
        pc_deletion_probe(m, fractions=(1.5,))
