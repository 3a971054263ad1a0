"""Rank-deficient units in both spaces and both precisions, against an independent float64
implementation (tests/math/naive.py): the rank cut, its ambiguity test, zero variance."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from repscope.cluster.accumulate import TileAccumulator, block_moments
from repscope.cluster.caches import ambiguous_units, prepare_unit
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
from repscope.cluster.pairs import compare_pair
from repscope.cluster.rank import AmbiguousRankError, decide_rank, spectrum
from repscope.cluster.registry import METRICS, MOMENT_METRICS
from repscope.errors import InputError
from tests.math.layers import RANKS, low_rank, model_layers
from tests.math.naive import naive_metrics

ALL = MOMENT_METRICS
CCA_LIKE = ("mean_cca", "mean_sq_cca", "pwcca", "svcca")
# Targets of issue 14 at the default settings: CCA family 1e-4, CKA and Procrustes 2e-5.
TARGET = {m: (1e-4 if METRICS[m].needs_whitening else 2e-5) for m in ALL}
# Measured on these units (feature float32 <= 2e-7, sample float32 <= 3e-8, float64
# <= 2e-14): the tests hold the float64 paths to float64 and the float32 ones to the targets.
FLOAT64_TOL = 1e-11
# Except sample-space Procrustes: it keeps the Gram's eigenpairs above the rank cut, while
# the reference's nuclear norm also sums the square roots of the float32 data's own rounding
# directions (eigenvalues near 1e-16 of the largest, so about 1e-8 each).
FLOAT64_SAMPLE = dict.fromkeys(ALL, FLOAT64_TOL) | {"procrustes": 1e-7}


def reference(units, debiased_pairs=()) -> dict[str, np.ndarray]:
    """(U, U) matrices of the naive float64 implementation; debiased CKA (n x n Grams) only
    on ``debiased_pairs`` (NaN elsewhere)."""
    count = len(units)
    out = {m: np.full((count, count), np.nan) for m in ALL}
    for i in range(count):
        for j in range(i, count):
            r = naive_metrics(units[i], units[j], debiased=(i, j) in debiased_pairs)
            for m in ALL:
                if m == "pwcca":
                    out[m][i, j], out[m][j, i] = r["pwcca"], r["pwcca_yx"]
                elif m in r:
                    out[m][i, j] = out[m][j, i] = r[m]
    return out


def feature_matrices(units, dtype, block=700):
    """The job's feature path: one TileAccumulator over row blocks, then the driver."""
    widths = [u.shape[1] for u in units]
    acc = TileAccumulator(widths, None, fourth=True, gemm_dtype=dtype)
    z = np.hstack(units)
    for i in range(0, z.shape[0], block):
        acc.update(z[i:i + block])
    tile = acc.result()
    caches: dict = {}
    mats = similarity_matrices([unit_moments(tile, i) for i in range(len(units))],
                               lambda i, j: pair_moments(tile, i, j), ALL,
                               precision=dtype, caches=caches)
    return mats, caches


def sample_matrices(units, dtype):
    """The job's sample path: a Gram per unit, one diagonal tile, the CKA finish."""
    grams = [unit_gram(u, dtype=dtype, basis=True, name=f"u{i}") for i, u in enumerate(units)]
    tile = gram_tile(grams, None, SAMPLE_METRICS)
    mats = gram_similarity_matrices(units[0].shape[0], tile.kl_off, tile.dd, tile.trace_a,
                                    SAMPLE_METRICS)
    for m, v in tile.values.items():
        mats[m] = np.triu(v) + np.triu(v, 1).T
    return mats, grams


def assert_close(got, want, tol, space):
    for m, v in got.items():
        done = ~np.isnan(want[m])
        err = float(np.abs(v[done] - want[m][done]).max())
        bound = tol if isinstance(tol, float) else tol[m]
        assert err <= bound, f"{space}: {m} off by {err:.2e} (bound {bound:.0e})"


# --- the issue's case: 3 models x 4 layers, 3,000 rows ----------------------------------


@pytest.fixture(scope="module")
def issue_units():
    return [layer for seed in (1, 2, 3) for layer in model_layers(seed, rows=3000)]


