"""Metrics against an independent in-memory implementation, their axioms and edge cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import ortho_group

from repscope.cluster.accumulate import TileAccumulator, block_moments
from repscope.cluster.caches import prepare_unit
from repscope.cluster.compare import compare_arrays
from repscope.cluster.matrices import similarity_matrices
from repscope.cluster.moments import merge_all, pair_moments, unit_moments
from repscope.cluster.pairs import compare_pair
from repscope.cluster.registry import METRICS, MOMENT_METRICS, FewRowsWarning, check_metrics
from repscope.errors import InputError
from tests.math.naive import naive_metrics

ALL = MOMENT_METRICS  # what compare_arrays computes by default
SYMMETRIC = [m for m in ALL if METRICS[m].symmetric]


def related(rng, n, p, q, noise=1.0, offset=3.0):
    """x (n, p) with correlated features, y (n, q) a noisy linear image of x."""
    x = rng.normal(size=(n, p)) @ rng.normal(size=(p, p)) + offset * rng.normal(size=p)
    y = x @ rng.normal(size=(p, q)) + noise * rng.normal(size=(n, q)) - offset
    return x, y


# --- agreement with the straightforward implementation ------------------------------------


@pytest.mark.parametrize("n, p, q", [(60, 5, 8), (80, 9, 4), (50, 6, 6), (120, 12, 3)])
@pytest.mark.parametrize("threshold", [0.99, 0.9])
def test_matches_naive_implementation(n, p, q, threshold):
    """Unseen random data, p != q both ways: every metric to float64 precision (measured
    <= 2e-15; bound 1e-12)."""
    rng = np.random.default_rng(1000 * n + 10 * p + q)
    x, y = related(rng, n, p, q, noise=2.0)
    want = naive_metrics(x, y, svcca_threshold=threshold)
    got = compare_arrays(x, y, svcca_threshold=threshold)
    for metric in ALL:
        assert got[metric] == pytest.approx(want[metric], abs=1e-12), metric
    assert compare_arrays(y, x, "pwcca", svcca_threshold=threshold)["pwcca"] == pytest.approx(
        want["pwcca_yx"], abs=1e-12
    )


# --- axioms and invariances --------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    return related(np.random.default_rng(7), 90, 6, 5, noise=1.5)


def test_symmetric_metrics_are_symmetric(pair):
    x, y = pair
    xy, yx = compare_arrays(x, y), compare_arrays(y, x)
    for metric in SYMMETRIC:
        assert xy[metric] == pytest.approx(yx[metric], abs=1e-12), metric
    assert abs(xy["pwcca"] - yx["pwcca"]) > 1e-6  # PWCCA is not symmetric
    assert not METRICS["pwcca"].symmetric


def test_identical_inputs(pair):
    x, _ = pair
    got = compare_arrays(x, x)
    for metric in ALL:
        want = 0.0 if METRICS[metric].direction == "distance" else 1.0
        assert got[metric] == pytest.approx(want, abs=1e-9), metric


def test_cka_and_procrustes_invariant_to_orthogonal_maps_and_scaling(pair):
    x, y = pair
    q = ortho_group.rvs(x.shape[1], random_state=1)
    base = compare_arrays(x, y, ["linear_cka", "linear_cka_debiased", "procrustes", "svcca"])
    for x2, y2 in [(x @ q, y), (x, 7.5 * y), (0.01 * x @ q + 4.0, y * 3)]:
        got = compare_arrays(x2, y2, list(base))
        for metric, value in base.items():
            assert got[metric] == pytest.approx(value, abs=1e-9), metric


def test_cca_family_invariant_to_invertible_maps(pair):
    x, y = pair
    rng = np.random.default_rng(2)
    a = rng.normal(size=(x.shape[1], x.shape[1])) + 3 * np.eye(x.shape[1])
    b = rng.normal(size=(y.shape[1], y.shape[1]))
    metrics = ["mean_cca", "mean_sq_cca"]
    base = compare_arrays(x, y, metrics)
    got = compare_arrays(x @ a - 2.0, y @ b, metrics)
    for metric in metrics:
        assert got[metric] == pytest.approx(base[metric], abs=1e-9), metric
    # PWCCA weights are L1 norms over features: invariant to signed permutations and scale.
    signed_perm = np.eye(x.shape[1])[rng.permutation(x.shape[1])] * [1, -1, 1, 1, -1, 1]
    assert compare_arrays(3 * x @ signed_perm, y, "pwcca")["pwcca"] == pytest.approx(
        compare_arrays(x, y, "pwcca")["pwcca"], abs=1e-9
    )


def test_values_in_range(pair):
    x, y = pair
    got = compare_arrays(x, y)
    for metric in ["linear_cka", "mean_cca", "mean_sq_cca", "svcca", "pwcca"]:
        assert 0.0 <= got[metric] <= 1.0 + 1e-12, metric
    assert 0.0 <= got["procrustes"] <= 2.0


# --- robustness --------------------------------------------------------------------------


def test_float32_large_means_linear_cka_within_1e6_relative():
    """Means ~1e4, unit variance, float32 storage and GEMM: within 1e-6 relative of float64."""
    rng = np.random.default_rng(11)
    x64, y64 = related(rng, 3000, 24, 16, noise=1.0, offset=0.0)
    x64 /= x64.std(0)
    y64 /= y64.std(0)
    x = (1e4 + x64).astype(np.float32)
    y = (-1e4 + y64).astype(np.float32)
    exact = compare_arrays(x.astype(np.float64), y.astype(np.float64))
    fast = compare_arrays(x, y, gemm_dtype=np.float32)
    assert fast["linear_cka"] == pytest.approx(exact["linear_cka"], rel=1e-6, abs=0)
    # streamed in blocks on the float32 path too
    parts = [
        block_moments(np.hstack([x, y])[i : i + 700], widths_a=(24, 16), gemm_dtype=np.float32)
        for i in range(0, 3000, 700)
    ]
    tile = merge_all(parts)
    cx = prepare_unit(unit_moments(tile, 0), ["linear_cka"])
    cy = prepare_unit(unit_moments(tile, 1), ["linear_cka"])
    streamed = compare_pair(cx, cy, pair_moments(tile, 0, 1), ["linear_cka"])["linear_cka"][0]
    assert streamed == pytest.approx(exact["linear_cka"], rel=1e-6, abs=0)


def test_dead_and_duplicate_features(pair):
    """Constant and collinear columns are floored, not inverted: finite values, no warning.

    A constant column adds nothing to any moment, so CKA, Procrustes and SVCCA are unchanged;
    a duplicated column adds no canonical direction, so the sum of the canonical correlations
    is unchanged (the mean runs over min(p', q) with the new p')."""
    x, y = pair
    p, q = x.shape[1], y.shape[1]
    x_dead = np.hstack([x, np.full((x.shape[0], 1), 5.0)])
    x_dup = np.hstack([x, x[:, :1] * 2.0 + 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        base, dead, dup = (compare_arrays(a, y) for a in (x, x_dead, x_dup))
    for got in (dead, dup):
        assert all(np.isfinite(v) for v in got.values())
        for metric in ("mean_cca", "mean_sq_cca"):
            assert got[metric] * min(p + 1, q) == pytest.approx(base[metric] * min(p, q),
                                                               abs=1e-9), metric
    for metric in ("linear_cka", "linear_cka_debiased", "procrustes", "svcca"):
        assert dead[metric] == pytest.approx(base[metric], abs=1e-12), metric


def test_more_features_than_rows_warns_and_is_defined():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(12, 20)), rng.normal(size=(12, 6))
    with pytest.warns(FewRowsWarning, match="'x' has 20 features but only 12 rows"):
        got = compare_arrays(x, y)
    assert all(np.isfinite(v) for v in got.values())
    # x spans the whole centered row space: every direction of y is perfectly explained
    assert got["mean_cca"] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < got["linear_cka"] < 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare_arrays(x, y, ["linear_cka", "procrustes"])  # no whitening, no warning


def test_zero_variance_unit_is_refused_by_name():
    m = unit_moments(block_moments(np.full((10, 3), 2.5), widths_a=(3,)), 0)
    with pytest.raises(InputError, match="'model_a/layer3' has zero variance"):
        prepare_unit(m, ["mean_cca"], name="model_a/layer3")
    with pytest.raises(InputError, match="'y' has zero variance"):
        compare_arrays(np.eye(10)[:, :4], np.ones((10, 2)) * 1e4)


def test_unknown_metric_suggests_closest():
    with pytest.raises(InputError, match="unknown metric 'linear_ckaa'; did you mean 'linear_cka'"):
        check_metrics(["linear_ckaa"])
    with pytest.raises(InputError, match="did you mean 'pwcca'"):
        compare_arrays(np.eye(5), np.eye(5), "pwca")
    assert check_metrics("svcca") == ("svcca",)
    assert check_metrics(["pwcca", "svcca", "pwcca"]) == ("pwcca", "svcca")
    assert check_metrics(None) == ALL


@pytest.mark.parametrize(
    "x, y, match",
    [
        (np.zeros(5), np.zeros((5, 2)), "x must be 2-D"),
        (np.eye(5), np.eye(4), "same rows"),
        (np.eye(5), np.where(np.eye(5) > 0, np.nan, 1.0), "y has NaN or Inf"),
        (np.eye(5), np.eye(5).astype(complex), "real numeric"),
    ],
)
def test_compare_arrays_validates_input(x, y, match):
    with pytest.raises(InputError, match=match):
        compare_arrays(x, y)


def test_debiased_cka_needs_fourth_order_moments():
    z = np.random.default_rng(0).normal(size=(20, 4))
    tile = block_moments(z, widths_a=(2, 2))
    with pytest.raises(InputError, match="fourth=True"):
        prepare_unit(unit_moments(tile, 0), ["linear_cka_debiased"], name="u")


# --- PWCCA without arbitrary choices -------------------------------------------------------


@pytest.fixture(scope="module")
def wide_narrow():
    """A 48-wide and a 24-wide layer of the same inputs (p > q: x's SVD basis has a
    24-column completion that LAPACK chooses arbitrarily)."""
    rng = np.random.default_rng(48)
    h = rng.standard_normal((2000, 30))
    x = np.tanh(h @ rng.standard_normal((30, 48)) / 5) + 0.5 * rng.standard_normal((2000, 48))
    y = np.tanh(h[:, :20] @ rng.standard_normal((20, 24)) / 4) + 0.5 * rng.standard_normal(
        (2000, 24))
    return x, y


def _published_pwcca(x, y, completion):
    """sim_metric's pwcca_dist convention (weights normalised over all p columns of the
    full U), with U's completion rotated by ``completion``: what the published code gives
    depends on that arbitrary basis."""
    from tests.math import naive

    a, b = naive._prepare(x), naive._prepare(y)
    (wa, _), (wb, _) = naive._whiten(a), naive._whiten(b)
    u, rho, _ = np.linalg.svd(wa @ a.T @ b @ wb, full_matrices=True)
    k = rho.size
    u = np.hstack([u[:, :k], u[:, k:] @ completion])
    weights = np.abs((a @ wa @ u).T @ a).sum(axis=1)
    return float((weights / weights.sum())[:k] @ rho)


def test_pwcca_does_not_depend_on_the_completion(wide_narrow):
    """The published convention moves by ~3e-3 with the completion; ours uses the k =
    min(rank x, rank y) variates only: invariant to any map of y that keeps its column
    space (which changes the SVD's completion), to column permutations and sign flips of
    either side, and equal to the naive implementation."""
    x, y = wide_narrow
    published = [_published_pwcca(x, y, ortho_group.rvs(24, random_state=s)) for s in range(8)]
    assert max(published) - min(published) > 1e-3  # the arbitrariness this definition removes
    base = compare_arrays(x, y, "pwcca")["pwcca"]
    assert base == pytest.approx(naive_metrics(x, y, debiased=False)["pwcca"], abs=1e-12)
    rng = np.random.default_rng(3)
    flips_x = np.eye(48)[rng.permutation(48)] * rng.choice([-1, 1], 48)
    for s in range(4):
        r = ortho_group.rvs(24, random_state=10 + s)
        mixed = y @ (r + 0.3 * rng.standard_normal((24, 24)))  # invertible: same span
        for x2, y2 in [(x, y @ r), (x, mixed), (x @ flips_x, y[:, rng.permutation(24)])]:
            assert compare_arrays(x2, y2, "pwcca")["pwcca"] == pytest.approx(base, abs=1e-10)


def test_pwcca_equals_published_for_full_rank_units_with_p_at_most_q(wide_narrow):
    """The seed paper's case (and p < q): no completion, so both conventions coincide."""
    x, y = wide_narrow
    for a, b in [(y, x), (x[:, :24], y)]:  # U is square: it has no completion
        assert compare_arrays(a, b, "pwcca")["pwcca"] == pytest.approx(
            _published_pwcca(a, b, np.eye(0)), abs=1e-12)


def test_pwcca_of_a_job_equals_compare_arrays(wide_narrow):
    """Streamed float32 moments through the driver and the in-memory float64 path agree in
    both directions (they disagreed by 3e-2 when the completion entered the weights)."""
    x, y = wide_narrow
    x, y = x.astype(np.float32), y.astype(np.float32)
    acc = TileAccumulator((48, 24), None, gemm_dtype=np.float32)
    z = np.hstack([x, y])
    for i in range(0, 2000, 300):
        acc.update(z[i:i + 300])
    tile = acc.result()
    got = similarity_matrices([unit_moments(tile, 0), unit_moments(tile, 1)],
                              lambda i, j: pair_moments(tile, i, j), ["pwcca"])["pwcca"]
    assert got[0, 1] == pytest.approx(compare_arrays(x, y, "pwcca")["pwcca"], abs=1e-6)
    assert got[1, 0] == pytest.approx(compare_arrays(y, x, "pwcca")["pwcca"], abs=1e-6)


def test_pwcca_weights_over_the_variates_that_exist():
    """A rank-5 unit of width 20 against a full-rank 12-wide one: k = 5 weights."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 20))
    y = x[:, :12] + rng.standard_normal((400, 12))
    tile = block_moments(np.hstack([x, y]), widths_a=(20, 12))
    cx = prepare_unit(unit_moments(tile, 0), ["pwcca"], precision="float64")
    cy = prepare_unit(unit_moments(tile, 1), ["pwcca"], precision="float64")
    assert (cx.rank, cy.rank) == (5, 12) and cx.root.shape == (20, 5)
    xy, yx = compare_pair(cx, cy, pair_moments(tile, 0, 1))["pwcca"]
    want = naive_metrics(x, y, debiased=False)
    assert (xy, yx) == (pytest.approx(want["pwcca"], abs=1e-12),
                        pytest.approx(want["pwcca_yx"], abs=1e-12))


def test_metric_attributes_state_the_conventions():
    from repscope.cluster.registry import metric_attributes

    for name in ALL:
        attrs = metric_attributes(name)
        assert attrs["direction"] == METRICS[name].direction and attrs["convention"]
        assert attrs["rank_cut"] == METRICS[name].needs_whitening
    assert "over min(p, q)" in metric_attributes("mean_cca")["convention"]
    assert "count as 0" in metric_attributes("mean_sq_cca")["convention"]
    assert "min(rank x, rank y)" in metric_attributes("pwcca")["convention"]
    with pytest.raises(InputError, match="did you mean 'pwcca'"):
        metric_attributes("pwca")


# --- extreme but finite values ----------------------------------------------------------------


@pytest.mark.parametrize("value", [1e30, 3e38, 1e-30])
def test_extreme_finite_values_give_correct_finite_results(value):
    """One extreme entry in a float32 unit: every path is finite and equals the float64
    reference (the unit is then dominated by that row, as in exact arithmetic)."""
    from repscope.cluster.gram import sample_space_metrics

    rng = np.random.default_rng(30)
    x = rng.standard_normal((500, 12)).astype(np.float32)
    y = (x[:, :8] @ rng.standard_normal((8, 9)) + rng.standard_normal((500, 9))
         ).astype(np.float32)
    x[7, 3] = value
    metrics = [m for m in ALL if m != "linear_cka_debiased"]
    want = naive_metrics(x, y, debiased=False)
    for dtype in (np.float32, np.float64):
        got = compare_arrays(x, y, metrics, gemm_dtype=dtype)
        for m in metrics:
            assert got[m] == pytest.approx(want[m], abs=2e-6), (m, dtype)
    sample = sample_space_metrics(x, y, [m for m in metrics if m != "pwcca"], dtype=np.float32)
    for m, v in sample.items():
        assert v == pytest.approx(want[m], abs=2e-6), m


def test_a_tiny_unit_keeps_its_digits():
    """Values near 1e-25: their float32 products would underflow; scaled, they do not."""
    rng = np.random.default_rng(31)
    x = rng.standard_normal((400, 10))
    y = x[:, :6] @ rng.standard_normal((6, 7)) + rng.standard_normal((400, 7))
    tiny = (x * 1e-25).astype(np.float32)
    want = naive_metrics(tiny, y)
    got = compare_arrays(tiny, y, gemm_dtype=np.float32)
    for m in ALL:
        assert got[m] == pytest.approx(want[m], abs=1e-6), m


def test_debiased_cka_dominated_by_one_row_is_refused_by_name():
    """With one value of 1e30 the unbiased self-HSIC is negative (the estimator is undefined
    there; the float64 formula gives NaN): an error naming the unit, never a NaN."""
    x = np.random.default_rng(0).standard_normal((300, 6)).astype(np.float32)
    x[5, 2] = 1e30
    with pytest.raises(InputError, match="'x': its debiased self-HSIC .* not positive"):
        compare_arrays(x, x[:, :4] + 1, "linear_cka_debiased", gemm_dtype=np.float32)


def test_non_finite_statistics_are_errors_naming_the_units():
    from repscope.cluster.gram import gram_similarity_matrices
    from repscope.cluster.moments import PairMoments, UnitMoments

    good = UnitMoments(10, np.zeros(2), np.eye(2))
    bad = UnitMoments(10, np.zeros(2), np.array([[1.0, np.inf], [np.inf, 1.0]]))
    with pytest.raises(InputError, match="'m/l1': its second moments is not finite"):
        prepare_unit(bad, ["linear_cka"], name="m/l1")
    cx = prepare_unit(good, ["linear_cka", "procrustes"], name="a/x")
    cy = prepare_unit(good, ["linear_cka", "procrustes"], name="b/y")
    with pytest.raises(InputError, match="of units 'a/x' and 'b/y' is not finite"):
        compare_pair(cx, cy, PairMoments(np.array([[np.nan, 0.0], [0.0, 1.0]])),
                     ["linear_cka"])
    kl = np.array([[1.0, np.nan], [np.nan, 1.0]])
    with pytest.raises(InputError, match="linear_cka of 'm/a' and 'm/b'"):
        gram_similarity_matrices(10, kl, np.zeros((2, 2)), np.ones(2), ["linear_cka"],
                                 names=["m/a", "m/b"])


# --- the pairwise driver over multi-unit groups --------------------------------------------


def test_similarity_matrices_over_groups_equal_pairwise_compare_arrays():
    """Two groups (3 + 2 units), streamed in blocks, three tiles: every entry equals the
    in-memory comparison of that pair, PWCCA in both directions."""
    rng = np.random.default_rng(21)
    n = 150
    base = rng.normal(size=(n, 6))
    widths = [(4, 6, 3), (5, 2)]
    arrays = [
        base @ rng.normal(size=(6, w)) + rng.normal(size=(n, w)) + rng.normal(size=w) * 10
        for w in widths[0] + widths[1]
    ]
    groups = [np.hstack(arrays[:3]), np.hstack(arrays[3:])]
    where = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    cuts = [0, 40, 41, 100, n]
    blocks = list(zip(cuts[:-1], cuts[1:], strict=True))

    def tile(a, b):
        if a == b:
            return merge_all([block_moments(groups[a][i:j], widths_a=widths[a], fourth=True)
                              for i, j in blocks])
        return merge_all([block_moments(groups[a][i:j], groups[b][i:j], widths_a=widths[a],
                                        widths_b=widths[b], fourth=True) for i, j in blocks])

    tiles = {(0, 0): tile(0, 0), (1, 1): tile(1, 1), (0, 1): tile(0, 1)}
    units = [unit_moments(tiles[(g, g)], u) for g, u in where]

    def cross(i, j):
        (gi, ui), (gj, uj) = where[i], where[j]
        return pair_moments(tiles[(gi, gj)], ui, uj)

    names = [f"m{g}/l{u}" for g, u in where]
    got = similarity_matrices(units, cross, None, names=names)
    for i in range(5):
        for j in range(5):
            want = compare_arrays(arrays[i], arrays[j])
            for metric in ALL:
                assert got[metric][i, j] == pytest.approx(want[metric], abs=1e-9), (metric, i, j)

    partial = similarity_matrices(units, cross, ["linear_cka", "pwcca"], pairs=[(3, 1), (2, 2)])
    assert set(partial) == {"linear_cka", "pwcca"}
    done = ~np.isnan(partial["pwcca"])
    assert done.sum() == 3 and done[1, 3] and done[3, 1] and done[2, 2]
    assert partial["pwcca"][3, 1] == pytest.approx(got["pwcca"][3, 1], abs=1e-12)


def test_similarity_matrices_names_the_bad_unit():
    z = np.random.default_rng(0).normal(size=(30, 5))
    z[:, 3:] = 1.0
    tile = block_moments(z, widths_a=(3, 2))
    units = [unit_moments(tile, 0), unit_moments(tile, 1)]
    with pytest.raises(InputError, match="'vit/block7' has zero variance"):
        similarity_matrices(units, lambda i, j: pair_moments(tile, i, j), ["svcca"],
                            names=["vit/block6", "vit/block7"])


def test_nuclear_norms_of_mixed_shapes_in_order():
    from repscope.cluster.pairs import nuclear_norms

    rng = np.random.default_rng(5)
    blocks = [rng.standard_normal(shape) for shape in [(4, 3), (5, 5), (4, 3), (3, 4), (5, 5)]]
    blocks.append(np.asfortranarray(rng.standard_normal((40, 40)))[3:8, 10:15])  # a view
    want = [np.linalg.svd(b, compute_uv=False).sum() for b in blocks]
    np.testing.assert_allclose(nuclear_norms(blocks), want, rtol=1e-13)
    assert nuclear_norms([]) == []


def test_similarity_matrices_in_chunks_on_threads_equal_pair_by_pair():
    """120 pairs of units of two widths: several chunks (stacked SVDs of mixed shapes)."""
    rng = np.random.default_rng(6)
    widths = (3, 5) * 7 + (4,)
    z = rng.standard_normal((60, sum(widths)))
    tile = block_moments(z, widths_a=widths)
    units = [unit_moments(tile, u) for u in range(len(widths))]
    metrics = ["linear_cka", "procrustes"]
    serial = similarity_matrices(units, lambda i, j: pair_moments(tile, i, j), metrics)
    threaded = similarity_matrices(units, lambda i, j: pair_moments(tile, i, j), metrics,
                                   threads=2)
    caches = [prepare_unit(u, metrics) for u in units]
    for i in range(len(widths)):
        for j in range(i, len(widths)):
            want = compare_pair(caches[i], caches[j], pair_moments(tile, i, j), metrics)
            for m in metrics:
                assert serial[m][i, j] == pytest.approx(want[m][0], abs=1e-13)
                assert threaded[m][j, i] == pytest.approx(want[m][1], abs=1e-13)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_a_unit_against_itself_equals_the_computed_pair(precision):
    """The diagonal comes from the definitions (pairs.self_pair); computing the pair (x, x)
    instead gives the same values to rounding, full rank or not (r/p for the CCA means)."""
    rng = np.random.default_rng(7)
    full = rng.standard_normal((300, 12)) + 0.5 * rng.standard_normal((300, 1))
    low = rng.standard_normal((300, 4)) @ rng.standard_normal((4, 10))  # rank 4 of 10
    dead = np.hstack([rng.standard_normal((300, 6)), np.zeros((300, 3))])  # rank 6 of 9
    widths = (12, 10, 9)
    z = np.hstack([full, low, dead]).astype(np.float32)
    gemm = np.float32 if precision == "float32" else np.float64
    tile = block_moments(z, widths_a=widths, gemm_dtype=gemm)
    units = [unit_moments(tile, u) for u in range(3)]
    metrics = ["linear_cka", "mean_cca", "mean_sq_cca", "pwcca", "svcca", "procrustes"]
    got = similarity_matrices(units, lambda i, j: pair_moments(tile, i, j), metrics,
                              precision=precision)
    for u, rank in enumerate((12, 4, 6)):
        cache = prepare_unit(units[u], metrics, precision=precision)
        assert cache.rank == rank
        computed = compare_pair(cache, cache, pair_moments(tile, u, u), metrics)
        for m in metrics:
            # measured: 2.6e-7 apart in float32 (Procrustes of the rank-4 unit: the computed
            # nuclear norm sums the square roots of its noise eigenvalues), 2e-15 otherwise
            tol = 1e-6 if precision == "float32" else 1e-12
            assert got[m][u, u] == pytest.approx(computed[m][0], abs=tol), (m, u)
        assert got["mean_cca"][u, u] == rank / widths[u]
        assert got["procrustes"][u, u] == 0.0
