"""Every metric against the authors' code on real activations (../shared/reference)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from repscope.cluster.accumulate import block_moments
from repscope.cluster.caches import prepare_unit
from repscope.cluster.compare import compare_arrays
from repscope.cluster.moments import merge_all, pair_moments, unit_moments
from repscope.cluster.pairs import compare_pair
from repscope.cluster.registry import MOMENT_METRICS

PAIRS = ["kornblith_demo", "mnist_lay04", "svhn_lay06"]
TOL = 1e-6  # absolute, float64 path (measured: < 1e-14)


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
    got = compare_arrays(x, y)
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
