"""Kernel and shape metrics through `repscope run` (the CLI), mixed with feature-space metrics,
on both executors, in small forced tiles; against straightforward float64 versions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from repscope.cluster.compare import compare_arrays
from repscope.jobs.cli import main
from repscope.jobs.results import open_results
from tests.jobs.conftest import make_store
from tests.math import naive_kernels as nk

MODELS = {"a": [24, 40], "b": [32, 16], "c": [20, 28]}
ROWS = 360
K = 10
# Targets of the issue; measured: rbf_cka 2e-9, rsa 6e-9, shape 6e-8 (float32 products).
TOL = {"rbf_cka": 1e-5, "rsa": 1e-4, "shape_angular": 1e-5, "linear_cka": 1e-5,
       "pwcca": 1e-5}
NAIVE = {"rbf_cka": lambda x, y: nk.rbf_cka(x, y, 0.5), "rsa": nk.rsa,
         "mutual_knn": lambda x, y: nk.mutual_knn(x, y, K), "shape_angular": nk.shape_angular,
         "linear_cka": lambda x, y: compare_arrays(x, y, "linear_cka")["linear_cka"],
         "pwcca": lambda x, y: compare_arrays(x, y, "pwcca")["pwcca"]}


def write_spec(tmp_path, store, out, metrics, **compute) -> str:
    compute = {"executor": "process", "tile_rows": 100, **compute}
    spec = tmp_path / "job.yaml"
    spec.write_text(f"store: {store}\noutput: {out}\nmetrics: {json.dumps(metrics)}\n"
                    "metric_options: {rbf_cka: {threshold: 0.5}}\n"
                    f"compute: {json.dumps(compute)}\n")
    return str(spec)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("kernel") / "acts.zarr")
    _, data = make_store(url, MODELS, rows=ROWS)
    return url, [v.astype(np.float64) for v in data.values()]


@pytest.mark.parametrize("executor, sketch", [("process", "exact"), ("ray", "histogram")])
def test_mixed_families_job_matches_naive(tmp_path, store, executor, sketch, embedded_ray,
                                          capsys):
    """On Ray with the order statistics from histograms (exact_entries below the job's)."""
    url, data = store
    metrics = ["linear_cka", "pwcca", "shape_angular", "rbf_cka", "rsa", "mutual_knn"]
    out = str(tmp_path / "out.zarr")
    extra = {"exact_entries": 1000} if sketch == "histogram" else {}
    assert main(["run", write_spec(tmp_path, url, out, metrics, executor=executor,
                                   workers=2, **extra)]) == 0
    log = capsys.readouterr().err
    assert "4 row block(s) of 100, 10 tile(s) x 2 pass(es)" in log  # several tiles merged
    assert "moments ride on the kernel pass's diagonal tiles (rows read once)" in log
    ds = open_results(out)
    count = len(data)
    for m in metrics:
        got = ds[m].values
        for i in range(count):
            for j in range(i, count) if m != "pwcca" else range(count):
                assert got[i, j] == got[j, i] or m == "pwcca"
                want = NAIVE[m](data[i], data[j])
                if m == "mutual_knn":  # float32 cosines: a near tie may flip
                    assert abs(got[i, j] - want) <= 3 / (K * ROWS), (m, i, j)
                else:
                    assert got[i, j] == pytest.approx(want, abs=TOL[m]), (m, i, j)
    notes = json.loads(ds.attrs["estimates"])
    assert notes["rbf_cka"]["median"] == sketch and notes["rsa"]["ranks"] == sketch
    assert json.loads(ds["rbf_cka"].attrs["estimate"])["regime"] == "exact tiles"
    assert json.loads(ds.attrs["spec"])["metric_options"]["rbf_cka"] == {"threshold": 0.5}


def test_histograms_and_approximations_report_their_errors(tmp_path, store, capsys):
    url, data = store
    metrics = ["rbf_cka", "rsa", "mutual_knn"]
    exact = {m: np.array([[NAIVE[m](x, y) for y in data] for x in data]) for m in metrics}
    exact = {m: np.triu(v) + np.triu(v, 1).T for m, v in exact.items()}
    out = str(tmp_path / "sketch.zarr")
    assert main(["run", write_spec(tmp_path, url, out, metrics, precision="float64",
                                   exact_entries=1000)]) == 0
    assert "from histograms over ranges of a 360-row sample" in capsys.readouterr().err
    ds = open_results(out)
    notes = json.loads(ds.attrs["estimates"])
    assert notes["rbf_cka"]["median"] == "histogram" and notes["rsa"]["ranks"] == "histogram"
    for m in ("rbf_cka", "rsa"):  # measured 3e-9 and 7e-9
        assert np.abs(ds[m].values - exact[m]).max() < 1e-6, m

    out = str(tmp_path / "approx.zarr")
    assert main(["run", write_spec(tmp_path, url, out, metrics, precision="float64",
                                   exact_rows=200, sample_rows=160)]) == 0
    assert "rows exceed exact_rows (200): approximate" in capsys.readouterr().err
    ds = open_results(out)
    notes = json.loads(ds.attrs["estimates"])
    for m in metrics:
        assert notes[m]["regime"] in ("row sample", "sampled query rows")
        lower, upper = ds[f"{m}_lower"].values, ds[f"{m}_upper"].values
        off = ~np.eye(len(data), dtype=bool)  # a unit with itself is exact (1)
        assert np.all((upper - lower)[off] > 0) and notes[m]["max_error_bar"] > 0
        # 95% error bars: most pairs' exact values inside, none far outside.
        ratio = (np.abs(exact[m] - ds[m].values) / np.maximum((upper - lower) / 2, 1e-12))[off]
        assert np.mean(ratio <= 1) >= 0.85 and ratio.max() <= 1.5, m


@pytest.mark.parametrize("text, message", [
    ("metrics: [linear_cka, knn]", "did you mean 'mutual_knn'"),
    ("metrics: [rbf_cka]\nmetric_options: {rbf_cka: {treshold: 2}}", "did you mean 'threshold'"),
    ("metrics: [rsa]\nmetric_options: {rsa: {rdm: cosine}}", "correlation, euclidean"),
    ("metrics: [mutual_knn]\nmetric_options: {mutual_knn: {k: 500}}",
     "mutual_knn k=500 needs more than 500 rows"),
])
def test_bad_kernel_specs_exit_2_before_work(tmp_path, store, capsys, text, message):
    url, _ = store
    out = tmp_path / "never.zarr"
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"store: {url}\noutput: {out}\n{text}\ncompute: {{executor: process}}\n")
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()
