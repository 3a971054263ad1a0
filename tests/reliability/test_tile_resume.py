"""Finished tiles are kept small: their entries (and per-unit caches) replace their task
partials at once, and a rerun after a crash restores them instead of recomputing."""

from __future__ import annotations

import io

import numpy as np
import pytest

import repscope.cluster.execute
import repscope.jobs.finish
from repscope.jobs.pipeline import run_job
from repscope.jobs.results import open_results
from repscope.jobs.spec import spec_from_dict
from repscope.store import ActivationStore
from tests.jobs.conftest import make_store
from tests.planning import plan_for

METRICS = ["linear_cka", "linear_cka_debiased", "pwcca", "procrustes"]


class Crash(Exception):
    pass


def _spec(tmp_path, name):
    return spec_from_dict({
        "store": str(tmp_path / "acts.zarr"), "output": str(tmp_path / f"{name}.zarr"),
        "metrics": METRICS,
        # several tiles, one task each, tasks saving progress after every block
        "compute": {"memory_per_worker": "6KiB", "workers": 2, "precision": "float64",
                    "checkpoint_seconds": 1e-6, "block_rows": 64},
    })


@pytest.mark.parametrize("stream", [False, True])
def test_a_crash_keeps_finished_tiles_small_and_the_rerun_restores_them(
        tmp_path, embedded_ray, monkeypatch, stream):
    make_store(str(tmp_path / "acts.zarr"), {"a": [12, 9, 7], "b": [10, 8]}, rows=600)
    baseline = run_job(_spec(tmp_path, "baseline"), log=io.StringIO())
    assert baseline.tiles >= 6
    if stream:  # as if the job's moments were too large for the driver to hold at once
        monkeypatch.setattr(repscope.cluster.execute, "machine_memory", lambda: 2048)
    assert plan_for(_spec(tmp_path, "x"), ActivationStore.open(str(tmp_path / "acts.zarr")),
                    workers=2, driver_memory=1024 if stream else None).stream_tiles == stream

    # The driver dies after finishing three tiles.
    real_add = repscope.jobs.finish.TileFinalizer._add
    finished = []

    def add_then_crash(self, tile, moments):
        if len(finished) == 3:
            raise Crash
        real_add(self, tile, moments)
        finished.extend(t for t in self.done if t not in finished)

    monkeypatch.setattr(repscope.jobs.finish.TileFinalizer, "_add", add_then_crash)
    spec = _spec(tmp_path, "crashed")
    with pytest.raises(Crash):
        run_job(spec, log=io.StringIO())
    state = tmp_path / "crashed.zarr.state"
    assert len(list((state / "tiles").glob("*.npz"))) == len(finished)
    # No finished tile left its moments behind: at most the unfinished tiles' partials.
    partials = list((state / "partials").glob("*.npz"))
    assert len(partials) <= baseline.tiles - len(finished)

    monkeypatch.setattr(repscope.jobs.finish.TileFinalizer, "_add", real_add)
    log = io.StringIO()
    summary = run_job(spec, log=log)
    assert summary.tiles_reused == len(finished)
    assert f"resume: {len(finished)} finished tile(s)" in log.getvalue()
    got, want = open_results(spec.output), open_results(str(tmp_path / "baseline.zarr"))
    for m in METRICS:
        np.testing.assert_allclose(got[m].values, want[m].values, rtol=0, atol=1e-10)
    assert not any(state.rglob("*.npz"))  # everything removed once the result is written
