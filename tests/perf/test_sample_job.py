"""A job in sample space writes the same matrices as in feature space (embedded Ray)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from repscope.cluster.gram import SAMPLE_METRICS
from repscope.jobs.pipeline import run_job
from repscope.jobs.results import open_results
from repscope.jobs.spec import spec_from_dict
from tests.jobs.conftest import make_store


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.parametrize("memory", [None, "4MiB"])
def test_sample_space_job_equals_feature_space(tmp_path, ray_session, memory):
    url = str(tmp_path / "acts.zarr")
    make_store(url, {"a": [90, 120, 70], "b": [110, 60]}, rows=300)
    metrics = list(SAMPLE_METRICS)  # all but PWCCA
    out = {}
    runs = {"feature": ("feature", "float64"), "sample": ("sample", "float64"),
            "sample32": ("sample", "float32")}
    for name, (space, precision) in runs.items():
        compute = {"space": space, "workers": 2, "precision": precision}
        if memory:
            compute["memory_per_worker"] = memory  # several tiles in either space
        spec = spec_from_dict({"store": url, "metrics": metrics, "compute": compute,
                               "output": str(tmp_path / f"{name}.zarr")})
        log = io.StringIO()
        run_job(spec, log=log)
        assert f"{space} space" in log.getvalue()
        out[name] = open_results(str(tmp_path / f"{name}.zarr"))
    for m in metrics:
        # float64 GEMMs: the two spaces are the same numbers; float32 Grams stay within 1e-6.
        np.testing.assert_allclose(out["sample"][m].values, out["feature"][m].values,
                                   atol=1e-9, rtol=0, err_msg=m)
        np.testing.assert_allclose(out["sample32"][m].values, out["feature"][m].values,
                                   atol=1e-6, rtol=0, err_msg=m)
