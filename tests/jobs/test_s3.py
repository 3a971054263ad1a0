"""A job whose store and results live on S3 (a real moto server on loopback)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from repscope.cluster.compare import compare_arrays
from repscope.jobs.cli import main
from repscope.jobs.pipeline import run_job
from repscope.jobs.results import open_results
from repscope.jobs.spec import spec_from_dict
from tests.jobs.conftest import make_store
from tests.s3server import FAKE_KEY, FAKE_SECRET


def test_job_from_s3_store_to_s3_results(s3_server, embedded_ray, capsys):
    options = s3_server.storage_options
    store_url, out_url = s3_server.url("acts.zarr"), s3_server.url("results/run.zarr")
    _, data = make_store(store_url, {"m1": [6, 4], "m2": [6, 4]}, rows=400,
                         storage_options=options)
    spec = spec_from_dict({
        "store": store_url, "output": out_url, "metrics": ["linear_cka", "procrustes"],
        "storage_options": options, "compute": {"precision": "float64"},
    })
    summary = run_job(spec)
    assert summary.pairs_total == 10
    ds = open_results(out_url, options)
    units = list(data)
    for i, j in [(0, 3), (1, 2)]:
        expected = compare_arrays(data[units[i]].astype(np.float64),
                                  data[units[j]].astype(np.float64), ["linear_cka"])
        assert float(ds["linear_cka"][i, j]) == pytest.approx(expected["linear_cka"], abs=1e-8)

    # no credential in the results' attributes or in anything printed
    attrs = json.dumps(dict(ds.attrs))
    captured = capsys.readouterr()
    for secret in (FAKE_KEY, FAKE_SECRET):
        assert secret not in attrs and secret not in captured.out + captured.err

    args = ["show", out_url, "--metric", "linear_cka", "--json",
            "--storage-option", f"key={options['key']}",
            "--storage-option", f"secret={options['secret']}",
            "--storage-option", f"client_kwargs.endpoint_url={s3_server.endpoint_url}"]
    assert main(args) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["units"] == [f"{m}/{layer}" for m, layer in units]
