"""Rank-deficient units through a whole job at the default settings (float32 products):
issue 14's layers in both spaces, the effective ranks in the results, and a unit whose
float32 spectrum has no clear gap recomputed in float64 or refused by name."""

from __future__ import annotations

import numpy as np
import pytest

import repscope
from repscope.cluster.rank import AmbiguousRankError
from repscope.jobs.cli import main
from repscope.store import ActivationStore, ingest_array
from tests.math.layers import RANKS, model_layers
from tests.math.naive import naive_metrics

FEATURE = ["linear_cka", "mean_cca", "mean_sq_cca", "svcca", "pwcca", "procrustes"]
SAMPLE = [m for m in FEATURE if m != "pwcca"]  # PWCCA has no sample-space form
# The targets at default settings; measured 2.6e-8 (CKA) and 3.9e-7 (PWCCA) in
# feature space, 2.6e-8 at most in sample space.
TOLERANCE = {"linear_cka": 2e-5, "procrustes": 2e-5, "mean_cca": 1e-4, "mean_sq_cca": 1e-4,
             "svcca": 1e-4, "pwcca": 1e-4}


def make(url: str, layers: dict[tuple[str, str], np.ndarray]) -> None:
    store = ActivationStore.create(url)
    for (model, layer), acts in layers.items():
        ingest_array(store, model, layer, acts)


def reference(arrays: list[np.ndarray], metrics) -> dict[str, np.ndarray]:
    """Every entry from the independent float64 in-memory formulas."""
    u = len(arrays)
    out = {m: np.empty((u, u)) for m in metrics}
    for i in range(u):
        for j in range(u):
            values = naive_metrics(arrays[i], arrays[j], debiased=False)
            for m in metrics:
                out[m][i, j] = values[m]
    return out


@pytest.mark.parametrize("space, rows, metrics", [("feature", 3000, FEATURE),
                                                   ("sample", 800, SAMPLE)])
def test_rank_deficient_layers_at_default_settings(tmp_path, space, rows, metrics):
    """3 models x (ReLU with dead units, rank 40 of 96, duplicated columns, full rank)."""
    layers = {(model, f"l{k}"): acts for s, model in enumerate("abc")
              for k, acts in enumerate(model_layers(s, rows))}
    make(str(tmp_path / "acts.zarr"), layers)
    ds = repscope.compare(str(tmp_path / "acts.zarr"), metrics=metrics,
                          compute={"space": space})
    want = reference(list(layers.values()), metrics)
    for m in metrics:
        np.testing.assert_allclose(ds[m].values, want[m], rtol=0, atol=TOLERANCE[m],
                                   err_msg=m)
    assert ds["rank_x"].values.tolist() == list(RANKS) * 3
    assert ds["features_x"].values.tolist() == [128, 96, 80, 50] * 3
    assert ds.attrs["recomputed_float64"] == []
    assert "rank cut" in ds["mean_cca"].attrs["convention"]
    from repscope.jobs.report import rank_lines

    assert rank_lines(ds)[:3] == ["rank: a/l0 keeps 88 of 128 directions",
                                  "rank: a/l1 keeps 40 of 96 directions",
                                  "rank: a/l2 keeps 64 of 80 directions"]


def graded(rows: int = 2000, width: int = 48, seed: int = 3) -> np.ndarray:
    """A layer whose variances fall smoothly over 9 decades: some eigenvalues lie where
    float32 products cannot tell signal from rounding (near 4e-6 of the largest)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((width, width)))
    scales = np.logspace(0, -4.5, width)  # standard deviations: variances 1 .. 1e-9
    return ((rng.standard_normal((rows, width)) * scales) @ basis.T).astype(np.float32)


def test_an_ambiguous_unit_is_recomputed_in_float64_or_refused(tmp_path, capsys):
    x = graded()
    rng = np.random.default_rng(4)
    y = np.tanh(x @ rng.standard_normal((48, 30))).astype(np.float32)
    z = rng.standard_normal((2000, 20)).astype(np.float32)
    url = str(tmp_path / "acts.zarr")
    make(url, {("m", "graded"): x, ("m", "tanh"): y, ("n", "noise"): z})
    metrics = ["linear_cka", "mean_cca", "pwcca", "procrustes"]
    ds = repscope.compare(url, metrics=metrics)  # default: ambiguous_rank recompute
    assert ds.attrs["recomputed_float64"] == ["m/graded"]
    exact = repscope.compare(url, metrics=metrics, compute={"precision": "float64"})
    want = reference([x, y, z], metrics)
    for m in metrics:
        # The recomputed pairs are a float64 job's up to the partner's own float32
        # statistics (kept: they have a clear gap; measured 5e-9); every entry is the naive
        # reference's.
        np.testing.assert_allclose(ds[m].values[0], exact[m].values[0], rtol=0, atol=1e-7)
        np.testing.assert_allclose(ds[m].values, want[m], rtol=0, atol=TOLERANCE[m],
                                   err_msg=m)
    assert ds["rank_x"].values[0] == exact["rank_x"].values[0] > 40

    with pytest.raises(AmbiguousRankError, match=r"rank of 1 unit\(s\): m/graded"):
        repscope.compare(url, metrics=metrics, compute={"ambiguous_rank": "refuse"})
    spec = tmp_path / "job.yaml"
    spec.write_text(f"store: {url}\noutput: {tmp_path / 'r.zarr'}\nmetrics: {metrics}\n"
                    "compute: {ambiguous_rank: refuse}\n")
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the plan's lines, then one error
    assert err[-1].startswith("repscope run: error: ") and "m/graded" in err[-1]
    assert not (tmp_path / "r.zarr").exists()
    # An explicit cut is the user's choice: no ambiguity, no recomputation.
    floored = repscope.compare(url, metrics=metrics,
                               compute={"eig_floor": 1e-5, "ambiguous_rank": "refuse"})
    assert floored.attrs["recomputed_float64"] == [] and floored.attrs["eig_floor"] == 1e-5
    assert floored["rank_x"].values[0] < ds["rank_x"].values[0]


def test_an_ambiguous_unit_in_sample_space_is_recomputed_on_its_worker(tmp_path):
    x = graded(rows=600)
    y = np.tanh(x[:, :20] * 3).astype(np.float32)
    url = str(tmp_path / "acts.zarr")
    make(url, {("m", "graded"): x, ("m", "tanh"): y})
    metrics = ["linear_cka", "mean_cca", "procrustes"]
    ds = repscope.compare(url, metrics=metrics, compute={"space": "sample"})
    assert ds.attrs["recomputed_float64"] == ["m/graded"]
    want = reference([x, y], metrics)
    for m in metrics:
        np.testing.assert_allclose(ds[m].values, want[m], rtol=0, atol=TOLERANCE[m],
                                   err_msg=m)
    with pytest.raises(AmbiguousRankError, match="m/graded"):
        repscope.compare(url, metrics=metrics,
                         compute={"space": "sample", "ambiguous_rank": "refuse"})
