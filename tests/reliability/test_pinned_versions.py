"""A job reads the version of every unit it planned on, even when the unit is ingested
again while the job runs (issue 15: no mixture of old and new rows)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from repscope.cluster.compare import compare_arrays
from repscope.cluster.execute import LocalExecutor, RayExecutor
from repscope.jobs.pipeline import execute_job
from repscope.jobs.spec import spec_from_dict
from repscope.store import ActivationStore, ingest_array
from tests.jobs.conftest import make_store


class OverwriteFirst:
    """An executor that, once the job has planned (it asks for resources), replaces a unit
    with new data: every read the job then does must still see the planned version."""

    def __init__(self, inner, store_url: str, unit: tuple[str, str], new: np.ndarray):
        self.inner, self.store_url, self.unit, self.new = inner, store_url, unit, new

    def resources(self, memory_per_worker=None):
        ingest_array(ActivationStore.open(self.store_url), *self.unit, self.new, overwrite=True)
        return self.inner.resources(memory_per_worker)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("executor", ["process", "ray"])
def test_a_unit_replaced_mid_job_is_read_as_planned(tmp_path, embedded_ray, executor):
    url = str(tmp_path / "acts.zarr")
    _, data = make_store(url, {"a": [6, 5]}, rows=400)
    new = np.random.default_rng(3).standard_normal((400, 5)).astype(np.float32)
    spec = spec_from_dict({"store": url, "output": str(tmp_path / "r.zarr"),
                           "metrics": ["linear_cka"], "compute": {"precision": "float64"}})
    inner = LocalExecutor() if executor == "process" else RayExecutor()
    try:
        _, stats = execute_job(spec, executor=OverwriteFirst(inner, url, ("a", "layer2"), new),
                               log=io.StringIO())
    finally:
        inner.close()
    planned = compare_arrays(data[("a", "layer1")], data[("a", "layer2")], ["linear_cka"])
    replaced = compare_arrays(data[("a", "layer1")], new, ["linear_cka"])
    got = stats.matrices["linear_cka"][0, 1]
    assert got == pytest.approx(planned["linear_cka"], abs=1e-9)
    assert abs(got - replaced["linear_cka"]) > 1e-3  # the new data would give another value
    store = ActivationStore.open(url)
    assert store.unit_info("a", "layer2").version != stats.selection.units[1].version
