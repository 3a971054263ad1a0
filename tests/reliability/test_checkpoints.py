"""Task checkpoints: a task saves its progress and a rerun continues after the saved rows,
with the same answer as an uninterrupted task (plain code, no Ray)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from repscope.cluster.tasks import Checkpoints, TileTask, UnitRef, accumulate_tile
from repscope.jobs.state import StateStore
from repscope.store import ActivationStore
from tests.jobs.conftest import make_store


@pytest.fixture()
def setup(tmp_path):
    make_store(str(tmp_path / "acts.zarr"), {"a": [5, 4], "b": [6]}, rows=1000)
    store = ActivationStore.open(str(tmp_path / "acts.zarr"))
    state = StateStore(str(tmp_path / "r.zarr"))
    return store, state


@pytest.mark.parametrize("fourth", [False, True])
def test_resume_from_a_saved_partial_equals_one_pass(setup, fourth):
    store, state = setup
    task = TileTask(units_a=(UnitRef("a", "layer1"), UnitRef("a", "layer2")), widths_a=(5, 4),
                    units_b=(UnitRef("b", "layer1"),), widths_b=(6,), start=100, stop=1000,
                    block_rows=128, fourth=fourth, precision="float64",
                    checkpoint_key=f"k{fourth}")
    straight = accumulate_tile(store, replace(task, checkpoint_key=None))

    # a first attempt that got through rows 100..484 before it died
    first = accumulate_tile(store, replace(task, stop=484, checkpoint_key=None))
    state.put_partial(task.checkpoint_key, first)
    assert state.partial_rows(task.checkpoint_key) == 384

    resumed = accumulate_tile(store, task, Checkpoints(state, seconds=0.0))
    assert resumed.n == 900
    np.testing.assert_allclose(resumed.c, straight.c, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(resumed.mean_a, straight.mean_a, rtol=1e-12)
    if fourth:
        np.testing.assert_allclose(resumed.s, straight.s, rtol=1e-12)
    # the finished task's partial is saved: a second rerun loads it and reads nothing
    assert state.partial_rows(task.checkpoint_key) == 900
    again = accumulate_tile(store, task, Checkpoints(state, seconds=0.0))
    np.testing.assert_array_equal(again.c, resumed.c)


def test_progress_is_saved_while_the_task_runs(setup):
    store, state = setup
    task = TileTask(units_a=(UnitRef("a", "layer1"),), widths_a=(5,), units_b=None, widths_b=None,
                    start=0, stop=1000, block_rows=100, fourth=False, precision="float32",
                    checkpoint_key="running")
    saved_rows = []
    original = state.put_partial

    def spy(key, moments):
        saved_rows.append(moments.n)
        original(key, moments)

    state.put_partial = spy
    accumulate_tile(store, task, Checkpoints(state, seconds=0.0))
    # after every block but the last, then the final partial
    assert saved_rows == [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]


def test_a_task_shorter_than_the_interval_saves_nothing(setup):
    """A finished row-range task keeps its moments only after `seconds` of work: a crash
    loses at most that much either way, and a short task is cheaper to recompute."""
    store, state = setup
    task = TileTask(units_a=(UnitRef("a", "layer1"),), widths_a=(5,), units_b=None,
                    widths_b=None, start=0, stop=1000, block_rows=128, fourth=False,
                    precision="float64", checkpoint_key="short")
    assert task.save_result
    accumulate_tile(store, task, Checkpoints(state, seconds=3600.0))
    assert state.get_partial("short") is None
    accumulate_tile(store, task, Checkpoints(state, seconds=0.0))
    assert state.get_partial("short").n == 1000
