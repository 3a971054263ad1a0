"""Kernel metrics (rbf_cka, rsa, mutual_knn) and shape_angular against published values,
straightforward in-memory float64 versions (tests/math/naive_kernels.py) and peers
(rsatoolbox; netrep's definitions written out in naive_kernels), through the row-block tiles
with small blocks so that several tiles are merged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from repscope.cluster.compare import compare_arrays
from repscope.cluster.kernel_tiles import kernel_accumulate, kernel_matrices
from repscope.cluster.registry import check_metrics, metric_options
from repscope.errors import InputError
from tests.math import naive_kernels as nk

KERNEL = ["rbf_cka", "rsa", "mutual_knn"]


def units(rng, n=240, widths=(20, 33, 12), rank_deficient=False):
    """Related units on shared rows; with rank_deficient, a duplicated and a dead column."""
    base = rng.standard_normal((n, 6))
    out = []
    for w in widths:
        x = np.tanh(base @ rng.standard_normal((6, w)) + 0.4 * rng.standard_normal((n, w)))
        if rank_deficient:
            x[:, -1] = x[:, 0]
            x[:, -2] = 0.7
        out.append(x)
    return out


def naive(metric, x, y):
    return {"rbf_cka": nk.rbf_cka, "rsa": nk.rsa, "mutual_knn": nk.mutual_knn,
            "shape_angular": nk.shape_angular}[metric](x, y)


@pytest.mark.parametrize("name", ["kornblith_demo", "svhn_lay06"])
@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_rbf_cka_matches_published_values(reference, name, threshold):
    values = json.loads((reference / "values.json").read_text())[name]
    x, y = np.load(reference / f"{name}_x.npy"), np.load(reference / f"{name}_y.npy")
    want = values[f"rbf_cka_threshold_{threshold}"]
    got = compare_arrays(x, y, "rbf_cka", options={"rbf_cka": {"threshold": threshold}})
    assert got["rbf_cka"] == pytest.approx(want, abs=1e-6)
    # Several tiles, float32 products: measured 3e-9 here.
    tiled = kernel_matrices([x, y], ["rbf_cka"], {"rbf_cka": {"threshold": threshold}},
                            block_rows=96, precision="float32")
    assert tiled["rbf_cka"][0, 1] == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_tiles_match_naive_in_memory(rank_deficient):
    xs = units(np.random.default_rng(3), rank_deficient=rank_deficient)
    for precision, tol in (("float64", 1e-12), ("float32", 1e-6)):
        got = kernel_matrices(xs, KERNEL, block_rows=70, precision=precision)
        for m in KERNEL:
            for i in range(len(xs)):
                for j in range(len(xs)):
                    want = naive(m, xs[i], xs[j])
                    # float64: measured <= 3e-15; float32 products: <= 3e-8 (RSA)
                    assert got[m][i, j] == pytest.approx(want, abs=tol), (m, precision, i, j)


def test_rsa_options_and_rsatoolbox():
    import rsatoolbox

    xs = units(np.random.default_rng(4), n=150, widths=(15, 9))
    for rdm in ("correlation", "euclidean"):
        rdms = [rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(x), method=rdm) for x in xs]
        for compare in ("spearman", "pearson"):
            opts = {"rsa": {"rdm": rdm, "compare": compare}}
            got = kernel_matrices(xs, ["rsa"], opts, block_rows=40)["rsa"][0, 1]
            peer_method = {"spearman": "spearman", "pearson": "corr"}[compare]
            peer = float(rsatoolbox.rdm.compare(rdms[0], rdms[1], method=peer_method)[0, 0])
            assert got == pytest.approx(peer, abs=1e-10), (rdm, compare)
            assert got == pytest.approx(nk.rsa(*xs, rdm, compare), abs=1e-10)


def test_histogram_sketches_within_their_bounds():
    """Beyond exact_entries the median and ranks come from histograms: measured errors are
    far inside the bounds recorded for the results (median 2e-9, RSA 7e-9 here)."""
    xs = units(np.random.default_rng(5), n=600, widths=(12, 18))
    exact = kernel_matrices(xs, KERNEL, block_rows=128)
    acc = kernel_accumulate(xs, KERNEL, block_rows=128, exact_entries=1000, sample_rows=300)
    got = acc.result()
    assert acc.notes["rbf_cka"]["median"] == "histogram"
    assert acc.notes["rsa"]["ranks"] == "histogram"
    assert np.abs(got["rbf_cka"] - exact["rbf_cka"]).max() < 1e-6
    assert np.abs(got["rsa"] - exact["rsa"]).max() < min(1e-6, acc.notes["rsa"][
        "value_error_bound"])
    assert acc.notes["rbf_cka"]["median_relative_error_bound"] < 1e-4
    np.testing.assert_array_equal(got["mutual_knn"], exact["mutual_knn"])


def test_mutual_knn_with_ties_within_a_few_flips():
    """Duplicated rows tie; neighbours among ties are ordered arbitrarily, as in the
    reference's argsort: the value may move by a few flips of k over n."""
    rng = np.random.default_rng(6)
    xs = units(rng, n=200, widths=(10, 14))
    xs = [np.vstack([x[:150], x[:50]]) for x in xs]  # 50 rows appear twice
    k = 10
    got = kernel_matrices(xs, ["mutual_knn"], {"mutual_knn": {"k": k}}, block_rows=64)
    want = nk.mutual_knn(xs[0], xs[1], k)
    assert abs(got["mutual_knn"][0, 1] - want) <= 5 / (k * 200)


