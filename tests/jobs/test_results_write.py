"""Results stores are written with zarr alone, laid out as xarray's ``Dataset.to_zarr`` lays
them out: readers see the Dataset the xarray writer would have given them, and a run never
imports xarray, pandas or dask (a second of a job's fixed cost)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from repscope.jobs.outputs import MARKER
from repscope.jobs.results import build_results, open_results, to_zarr

UNITS = [("m", "l1"), ("m", "l2"), ("n", "l1")]


def full_results() -> dict:
    """Results with every optional part: keys, bounds, int unit coordinates, and list,
    float and numpy attribute values."""
    rng = np.random.default_rng(0)
    results = build_results(
        {"linear_cka": rng.random((3, 3)), "procrustes": np.full((3, 3), np.nan)},
        UNITS, {"linear_cka": "similarity", "procrustes": "distance"},
        {"rows": [0, 10], "eig_floor": 1e-6, "count": np.int64(3), "steps": np.arange(3),
         "flag": True, "spec_identity": "s", MARKER: "20260101T000000-0123456789ab"},
        keys=["k1", "k2", "k3"],
        bounds={"linear_cka": (rng.random((3, 3)), rng.random((3, 3)))},
        unit_coords={"rank": np.array([1, -1, 2]), "features": np.array([4, 5, 6])},
    )
    results["data_vars"]["linear_cka"]["attrs"]["estimate"] = json.dumps({"k": 1})
    results["data_vars"]["linear_cka_lower"]["attrs"]["confidence_level"] = np.float64(0.95)
    return results


def xarray_written(ds: xr.Dataset, url: str) -> xr.Dataset:
    """What the former writer (xarray's to_zarr) made of ``ds``, read back."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        ds.to_zarr(url, mode="w", zarr_format=3, consolidated=True)
        return xr.open_zarr(url, chunks=None).load()


def array_metadata(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text())["consolidated_metadata"]["metadata"]


def test_readers_see_what_the_xarray_writer_gave_them(tmp_path):
    results = full_results()
    out = tmp_path / "r.zarr"
    to_zarr(results, str(out), None)
    expected = xarray_written(xr.Dataset.from_dict(results), str(tmp_path / "xr.zarr"))
    got = open_results(str(out))
    xr.testing.assert_identical(got, expected)
    assert got["model_x"].values.tolist() == ["m", "m", "n"]  # not a vacuous comparison
    assert got.attrs["steps"] == [0, 1, 2] and got.attrs[MARKER] == results["attrs"][MARKER]
    # the same layout on disk: dtypes, dimension names, fill values, codecs, chunks, attrs
    assert array_metadata(out) == array_metadata(tmp_path / "xr.zarr")
    assert json.loads((out / "zarr.json").read_text())["attributes"] == json.loads(
        (tmp_path / "xr.zarr" / "zarr.json").read_text())["attributes"]


def test_a_dataset_and_an_fsspec_url(tmp_path):
    """A Dataset is written as its dict; a coordinate no data variable spans is named in the
    group's "coordinates" attribute, as xarray does; memory:// goes through fsspec."""
    ds = xr.Dataset(
        {"v": (("x", "y"), np.arange(6.0).reshape(2, 3), {"a": np.arange(2)})},
        coords={"label_x": ("x", np.array(["p", "q"], dtype=object)),
                "z_only": ("z", np.array([1.5, 2.5])), "y": [10, 20, 30]},
        attrs={"scale": np.float32(0.5)},
    )
    url = "memory://results-write/d.zarr"
    to_zarr(ds, url, None)
    got = xr.open_zarr(url, chunks=None).load()
    expected = xarray_written(ds.assign_attrs({MARKER: got.attrs[MARKER]}),
                              str(tmp_path / "xr.zarr"))
    xr.testing.assert_identical(got, expected)
    assert "z_only" in got.coords and got["v"].attrs["a"] == [0, 1]


@pytest.mark.parametrize("output", ["local", "memory"])
def test_a_run_imports_neither_xarray_nor_pandas_nor_dask(tmp_path, output):
    """`repscope run` to a local output; run_job to memory://, which takes the object
    stores' journaled write (the CLI refuses memory://)."""
    out = str(tmp_path / "r.zarr") if output == "local" else "memory://results-write/r.zarr"
    script = textwrap.dedent(f"""
        import json, sys
        from tests.jobs.conftest import make_store
        from repscope.jobs.cli import main
        from repscope.jobs.pipeline import run_job
        from repscope.jobs.spec import parse_spec

        make_store({str(tmp_path / "acts.zarr")!r}, {{"a": [4, 5], "b": [4, 5]}}, rows=50)
        spec = {str(tmp_path / "job.yaml")!r}
        with open(spec, "w") as f:
            f.write("store: {tmp_path / "acts.zarr"}\\noutput: {out}\\n"
                    "metrics: [linear_cka, pwcca]\\ncompute: {{executor: process}}\\n")
        if {output == "local"}:
            assert main(["run", spec]) == 0
        else:
            run_job(parse_spec(open(spec).read()))
        import zarr
        assert zarr.open_group({out!r}, mode="r").attrs["kind"] == "run"  # it wrote
        print(json.dumps(sorted(m for m in ("xarray", "pandas", "dask") if m in sys.modules)))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parents[2], timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