@pytest.fixture(scope="module")
def issue_reference(issue_units):
    return reference(issue_units, debiased_pairs={(0, 1), (2, 11)})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_issue_layers_feature_space(issue_units, issue_reference, dtype):
    """Dead ReLU units, a rank-40 layer of width 96, duplicated columns, a full-rank layer:
    every metric of every pair within the targets (float32, was 0.29 for mean CCA) or to
    float64 precision, and each unit's rank is its true rank."""
    mats, caches = feature_matrices(issue_units, dtype)
    assert_close(mats, issue_reference, TARGET if dtype == np.float32 else FLOAT64_TOL,
                 f"feature {dtype.__name__}")
    assert [caches[i].rank for i in range(12)] == list(RANKS) * 3
    assert ambiguous_units(caches) == []


def test_issue_layers_compare_arrays_float32(issue_units, issue_reference):
    for i, j in [(0, 1), (1, 6), (2, 11), (7, 4), (9, 9)]:
        got = compare_arrays(issue_units[i], issue_units[j], gemm_dtype=np.float32)
        for m in ALL:
            want = issue_reference[m][i, j]
            if not np.isnan(want):
                assert got[m] == pytest.approx(want, abs=TARGET[m]), (m, i, j)


@pytest.fixture(scope="module")
def sample_units():
    """The same layers at 1,000 rows (the sample space's n x n eigendecompositions)."""
    return [layer for seed in (1, 2, 3) for layer in model_layers(seed, rows=1000)]


@pytest.fixture(scope="module")
def sample_reference(sample_units):
    return reference(sample_units, debiased_pairs={(0, 1), (3, 10)})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_issue_layers_sample_space(sample_units, sample_reference, dtype):
    """Forced into the sample space (was 0.58 off): the Gram path within the targets, and
    the rank read from the Gram's spectrum equals feature space's."""
    want = sample_reference
    mats, grams = sample_matrices(sample_units, dtype)
    assert_close(mats, want, TARGET if dtype == np.float32 else FLOAT64_SAMPLE,
                 f"sample {dtype.__name__}")
    assert [g.rank for g in grams] == list(RANKS) * 3
    assert all(g.ambiguous is None for g in grams)


def test_rank_50_of_width_100_in_sample_space():
    """The issue's second case: mean CCA was 0.491 in the sample space, exactly 0.359."""
    rng = np.random.default_rng(50)
    x = low_rank(1000, 100, 50, seed=1)
    y = (x[:, :30] @ rng.standard_normal((30, 100)) + 3 * rng.standard_normal((1000, 100))
         ).astype(np.float32)
    want = naive_metrics(x, y)
    for dtype in (np.float32, np.float64):
        got = sample_space_metrics(x, y, dtype=dtype)
        for m in got:
            assert got[m] == pytest.approx(want[m], abs=TARGET[m]), (m, dtype)
    gx = unit_gram(x, dtype=np.float32, basis=True)
    assert gx.rank == 50 and gx.ambiguous is None
    assert 0.3 < want["mean_cca"] < 0.45  # the value the floor got wrong


# --- each kind on its own, both spaces, both precisions -------------------------------------


def _kinds():
    rng = np.random.default_rng(8)
    base = rng.standard_normal((600, 24))
    normal = (base @ rng.standard_normal((24, 30)) + rng.standard_normal((600, 30))
              ).astype(np.float32)
    dead = np.maximum(base @ rng.standard_normal((24, 40)) - 0.5, 0)
    dead[:, :12] = 0.0
    constant = np.hstack([normal[:, :20], np.full((600, 6), 7.25, np.float32)])
    dup = np.hstack([normal[:, :20], normal[:, :8] * 2.0])
    return {
        # kind: (x, its rank)
        "dead relu units": (dead.astype(np.float32), 28),
        "rank 12 of width 40": (low_rank(600, 40, 12, seed=3), 12),
        "duplicated columns": (dup.astype(np.float32), 20),
        "constant columns mixed in": (constant, 20),
    }, normal