@pytest.mark.parametrize("widths", [(20, 20), (30, 12), (12, 30)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_shape_angular_matches_netrep_definitions(widths, alpha):
    """Own-width whitening equals netrep's zero-padding for the angular score."""
    rng = np.random.default_rng(sum(widths))
    n = 300
    x = rng.standard_normal((n, widths[0])) @ rng.standard_normal((widths[0],) * 2) + 5.0
    y = np.tanh(x[:, : min(widths)] @ rng.standard_normal((min(widths), widths[1])))
    y += 0.3 * rng.standard_normal((n, widths[1]))
    got = compare_arrays(x, y, "shape_angular", options={"shape_angular": {"alpha": alpha}})
    assert got["shape_angular"] == pytest.approx(nk.shape_angular(x, y, alpha), abs=1e-9)
    assert 0.0 <= got["shape_angular"] <= np.pi / 2


def test_shape_angular_identity_and_invariance():
    """Zero for the same rows; invariant to rotations and shifts (not to scale: the partial
    whitening mixes eigenvalues with alpha, as in netrep)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((200, 15))
    q, _ = np.linalg.qr(rng.standard_normal((15, 15)))
    assert compare_arrays(x, x, "shape_angular")["shape_angular"] == pytest.approx(0, abs=1e-6)
    y = rng.standard_normal((200, 15))
    base = compare_arrays(x, y, "shape_angular")["shape_angular"]
    moved = compare_arrays(x @ q + 1.0, y, "shape_angular")["shape_angular"]
    assert moved == pytest.approx(base, abs=1e-9)


def test_names_and_parameters_are_checked():
    for typo, hint in (("knn", "mutual_knn"), ("rbf", "rbf_cka"), ("rbf_kca", "rbf_cka")):
        with pytest.raises(InputError, match=f"did you mean '{hint}'"):
            check_metrics([typo])
    assert metric_options("mutual_knn") == {"k": 10}
    assert metric_options("rsa", {"rdm": "euclidean"}) == {"rdm": "euclidean",
                                                           "compare": "spearman"}
    with pytest.raises(InputError, match="did you mean 'threshold'"):
        metric_options("rbf_cka", {"treshold": 2})
    with pytest.raises(InputError, match="correlation, euclidean"):
        metric_options("rsa", {"rdm": "cosine"})
    with pytest.raises(InputError, match="mutual_knn k=10 needs more than 10 rows"):
        kernel_matrices([np.ones((8, 3)), np.ones((8, 3))], ["mutual_knn"])
    with pytest.raises(InputError, match="'x' has rows whose features are all equal"):
        compare_arrays(np.ones((20, 4)), np.random.default_rng(0).random((20, 4)), "rsa")
