"""`compute: {bootstrap: N}`: confidence bounds for every matrix entry in the results."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from repscope.errors import InputError
from repscope.jobs.cli import main
from repscope.jobs.pipeline import run_job
from repscope.jobs.spec import parse_spec
from tests.jobs.conftest import make_store


def test_bootstrap_bounds_in_results(tmp_path, embedded_ray, capsys):
    store = str(tmp_path / "acts.zarr")
    make_store(store, {"a": [5, 4], "b": [5, 4]}, rows=800)
    out = tmp_path / "r.zarr"
    text = (f"store: {store}\noutput: {out}\nmetrics: [linear_cka, procrustes]\n"
            "compute: {precision: float64, bootstrap: 40, bootstrap_shards: 10}\n")
    summary = run_job(parse_spec(text))
    assert summary.tasks == 10  # one task per shard and tile
    ds = xr.open_zarr(out)
    for m in ("linear_cka", "procrustes"):
        value, lower, upper = (ds[v].values for v in (m, f"{m}_lower", f"{m}_upper"))
        assert ds[f"{m}_lower"].attrs["confidence_level"] == 0.9
        off = ~np.eye(4, dtype=bool)
        assert (upper[off] > lower[off]).all()  # real intervals off the diagonal
        # the estimate lies inside its interval for nearly every entry
        inside = (lower[off] <= value[off] + 1e-12) & (value[off] <= upper[off] + 1e-12)
        assert inside.mean() >= 0.75
    # the same spec without a bootstrap gives the same estimates
    plain = run_job(parse_spec(text.replace("bootstrap: 40, bootstrap_shards: 10",
                                            "checkpoint_seconds: 0")
                               .replace(str(out), str(tmp_path / "p.zarr"))))
    assert plain.tasks < 10
    p = xr.open_zarr(tmp_path / "p.zarr")
    np.testing.assert_allclose(p["linear_cka"].values, ds["linear_cka"].values, atol=1e-10)
    # bounds are not metrics: show lists the metrics only
    assert main(["show", str(out), "--json"]) == 0
    assert '"linear_cka_lower"' not in capsys.readouterr().out


def test_bootstrap_refuses_too_few_rows(tmp_path):
    store = str(tmp_path / "acts.zarr")
    make_store(store, {"a": [3]}, rows=30)
    text = (f"store: {store}\noutput: {tmp_path / 'r.zarr'}\nmetrics: [linear_cka]\n"
            "compute: {bootstrap: 10, bootstrap_shards: 20}\n")
    with pytest.raises(InputError, match="bootstrap_shards"):
        run_job(parse_spec(text))