@pytest.mark.parametrize("kind", ["dead relu units", "rank 12 of width 40",
                                  "duplicated columns", "constant columns mixed in"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_each_kind_of_rank_deficiency(kind, dtype):
    kinds, y = _kinds()
    x, rank = kinds[kind]
    want = naive_metrics(x, y)
    want_yx = naive_metrics(y, x)
    tol = TARGET if dtype == np.float32 else dict.fromkeys(ALL, FLOAT64_TOL)
    got = compare_arrays(x, y, gemm_dtype=dtype)
    for m in ALL:
        assert got[m] == pytest.approx(want[m], abs=tol[m]), m
    assert compare_arrays(y, x, "pwcca", gemm_dtype=dtype)["pwcca"] == pytest.approx(
        want_yx["pwcca"], abs=tol["pwcca"])
    sample = sample_space_metrics(x, y, dtype=dtype)
    stol = TARGET if dtype == np.float32 else FLOAT64_SAMPLE
    for m in SAMPLE_METRICS:
        assert sample[m] == pytest.approx(want[m], abs=stol[m]), ("sample", m)
    tile = block_moments(x, widths_a=(x.shape[1],), gemm_dtype=dtype)
    cache = prepare_unit(unit_moments(tile, 0), ["mean_cca"], precision=dtype)
    assert cache.rank == rank and cache.ambiguous is None
    assert unit_gram(x, dtype=dtype, basis=True).rank == rank


@pytest.mark.filterwarnings("ignore::repscope.cluster.registry.FewRowsWarning")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_more_features_than_rows(dtype):
    """n < d: rank n - 1 in both spaces; every metric as the float64 reference."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((60, 90)) + 2).astype(np.float32)
    y = (x[:, :40] @ rng.standard_normal((40, 70)) + rng.standard_normal((60, 70))
         ).astype(np.float32)
    want = naive_metrics(x, y)
    tol = TARGET if dtype == np.float32 else dict.fromkeys(ALL, FLOAT64_TOL)
    stol = TARGET if dtype == np.float32 else FLOAT64_SAMPLE
    got = compare_arrays(x, y, gemm_dtype=dtype)
    sample = sample_space_metrics(x, y, dtype=dtype)
    for m in ALL:
        assert got[m] == pytest.approx(want[m], abs=tol[m]), m
        if m in sample:
            assert sample[m] == pytest.approx(want[m], abs=stol[m]), ("sample", m)
    m = unit_moments(block_moments(x, widths_a=(90,), gemm_dtype=dtype), 0)
    assert prepare_unit(m, ["mean_cca"], precision=dtype).rank == 59
    assert unit_gram(x, dtype=dtype, basis=True).rank == 59


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_wide_rank_deficient_units_on_the_blocked_paths(dtype):
    """Widths above 1,024 (the accumulator adds and mirrors in 1,024-column steps; the
    diagonal tile spans several): a rank-300 unit of width 1,100 and a full-rank 1,030."""
    rng = np.random.default_rng(12)
    x = low_rank(1200, 1100, 300, seed=5)
    y = (np.tanh(x[:, :200] @ rng.standard_normal((200, 1030)) / 250)
         + 0.3 * rng.standard_normal((1200, 1030))).astype(np.float32)
    want = naive_metrics(x, y, debiased=False)
    mats, caches = feature_matrices([x, y], dtype, block=1000)
    tol = TARGET if dtype == np.float32 else dict.fromkeys(ALL, 1e-9)
    if dtype == np.float64:
        # 1,200 rows against 1,030 full-rank columns: x's 300 correlations are close to 1
        # and nearly equal, and within such a cluster the variates (so PWCCA's weights) are
        # ill-conditioned; measured 3.7e-6 between two float64 implementations (mean CCA
        # 1e-15).
        tol["pwcca"] = 1e-5
    for m in ALL:
        if m in want:
            assert mats[m][0, 1] == pytest.approx(want[m], abs=tol[m]), m
    assert (caches[0].rank, caches[1].rank) == (300, 1030)


# --- the rule -----------------------------------------------------------------------------


def test_same_rank_and_cut_in_both_spaces():
    """The Gram's nonzero spectrum is Cxx's: the same rule gives the same rank and cut."""
    x = low_rank(400, 60, 25, seed=9)
    for dtype in (np.float32, np.float64):
        c = prepare_unit(unit_moments(block_moments(x, widths_a=(60,), gemm_dtype=dtype), 0),
                         ["mean_cca"], precision=dtype)
        g = unit_gram(x, dtype=dtype, basis=True)
        assert c.rank == g.rank == 25
        assert g.cut == pytest.approx(c.cut, rel=1e-3)
        np.testing.assert_allclose(g.evals, c.evals[:25], rtol=1e-5)


def test_cut_follows_the_precision_and_the_override():
    evals = np.array([1.0, 0.5, 1e-3, 3e-8, 1e-9, -2e-12])
    r32 = decide_rank(evals, gemm_dtype=np.float32, sum_squares=2.0)
    r64 = decide_rank(evals, gemm_dtype=np.float64, sum_squares=2.0)
    assert r32.rank == 3 and r64.rank == 5
    assert 32 * np.finfo(np.float32).eps <= r32.cut < 1e-5
    assert r64.cut == pytest.approx(8e-12)  # 4 x the measured negative eigenvalue
    assert r32.ambiguous is None  # 3e-8 and 1e-9 lie well below the float32 cut
    # explicit relative floor: no ambiguity test, the user's cut
    assert decide_rank(evals, gemm_dtype=np.float32, sum_squares=2.0, eig_floor=0).rank == 5
    assert decide_rank(evals, gemm_dtype=np.float32, sum_squares=2.0, eig_floor=1e-2).rank == 2
    # a large negative eigenvalue is measured noise: the cut rises to 4x its size
    noisy = decide_rank(np.array([1.0, 1e-4, -1e-4]), gemm_dtype=np.float32, sum_squares=1.0)
    assert noisy.cut == pytest.approx(4e-4) and noisy.rank == 1


def test_eig_floor_override_reaches_every_path():
    """compute.eig_floor: 0 keeps float32 rounding noise as rank (the old failure), by choice."""
    x = low_rank(500, 48, 20, seed=4)
    m = unit_moments(block_moments(x, widths_a=(48,), gemm_dtype=np.float32), 0)
    assert prepare_unit(m, ["mean_cca"], precision="float32").rank == 20
    forced = prepare_unit(m, ["mean_cca"], precision="float32", eig_floor=0.0)
    assert forced.rank > 20 and forced.ambiguous is None
    assert unit_gram(x, dtype=np.float32, basis=True, eig_floor=0.5).rank < 20


def test_noise_is_far_below_the_cut():
    """The measurement behind the rule, as a regression check: float32 null spaces of the
    issue's layers and of low-rank units stay below a fifth of the cut in both spaces."""
    units = model_layers(7, rows=2000)[:3] + [low_rank(3000, 64, 1, seed=2),
                                              low_rank(3000, 96, 40, seed=3)]
    ranks = list(RANKS[:3]) + [1, 40]
    for x, rank in zip(units, ranks, strict=True):
        acc = TileAccumulator((x.shape[1],), None, gemm_dtype=np.float32)
        acc.update(x)
        c = acc.result().c
        evals, _ = spectrum(c)
        decision = decide_rank(evals, gemm_dtype=np.float32, sum_squares=float(np.trace(c)))
        assert decision.rank == rank
        assert np.abs(evals[rank:]).max(initial=0) < decision.cut / 5


# --- never silently wrong: ambiguous units ---------------------------------------------------


def _ambiguous_pair():
    """x with a spectrum running continuously through the float32 cut (1 down to 1e-8 of
    the largest): float32 statistics cannot say where its signal ends."""
    rng = np.random.default_rng(13)
    d = 48
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    base = rng.standard_normal((1500, d))
    x = ((base * np.logspace(0, -4, d)) @ q).astype(np.float32)
    y = (np.tanh(base[:, :20] @ rng.standard_normal((20, 30)))
         + 0.3 * rng.standard_normal((1500, 30))).astype(np.float32)
    return x, y


def test_ambiguous_spectrum_is_detected_in_float32_only():
    x, _ = _ambiguous_pair()
    m32 = unit_moments(block_moments(x, widths_a=(48,), gemm_dtype=np.float32), 0)
    m64 = unit_moments(block_moments(x, widths_a=(48,), gemm_dtype=np.float64), 0)
    c32 = prepare_unit(m32, ["mean_cca"], precision="float32", name="m/l")
    assert c32.ambiguous is not None and "no clear gap" in c32.ambiguous
    assert ambiguous_units({3: c32}) == [3]
    c64 = prepare_unit(m64, ["mean_cca"], precision="float64")
    assert c64.ambiguous is None and c64.rank == 48
    assert unit_gram(x, dtype=np.float32, basis=True).ambiguous is not None
    assert unit_gram(x, dtype=np.float64, basis=True).ambiguous is None


def test_nearly_dead_features_are_ambiguous():
    """A feature active on 3 of 3,000 rows with tiny values is real (CCA is scale
    invariant) but below the float32 cut: flagged, not silently dropped."""
    rng = np.random.default_rng(14)
    x = rng.standard_normal((3000, 20))
    x[:, 5] = 0.0
    x[[10, 500, 2000], 5] = [1e-4, 2e-4, -1e-4]
    c = prepare_unit(unit_moments(block_moments(x.astype(np.float32), widths_a=(20,),
                                                gemm_dtype=np.float32), 0), ["mean_cca"])
    assert c.ambiguous is not None and "feature 5" in c.ambiguous


def test_ambiguous_units_are_recomputed_or_refused():
    """compare_arrays / sample_space_metrics recompute in float64 by default (the value
    equals float64's) or refuse naming the unit; the driver refuses unless told to keep."""
    x, y = _ambiguous_pair()
    exact = naive_metrics(x, y, debiased=False)
    got = compare_arrays(x, y, ["mean_cca", "pwcca"], gemm_dtype=np.float32)
    assert got["mean_cca"] == pytest.approx(exact["mean_cca"], abs=1e-6)
    assert got["pwcca"] == pytest.approx(exact["pwcca"], abs=1e-6)
    with pytest.raises(AmbiguousRankError, match="unit 'x': float32 statistics cannot"):
        compare_arrays(x, y, "mean_cca", gemm_dtype=np.float32, ambiguous_rank="refuse")
    sample = sample_space_metrics(x, y, ["mean_cca"], dtype=np.float32)
    assert sample["mean_cca"] == pytest.approx(exact["mean_cca"], abs=1e-6)
    with pytest.raises(AmbiguousRankError, match="unit 'x'"):
        sample_space_metrics(x, y, ["mean_cca"], dtype=np.float32, ambiguous_rank="refuse")

    tile = block_moments(np.hstack([x, y]), widths_a=(48, 30), gemm_dtype=np.float32)
    units = [unit_moments(tile, 0), unit_moments(tile, 1)]
    with pytest.raises(AmbiguousRankError, match="'vit/block3'"):
        similarity_matrices(units, lambda i, j: pair_moments(tile, i, j), ["mean_cca"],
                            names=["vit/block3", "vit/block4"])
    caches: dict = {}
    similarity_matrices(units, lambda i, j: pair_moments(tile, i, j), ["mean_cca"],
                        ambiguous="keep", caches=caches)
    assert ambiguous_units(caches) == [0]


def test_recomputing_the_unit_alone_in_float64():
    """The pipeline's recompute: the ambiguous unit's own moments in float64 (the others and
    the cross moments may stay float32) give a clear rank and values near float64's."""
    x, y = _ambiguous_pair()
    z = np.hstack([x, y])
    t32 = block_moments(z, widths_a=(48, 30), gemm_dtype=np.float32)
    t64 = block_moments(z, widths_a=(48, 30), gemm_dtype=np.float64)
    exact = naive_metrics(x, y, debiased=False)
    cx = prepare_unit(unit_moments(t64, 0), ["mean_cca", "pwcca"], precision="float64")
    cy = prepare_unit(unit_moments(t32, 1), ["mean_cca", "pwcca"], precision="float32")
    assert ambiguous_units([cx, cy]) == []
    mixed = compare_pair(cx, cy, pair_moments(t32, 0, 1))
    assert mixed["mean_cca"][0] == pytest.approx(exact["mean_cca"], abs=1e-4)
    full = compare_pair(cx, prepare_unit(unit_moments(t64, 1), ["mean_cca", "pwcca"],
                                         precision="float64"), pair_moments(t64, 0, 1))
    assert full["pwcca"][0] == pytest.approx(exact["pwcca"], abs=FLOAT64_TOL)


# --- zero variance: one rule in both spaces ---------------------------------------------------


@pytest.mark.parametrize("x", [
    np.full((50, 4), 3.5, np.float32),
    np.full((50, 4), 0.1),  # float64: its mean is not exactly 0.1
    np.ones((50, 4)) * 1e4 + np.random.default_rng(0).standard_normal((50, 4)) * 1e-13,
])
def test_zero_variance_is_one_rule(x):
    """Constant, or varying only below the rounding of the stored values: refused by name in
    both spaces, for any metric."""
    with pytest.raises(InputError, match="'m/l' has zero variance"):
        prepare_unit(unit_moments(block_moments(x, widths_a=(4,)), 0), ["linear_cka"],
                     name="m/l")
    with pytest.raises(InputError, match="'m/l' has zero variance"):
        unit_gram(x, dtype=np.float64, name="m/l")


def test_constant_columns_beside_normal_ones_are_not_zero_variance():
    kinds, _ = _kinds()
    x, _ = kinds["constant columns mixed in"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = unit_moments(block_moments(x, widths_a=(26,)), 0)
        assert prepare_unit(m, ["mean_cca"], precision="float64").rank == 20



def _published_pwcca(a: np.ndarray, b: np.ndarray, rng=None) -> float:
    """sim_metric's pwcca_dist convention (weights normalised over all p columns of the full
    U), with U's completion beyond min(p, q) rotated at random when ``rng`` is given."""
    a, b = (np.asarray(m, np.float64) - np.asarray(m, np.float64).mean(0) for m in (a, b))

    def whiten(c):
        e, v = np.linalg.eigh(c.T @ c)
        return v @ np.diag(e ** -0.5) @ v.T

    wa, wb = whiten(a), whiten(b)
    u, rho, _ = np.linalg.svd(wa @ a.T @ b @ wb, full_matrices=True)
    if rng is not None:
        k = rho.size
        q, _ = np.linalg.qr(rng.standard_normal((u.shape[1] - k,) * 2))
        u[:, k:] = u[:, k:] @ q
    weights = np.abs((a.T @ a) @ wa @ u).sum(axis=0)
    return float((weights / weights.sum())[: rho.size] @ rho)


def test_pwcca_does_not_depend_on_the_basis_completion():
    """p > q: the published normaliser moves with LAPACK's completion of U, ours does not; for
    p <= q (full rank) both definitions agree."""
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2000, 64))
    x = np.tanh(h[:, :48] @ rng.standard_normal((48, 48)) / 7).astype(np.float32)
    y = np.tanh(h[:, 8:32] @ rng.standard_normal((24, 24)) / 5
                + 0.3 * rng.standard_normal((2000, 24))).astype(np.float32)
    published = [_published_pwcca(x, y, np.random.default_rng(k)) for k in range(10)]
    assert max(published) - min(published) > 1e-3  # measured 0.372 to 0.383
    # Ours weighs only the k = 24 variates that exist (no completion enters): the naive
    # float64 formula's value (measured 0.701), from the float32 default path.
    ours = compare_arrays(x, y, ["pwcca"], gemm_dtype=np.float32)["pwcca"]
    assert ours == pytest.approx(naive_metrics(x, y, debiased=False)["pwcca"], abs=1e-6)
    assert compare_arrays(y, x, ["pwcca"])["pwcca"] == pytest.approx(
        _published_pwcca(y, x), abs=1e-6)  # p <= q: measured 7e-9 apart
