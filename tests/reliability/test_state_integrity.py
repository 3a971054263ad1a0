"""State files survive crashes: written whole or not at all, checked when read; a damaged
one is discarded with one warning and recomputed, never loaded and never a traceback; what
a killed run left half-written is removed by the next run."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

import repscope.jobs.finish
from repscope.cluster.accumulate import block_moments
from repscope.cluster.moments import CrossMoments, UnitMoments
from repscope.jobs.lock import output_lock
from repscope.jobs.pipeline import run_job
from repscope.jobs.results import open_results, to_zarr
from repscope.jobs.spec import spec_from_dict
from repscope.jobs.state import StateStore, StateWarning
from tests.jobs.conftest import make_store


def unit(n: int = 5) -> UnitMoments:
    rng = np.random.default_rng(n)
    return UnitMoments(n=n, mean=rng.standard_normal(40), cxx=rng.standard_normal((40, 40)),
                       sum_a2=None)


def tear(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # inside the largest array
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [tear, flip, lambda p: p.write_bytes(b"")],
                         ids=["torn", "bit flip", "empty"])
def test_a_damaged_state_file_is_discarded_and_said(tmp_path, damage):
    state = StateStore(str(tmp_path / "r.zarr"))
    state.put("units", "k", unit())
    path = tmp_path / "r.zarr.state" / "units" / "k.npz"
    damage(path)
    with pytest.warns(StateWarning, match=r"discarded damaged state file .*units/k\.npz \("):
        assert state.get("units", "k", UnitMoments) is None
    assert not path.exists()  # recomputed and written anew by the caller
    state.put("units", "k", unit())
    damage(path)
    with pytest.warns(StateWarning):
        assert not state.has("units", "k")  # the nightly's check reads the checksums too
    state.put("units", "k", unit())
    assert state.has("units", "k") and state.get("units", "k", UnitMoments).n == 5


def test_a_torn_partial_is_not_counted_and_not_loaded(tmp_path):
    state = StateStore(str(tmp_path / "r.zarr"))
    z = np.random.default_rng(0).standard_normal((300, 6))
    state.put_partial("p", block_moments(z, widths_a=(3, 3)))
    assert state.partial_rows("p") == 300
    tear(tmp_path / "r.zarr.state" / "partials" / "p.npz")
    assert state.partial_rows("p") == 0  # the size its sidecar recorded no longer matches
    with pytest.warns(StateWarning):
        assert state.get_partial("p") is None
    assert not (tmp_path / "r.zarr.state").exists()  # file, sidecar and emptied folders
    state.put_partial("q", block_moments(z, widths_a=(3, 3)))
    (tmp_path / "r.zarr.state" / "partials" / "q.json").write_text('{"rows": 3')  # torn
    assert state.partial_rows("q") == 0
    assert isinstance(state.get_partial("q"), CrossMoments)


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path, capsys):
    out = tmp_path / "r.zarr"
    state = StateStore(str(out))
    state.put("partials", "keep", unit())
    root = tmp_path / "r.zarr.state"
    dead = root / "partials" / "dead.npz.partial-0a1b2c3d"
    dead.write_bytes(b"half a write")
    old = dead.stat().st_mtime - 1000
    os.utime(dead, (old, old))
    # one being written right now (a task of a driver that died in a notebook): kept
    (root / "partials" / "live.npz.partial-0a1b2c3e").write_bytes(b"being written")
    (root / "partials" / "notes.txt").write_text("not repscope's: kept")
    # a nightly snapshot killed mid-write: metadata without consolidation (its last step)
    results = small_results()
    history = Path(state.history_url("2026-01-01T000000Z"))
    to_zarr(results, str(history), None)
    complete = Path(state.history_url("2026-01-02T000000Z"))
    to_zarr(results, str(complete), None)
    meta = (history / "zarr.json").read_text().replace('"consolidated_metadata"', '"x"')
    (history / "zarr.json").write_text(meta)
    assert state.history() == [f"{out}.state/history/2026-01-02T000000Z.zarr"]
    with output_lock(str(out)):
        pass
    assert "cleanup: removed or finished 2 leftover(s)" in capsys.readouterr().err
    assert sorted(os.listdir(root / "partials")) == [
        "keep.npz", "live.npz.partial-0a1b2c3e", "notes.txt"]
    assert not history.exists() and complete.exists()


def small_results():
    from repscope.jobs.results import build_results

    return build_results({"linear_cka": np.eye(2)}, [("m", "a"), ("m", "b")],
                         {"linear_cka": "similarity"}, {})


class Crash(Exception):
    pass


def test_a_rerun_after_a_crash_recomputes_damaged_checkpoints(tmp_path, embedded_ray,
                                                              monkeypatch):
    """End to end: a run dies with finished tiles and task partials saved; some files are
    then torn (a crash of the machine). The rerun discards them with one warning each,
    recomputes their work, and gives the same matrices as an undisturbed run."""
    make_store(str(tmp_path / "acts.zarr"), {"a": [12, 9, 7], "b": [10, 8]}, rows=600)

    def spec(name):
        return spec_from_dict({
            "store": str(tmp_path / "acts.zarr"), "output": str(tmp_path / f"{name}.zarr"),
            "metrics": ["linear_cka", "pwcca"],
            "compute": {"memory_per_worker": "6KiB", "workers": 2, "precision": "float64",
                        "checkpoint_seconds": 1e-6, "block_rows": 64},
        })

    run_job(spec("baseline"), log=io.StringIO())
    real_add = repscope.jobs.finish.TileFinalizer._add
    calls = []

    def add_then_crash(self, tile, moments):
        if len(calls) == 3:
            raise Crash
        calls.append(tile)
        real_add(self, tile, moments)

    monkeypatch.setattr(repscope.jobs.finish.TileFinalizer, "_add", add_then_crash)
    with pytest.raises(Crash):
        run_job(spec("crashed"), log=io.StringIO())
    monkeypatch.setattr(repscope.jobs.finish.TileFinalizer, "_add", real_add)
    state = tmp_path / "crashed.zarr.state"
    torn = [sorted((state / kind).glob("*.npz"))[0] for kind in ("tiles", "caches")]
    for path in torn:
        tear(path)
    leftover = state / "tiles" / "x.npz.partial-deadbeef"
    leftover.write_bytes(b"killed mid-write")
    os.utime(leftover, (leftover.stat().st_mtime - 1000,) * 2)

    with pytest.warns(StateWarning, match="discarded damaged state file") as caught:
        run_job(spec("crashed"), log=io.StringIO())
    assert len([w for w in caught if issubclass(w.category, StateWarning)]) >= 1
    got, want = open_results(str(tmp_path / "crashed.zarr")), open_results(
        str(tmp_path / "baseline.zarr"))
    for m in ("linear_cka", "pwcca"):
        np.testing.assert_allclose(got[m].values, want[m].values, rtol=0, atol=1e-10)
    assert not state.exists()  # everything removed once the result was written
