"""Nightly incremental runs: a repeat computes nothing; a new model computes exactly its
pairs; values equal a full run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from repscope.errors import ConflictError
from repscope.jobs.cli import main
from repscope.jobs.nightly import nightly_job
from repscope.jobs.pipeline import run_job
from repscope.jobs.spec import parse_spec
from repscope.store import ActivationStore, ingest_array
from tests.jobs.conftest import deep_net_activations, make_store

METRICS = ["linear_cka", "linear_cka_debiased", "pwcca", "procrustes", "svcca"]


def spec_text(store, output, **extra) -> str:
    text = f"store: {store}\noutput: {output}\nmetrics: {json.dumps(METRICS)}\n"
    text += "compute: {precision: float64}\n"
    return text + "".join(f"{k}: {json.dumps(v)}\n" for k, v in extra.items())


def test_nightly_grows_results_and_equals_a_full_run(tmp_path, embedded_ray):
    store_url = str(tmp_path / "acts.zarr")
    make_store(store_url, {"ckpt0": [6, 5], "ckpt1": [6, 5]}, rows=400)
    out = tmp_path / "nightly.zarr"
    spec = parse_spec(spec_text(store_url, out))

    first = nightly_job(spec)
    assert (first.pairs_total, first.pairs_computed, first.pairs_reused) == (10, 10, 0)

    again = nightly_job(spec)
    assert (again.pairs_computed, again.pairs_reused, again.tasks) == (0, 10, 0)

    # a new checkpoint lands: 2 more units -> 21 pairs; computed: the 3 pairs among the new
    # units (self pairs included) and the 2 x 4 pairs of a new with an unchanged unit
    store = ActivationStore.open(store_url)
    for i, acts in enumerate(deep_net_activations(400, [6, 5], seed=7)):
        ingest_array(store, "ckpt2", f"layer{i + 1}", acts)
    grown = nightly_job(spec)
    assert grown.pairs_total == 21
    assert grown.pairs_computed == 3 + 2 * 4 and grown.pairs_reused == 10

    full = run_job(parse_spec(spec_text(store_url, tmp_path / "full.zarr")))
    assert full.pairs_computed == 21
    a, b = xr.open_zarr(out), xr.open_zarr(tmp_path / "full.zarr")
    assert list(a["model_x"].values) == list(b["model_x"].values)
    for m in METRICS:
        np.testing.assert_allclose(a[m].values, b[m].values, rtol=0, atol=1e-9, err_msg=m)

    history = sorted((tmp_path / "nightly.zarr.state" / "history").iterdir())
    assert len(history) == 3
    assert xr.open_zarr(history[0]).sizes["x"] == 4 and xr.open_zarr(history[-1]).sizes["x"] == 6


def test_changed_unit_is_recomputed(tmp_path, embedded_ray):
    store_url = str(tmp_path / "acts.zarr")
    make_store(store_url, {"a": [5, 4], "b": [5, 4]}, rows=300)
    spec = parse_spec(spec_text(store_url, tmp_path / "n.zarr"))
    nightly_job(spec)
    store = ActivationStore.open(store_url)
    ingest_array(store, "b", "layer2",
                 np.random.default_rng(5).standard_normal((300, 4)).astype(np.float32),
                 overwrite=True)
    summary = nightly_job(spec)
    assert summary.pairs_computed == 4  # b/layer2 with each of the 4 units, itself included
    full = run_job(parse_spec(spec_text(store_url, tmp_path / "f.zarr")))
    assert full.pairs_total == 10
    a, b = xr.open_zarr(tmp_path / "n.zarr"), xr.open_zarr(tmp_path / "f.zarr")
    for m in METRICS:
        np.testing.assert_allclose(a[m].values, b[m].values, rtol=0, atol=1e-9, err_msg=m)


def test_nightly_refuses_output_of_another_spec(tmp_path, embedded_ray):
    store_url = str(tmp_path / "acts.zarr")
    make_store(store_url, {"a": [4]}, rows=100)
    out = tmp_path / "n.zarr"
    nightly_job(parse_spec(spec_text(store_url, out)))
    other = parse_spec(f"store: {store_url}\noutput: {out}\nmetrics: [procrustes]\n")
    with pytest.raises(ConflictError, match="different job spec"):
        nightly_job(other)
    assert nightly_job(other, overwrite=True).pairs_computed == 1


def test_nightly_cli_json(tmp_path, capsys, embedded_ray):
    store_url = str(tmp_path / "acts.zarr")
    make_store(store_url, {"a": [4, 3]}, rows=100)
    spec = tmp_path / "job.yaml"
    spec.write_text(spec_text(store_url, tmp_path / "n.zarr"))
    assert main(["nightly", str(spec), "--json"]) == 0
    assert main(["nightly", str(spec), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["pairs_total"] == 3 and summary["pairs_computed"] == 0
    assert summary["pairs_reused"] == 3


def test_report_draws_trends_over_checkpoints(tmp_path, embedded_ray):
    from repscope.jobs.report import trends, write_report

    store_url = str(tmp_path / "acts.zarr")
    make_store(store_url, {"ckpt0": [5, 4], "ckpt1": [5, 4], "ckpt2": [5, 4]}, rows=200)
    nightly_job(parse_spec(spec_text(store_url, tmp_path / "n.zarr")))
    ds = xr.open_zarr(tmp_path / "n.zarr")
    series = trends(ds, "linear_cka")
    assert set(series["first"]) == {"layer1", "layer2"}
    values = ds["linear_cka"].values
    # ckpt2/layer2 (index 5) against ckpt1/layer2 (index 3) and ckpt0/layer2 (index 1)
    assert series["previous"]["layer2"][1] == pytest.approx(values[5, 3])
    assert series["first"]["layer2"][1] == pytest.approx(values[5, 1])
    files = write_report(ds, tmp_path / "rep", "linear_cka")
    assert tmp_path / "rep" / "trend__linear_cka.png" in files


def test_nightly_continues_from_a_run_output(tmp_path):
    """The README's step 5 after step 3: nightly on the output `run` wrote reuses its
    values; a new model then computes only its pairs, equal to a full run."""
    store_url = str(tmp_path / "acts.zarr")
    make_store(store_url, {"a": [6, 5], "b": [6, 5]}, rows=300)
    spec = parse_spec(spec_text(store_url, tmp_path / "r.zarr"))
    run_job(spec)
    again = nightly_job(spec)
    assert (again.pairs_computed, again.pairs_reused) == (0, 10)
    store = ActivationStore.open(store_url)
    for i, acts in enumerate(deep_net_activations(300, [6, 5], seed=9)):
        ingest_array(store, "c", f"layer{i + 1}", acts)
    grown = nightly_job(spec)
    assert grown.pairs_computed == 3 + 2 * 4 and grown.pairs_reused == 10
    run_job(parse_spec(spec_text(store_url, tmp_path / "full.zarr")))
    a, b = xr.open_zarr(tmp_path / "r.zarr"), xr.open_zarr(tmp_path / "full.zarr")
    for m in METRICS:
        np.testing.assert_allclose(a[m].values, b[m].values, rtol=0, atol=1e-9, err_msg=m)


@pytest.mark.parametrize("compute", [{"space": "sample", "precision": "float64"},
                                     {"bootstrap": 10, "bootstrap_shards": 4,
                                      "precision": "float64"}])
def test_nightly_in_the_sample_space_and_with_a_bootstrap(tmp_path, compute):
    """Nightly gets what run has: the sample space, and bootstrap bounds equal to a full
    run's (the same shards and replicates)."""
    metrics = ["linear_cka", "procrustes"]
    store_url = str(tmp_path / "acts.zarr")
    make_store(store_url, {"a": [6, 5], "b": [6, 5]}, rows=200)

    def spec(out):
        return parse_spec(f"store: {store_url}\noutput: {out}\nmetrics: {json.dumps(metrics)}\n"
                          f"compute: {json.dumps(compute)}\n")

    nightly_job(spec(tmp_path / "n.zarr"))
    store = ActivationStore.open(store_url)
    for i, acts in enumerate(deep_net_activations(200, [6, 5], seed=4)):
        ingest_array(store, "c", f"layer{i + 1}", acts)
    grown = nightly_job(spec(tmp_path / "n.zarr"))
    assert grown.pairs_computed == 11 and grown.space == compute.get("space", "feature")
    run_job(spec(tmp_path / "full.zarr"))
    a, b = xr.open_zarr(tmp_path / "n.zarr"), xr.open_zarr(tmp_path / "full.zarr")
    names = [v for v in b.data_vars]
    assert names == [v for v in a.data_vars]
    for v in names:
        np.testing.assert_allclose(a[v].values, b[v].values, rtol=0, atol=1e-9, err_msg=v)
