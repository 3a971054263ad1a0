"""End-to-end runs, in this process and on an embedded local Ray: matrices equal the
in-memory formulas.

Tolerances: float64 GEMMs 1e-8 absolute against cluster.compare.compare_arrays (the same
finalizers on a one-shot computation); tiling and row splits change only the merge order,
1e-10; float32 GEMMs 1e-5 absolute against float64.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
import xarray as xr

from repscope.cluster.compare import compare_arrays
from repscope.errors import ConflictError, InputError, NotFoundError
from repscope.jobs.cli import main
from repscope.jobs.pipeline import run_job
from repscope.jobs.spec import parse_spec
from tests.jobs.conftest import make_store

ALL = ["linear_cka", "linear_cka_debiased", "mean_cca", "mean_sq_cca", "svcca", "pwcca",
       "procrustes"]
MODELS = {"a": [6, 9, 5], "b": [6, 9, 5]}


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "acts.zarr"
    store, data = make_store(str(path), MODELS, rows=600)
    return str(path), data


def spec_for(store: str, output: str, **extra) -> str:
    lines = [f"store: {store}", f"output: {output}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    if "metrics" not in extra:
        lines.append(f"metrics: {json.dumps(ALL)}")
    return "\n".join(lines) + "\n"


def run(text: str, **kw):
    return run_job(parse_spec(text), **kw)


@pytest.mark.parametrize("executor", ["process", "ray"])
def test_matrices_equal_in_memory_metrics(small_store, tmp_path, embedded_ray, executor):
    store, data = small_store
    out = tmp_path / "r.zarr"
    summary = run(spec_for(store, str(out), compute={"precision": "float64",
                                                     "executor": executor}))
    assert summary.executor == ("process" if executor == "process" else "embedded")
    units = list(data)
    assert summary.units == 6 and summary.pairs_total == 21 and summary.pairs_computed == 21
    ds = xr.open_zarr(out)
    assert list(ds["model_x"].values) == [m for m, _ in units]
    assert list(ds["layer_y"].values) == [layer for _, layer in units]
    for i, ui in enumerate(units):
        for j, uj in enumerate(units):
            expected = compare_arrays(data[ui].astype(np.float64), data[uj].astype(np.float64))
            for metric in ALL:
                got = float(ds[metric].values[i, j])
                assert got == pytest.approx(expected[metric], abs=1e-8), (metric, ui, uj)


class OneCpuNodes:
    """An executor whose machines are nodes of 1 CPU each: the planner then splits tiles
    into row ranges so that every node has a task."""

    def __init__(self, inner):
        self.inner = inner

    def resources(self, memory_per_worker=None):
        return replace(self.inner.resources(memory_per_worker), node_cpus=1)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("executor", ["process", "ray"])
def test_tiles_and_row_ranges_do_not_change_the_answer(small_store, tmp_path, embedded_ray,
                                                       executor):
    from repscope.cluster.execute import LocalExecutor, RayExecutor
    from repscope.jobs.pipeline import execute_job

    store, _ = small_store
    one = run(spec_for(store, str(tmp_path / "one.zarr"), compute={"precision": "float64"}))
    # widths 6, 9, 5, 6, 9, 5: a 9600-byte budget allows 20 columns per group -> 2 groups,
    # 3 tiles, each split into row ranges of 64-row blocks on 1-CPU nodes
    spec = parse_spec(spec_for(store, str(tmp_path / "many.zarr"), compute={
        "precision": "float64", "memory_per_worker": 9600, "block_rows": 64, "workers": 2}))
    inner = LocalExecutor(2) if executor == "process" else RayExecutor(None, 2)
    try:
        many, _ = execute_job(spec, executor=OneCpuNodes(inner), log=io.StringIO())
    finally:
        inner.close()
    assert one.tiles == 1 and many.tiles == 3 and many.tasks > many.tiles
    a, b = xr.open_zarr(tmp_path / "one.zarr"), xr.open_zarr(tmp_path / "many.zarr")
    for metric in ALL:
        np.testing.assert_allclose(a[metric].values, b[metric].values, rtol=0, atol=1e-10)


def test_float32_gemms_close_to_float64(small_store, tmp_path, embedded_ray):
    store, _ = small_store
    metrics = ["linear_cka", "procrustes"]
    run(spec_for(store, str(tmp_path / "f64.zarr"), metrics=metrics,
                 compute={"precision": "float64"}))
    run(spec_for(store, str(tmp_path / "f32.zarr"), metrics=metrics))
    a, b = xr.open_zarr(tmp_path / "f64.zarr"), xr.open_zarr(tmp_path / "f32.zarr")
    for metric in metrics:
        np.testing.assert_allclose(a[metric].values, b[metric].values, rtol=0, atol=1e-5)


def test_selection_and_row_subset(small_store, tmp_path, embedded_ray):
    store, data = small_store
    out = tmp_path / "sel.zarr"
    run(spec_for(store, str(out), metrics=["linear_cka"], models=["b"],
                 layers=["layer3", "layer1"], rows={"start": 100, "stop": 400},
                 compute={"precision": "float64"}))
    ds = xr.open_zarr(out)
    assert list(ds["layer_x"].values) == ["layer3", "layer1"]
    x, y = data[("b", "layer3")][100:400], data[("b", "layer1")][100:400]
    expected = compare_arrays(x.astype(float), y.astype(float), ["linear_cka"])["linear_cka"]
    assert float(ds["linear_cka"].values[0, 1]) == pytest.approx(expected, abs=1e-10)
    assert ds.attrs["rows"] == [100, 400]


def test_results_store_attributes(small_store, tmp_path, embedded_ray):
    store, _ = small_store
    out = tmp_path / "attrs.zarr"
    run(spec_for(store, str(out), metrics=["linear_cka", "procrustes", "pwcca"]))
    ds = xr.open_zarr(out)
    assert ds["linear_cka"].dims == ("x", "y")
    assert ds["linear_cka"].attrs["direction"] == "similarity"
    assert ds["procrustes"].attrs["direction"] == "distance"
    assert json.loads(ds.attrs["spec"])["metrics"] == ["linear_cka", "procrustes", "pwcca"]
    assert ds.attrs["store_fingerprint"] and ds.attrs["repscope_version"] and ds.attrs["created"]
    # self-similarity on the diagonal, pwcca asymmetric off it
    np.testing.assert_allclose(np.diag(ds["linear_cka"].values), 1.0, atol=1e-6)
    pw = ds["pwcca"].values
    assert not np.allclose(pw, pw.T)


@pytest.mark.parametrize(
    "extra, error, match",
    [
        ({"models": ["c"]}, NotFoundError, r"model 'c' is not in store"),
        ({"models": ["aa"]}, NotFoundError, r"did you mean 'a'"),
        ({"layers": ["layer9"]}, NotFoundError, r"layer 'layer9' of model 'a'"),
        ({"layers": {"z": ["layer1"]}}, NotFoundError, r"model 'z' is not in store"),
        ({"models": ["a", "b"], "layers": {"a": ["layer1"]}}, InputError,
         r"models lists 'b' but the layers mapping names no layers for it"),
        ({"rows": {"start": 0, "stop": 601}}, InputError, r"rows.stop is 601 but.*only 600"),
    ],
)
def test_bad_names_refused_before_work(small_store, tmp_path, extra, error, match):
    store, _ = small_store
    out = tmp_path / "never.zarr"
    with pytest.raises(error, match=match):
        run(spec_for(store, str(out), metrics=["linear_cka"], **extra))
    assert not out.exists()


def test_missing_store_named(tmp_path):
    with pytest.raises(NotFoundError, match="nowhere.zarr"):
        run(spec_for(str(tmp_path / "nowhere.zarr"), str(tmp_path / "o.zarr")))


def test_output_of_another_spec_refused_unless_overwrite(small_store, tmp_path, embedded_ray):
    store, _ = small_store
    out = str(tmp_path / "shared.zarr")
    run(spec_for(store, out, metrics=["linear_cka"]))
    before = xr.open_zarr(out).attrs["created"]
    with pytest.raises(ConflictError, match="different job spec.*--overwrite"):
        run(spec_for(store, out, metrics=["procrustes"]))
    assert xr.open_zarr(out).attrs["created"] == before
    assert "linear_cka" in xr.open_zarr(out)
    run(spec_for(store, out, metrics=["procrustes"]), overwrite=True)
    ds = xr.open_zarr(out)
    assert "procrustes" in ds and "linear_cka" not in ds


def test_cli_run_show_report(small_store, tmp_path, capsys, embedded_ray):
    store, _ = small_store
    out = tmp_path / "cli.zarr"
    spec = tmp_path / "job.yaml"
    spec.write_text(spec_for(store, str(out), metrics=["linear_cka", "pwcca"]))
    assert main(["run", str(spec), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"output", "units", "pairs_total", "pairs_computed", "pairs_reused", "rows",
            "seconds"} <= set(summary)
    assert summary["pairs_total"] == 6 * 7 // 2 and summary["rows"] == 600

    assert main(["show", str(out), "--metric", "linear_cka"]) == 0
    text = capsys.readouterr().out
    assert "a (rows) vs b (columns)" in text and "layer3" in text

    assert main(["show", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["units"][0] == "a/layer1" and len(shown["metrics"]["pwcca"]["values"]) == 6

    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    files = sorted((tmp_path / "rep").glob("*.png"))
    names = {f.name for f in files}
    assert "a__vs__b.png" in names and "linear_cka__a__vs__b.png" in names
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text("store: x\nmetrics: [linear_ckaa]\noutput: o\n")
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "linear_ckaa" in err and "Traceback" not in err
    assert main(["show", str(tmp_path / "none.zarr")]) == 2
    assert main(["show", str(tmp_path / "none.zarr"), "--metric", "x"]) == 2
