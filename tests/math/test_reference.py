"""Every metric against the authors' code on real activations (../shared/reference)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from repscope.cluster.accumulate import block_moments
from repscope.cluster.caches import prepare_unit
from repscope.cluster.compare import compare_arrays
from repscope.cluster.gram import sample_space_metrics
from repscope.cluster.moments import merge_all, pair_moments, unit_moments
from repscope.cluster.pairs import compare_pair
from repscope.cluster.registry import MOMENT_METRICS

PAIRS = ["kornblith_demo", "mnist_lay04", "svhn_lay06"]
# Absolute. float64 path: measured <= 5e-15 (every metric, both PWCCA directions, both
# spaces), so a float32-level regression (1e-7) fails. float32 GEMMs: measured <= 2e-7.
TOL = 1e-13
TOL32 = 1e-6


def expected(values: dict) -> dict[str, float]:
    """values.json keys in repscope's conventions (PWCCA as a similarity)."""
    return {
        "linear_cka": values["linear_cka"],
        "linear_cka_debiased": values["linear_cka_debiased"],
        "mean_cca": values["mean_cca"],
        "mean_sq_cca": values["mean_sq_cca"],
        "svcca": values["svcca_0.99"],
        "pwcca": 1.0 - values["pwcca_distance_xy"],
        "procrustes": values["procrustes"],
    }


@pytest.fixture(scope="module")
def values(reference) -> dict:
    return json.loads((reference / "values.json").read_text())


def load(reference, name):
    return np.load(reference / f"{name}_x.npy"), np.load(reference / f"{name}_y.npy")


@pytest.mark.parametrize("name", PAIRS)
def test_compare_arrays_matches_reference(reference, values, name):
    x, y = load(reference, name)
    got = compare_arrays(x, y, ambiguous_rank="refuse")
    want = expected(values[name])
    assert set(got) == set(MOMENT_METRICS)
    for metric, value in want.items():
        assert got[metric] == pytest.approx(value, abs=TOL), metric
    # PWCCA the other way round: y's canonical variates weight the correlations.
    assert compare_arrays(y, x, "pwcca")["pwcca"] == pytest.approx(
        1.0 - values[name]["pwcca_distance_yx"], abs=TOL
    )
    assert 1.0 - got["linear_cka"] == pytest.approx(values[name]["cka_distance"], abs=TOL)


@pytest.mark.parametrize("name", PAIRS)
def test_compare_pair_gives_both_pwcca_directions(reference, values, name):
    x, y = load(reference, name)
    tile = block_moments(np.hstack([x, y]), widths_a=(x.shape[1], y.shape[1]), fourth=True)
    cx = prepare_unit(unit_moments(tile, 0), name="x")
    cy = prepare_unit(unit_moments(tile, 1), name="y")
    got = compare_pair(cx, cy, pair_moments(tile, 0, 1), list(MOMENT_METRICS))
    xy, yx = got["pwcca"]
    assert xy == pytest.approx(1.0 - values[name]["pwcca_distance_xy"], abs=TOL)
    assert yx == pytest.approx(1.0 - values[name]["pwcca_distance_yx"], abs=TOL)
    assert [cx.svcca_dims, cy.svcca_dims] == values[name]["svcca_dims"]


@pytest.mark.parametrize("name", ["mnist_lay04", "svhn_lay06"])
def test_streamed_blocks_match_reference(reference, values, name):
    """The distributed path: uneven row blocks, separate tiles, merged, then finalised."""
    x, y = load(reference, name)
    cuts = [0, 7, 300, 301, 777, x.shape[0]]
    blocks = list(zip(cuts[:-1], cuts[1:], strict=True))
    xx = merge_all([block_moments(x[i:j], widths_a=(x.shape[1],), fourth=True) for i, j in blocks])
    yy = merge_all([block_moments(y[i:j], widths_a=(y.shape[1],), fourth=True) for i, j in blocks])
    xy = merge_all(
        [
            block_moments(x[i:j], y[i:j], widths_a=(x.shape[1],), widths_b=(y.shape[1],),
                          fourth=True)
            for i, j in blocks[::-1]
        ]
    )
    cx = prepare_unit(unit_moments(xx, 0), name="x")
    cy = prepare_unit(unit_moments(yy, 0), name="y")
    got = compare_pair(cx, cy, pair_moments(xy, 0, 0))
    for metric, value in expected(values[name]).items():
        assert got[metric][0] == pytest.approx(value, abs=TOL), metric


@pytest.mark.parametrize("name", PAIRS)
def test_float32_products_match_reference(reference, values, name):
    """The default precision (float32 GEMMs, float64 sums): full-rank units, no unit
    ambiguous (nothing is recomputed in float64), every metric within 1e-6."""
    x, y = load(reference, name)
    got = compare_arrays(x, y, gemm_dtype=np.float32, ambiguous_rank="refuse")
    for metric, value in expected(values[name]).items():
        assert got[metric] == pytest.approx(value, abs=TOL32), metric
    yx = compare_arrays(y, x, "pwcca", gemm_dtype=np.float32, ambiguous_rank="refuse")
    assert yx["pwcca"] == pytest.approx(1.0 - values[name]["pwcca_distance_yx"], abs=TOL32)


@pytest.mark.parametrize("name", ["kornblith_demo", "svhn_lay06"])  # MNIST: 10,000 rows
@pytest.mark.parametrize("dtype, tol", [(np.float64, TOL), (np.float32, TOL32)])
def test_sample_space_matches_reference(reference, values, name, dtype, tol):
    x, y = load(reference, name)
    got = sample_space_metrics(x, y, dtype=dtype, ambiguous_rank="refuse")
    want = expected(values[name])
    for metric, value in got.items():
        assert value == pytest.approx(want[metric], abs=tol), metric
