"""Tile-by-tile finalization: whatever order the tiles arrive in (off-diagonal tiles before
their diagonal ones are held), the matrices equal the in-memory metrics (no Ray)."""

from __future__ import annotations

import itertools
import warnings

import pytest

from repscope.cluster.compare import compare_arrays
from repscope.cluster.moments import merge_all
from repscope.cluster.tasks import accumulate_tile
from repscope.jobs.finish import TileFinalizer
from repscope.jobs.plan import tile_tasks
from repscope.jobs.spec import spec_from_dict
from repscope.store import ActivationStore
from tests.jobs.conftest import make_store
from tests.planning import plan_for

METRICS = ["linear_cka", "linear_cka_debiased", "mean_cca", "pwcca", "procrustes"]


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("fin") / "acts.zarr")
    _, data = make_store(url, {"a": [12, 9, 7], "b": [10, 8]}, rows=400)
    spec = spec_from_dict({"store": url, "output": "/unused.zarr", "metrics": METRICS,
                           "compute": {"memory_per_worker": "4KiB", "precision": "float64"}})
    store = ActivationStore.open(url)
    plan = plan_for(spec, store, workers=2)
    assert len(plan.groups) >= 3  # several diagonal and off-diagonal tiles
    tiles = {tile: merge_all([accumulate_tile(store, t) for t in tasks])
             for tile, tasks in tile_tasks(plan, None).items()}
    return plan, tiles, data


def test_any_arrival_order_gives_the_in_memory_matrices(tiled):
    plan, tiles, data = tiled
    units = [(u.model, u.layer) for u in plan.units]
    orders = [list(tiles), list(reversed(tiles))]
    for order in orders:
        fin = TileFinalizer(plan, METRICS, svcca_threshold=0.99)
        for tile in order:
            fin.add(tile, tiles[tile])
        if order[0][0] != order[0][1]:
            assert fin.held == {}  # all released once their diagonal tiles came
        got = fin.result()
        for (i, x), (j, y) in itertools.combinations_with_replacement(enumerate(units), 2):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                want = compare_arrays(data[x], data[y], METRICS)
            for m in METRICS:
                assert got[m][i, j] == pytest.approx(want[m], abs=1e-8), (m, x, y)


def test_an_off_diagonal_tile_waits_for_its_units(tiled):
    plan, tiles, _ = tiled
    fin = TileFinalizer(plan, METRICS, svcca_threshold=0.99)
    off = next(t for t in tiles if t[0] != t[1])
    fin.add(off, tiles[off])
    assert off in fin.held
    with pytest.raises(RuntimeError, match="without their diagonal tiles"):
        fin.result()
