"""The planner picks the cheaper space, honours a forced one, and tiles to fit memory."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from repscope.errors import InputError
from repscope.jobs.plan import tile_tasks
from repscope.jobs.spec import spec_from_dict
from tests.planning import plan_for


class _MetaStore:
    """Store metadata only: what the planner reads."""

    url = "mem://"
    row_fingerprint = "rows"

    def __init__(self, models: int, layers: int, width: int, rows: int):
        self.n_rows = rows
        self._models = [f"m{i}" for i in range(models)]
        self._layers = [f"l{i}" for i in range(layers)]
        self._width = width

    def units(self):
        return [(m, layer) for m in self._models for layer in self._layers]

    def unit_info(self, model, layer):
        return SimpleNamespace(features=self._width, fingerprint=f"{model}/{layer}")


def _spec(metrics, **compute):
    return spec_from_dict({"store": "mem://", "output": "/tmp/x.zarr", "metrics": metrics,
                           "compute": compute})


def test_few_rows_wide_layers_pick_sample_space():
    plan = plan_for(_spec(["linear_cka", "linear_cka_debiased"]),
                     _MetaStore(4, 16, 2048, 4000), workers=2)
    assert plan.space == "sample"
    assert plan.gemm_flops() < 4000 * (64 * 2048) ** 2 / 5


def test_many_rows_pick_feature_space():
    plan = plan_for(_spec(["linear_cka"]), _MetaStore(2, 13, 768, 100_000), workers=2)
    assert plan.space == "feature"


def test_pwcca_keeps_feature_space():
    plan = plan_for(_spec(["linear_cka", "pwcca"]), _MetaStore(4, 16, 2048, 4000), workers=2)
    assert plan.space == "feature"


def test_basis_metrics_go_to_sample_space_when_rows_are_few():
    """CCA and Procrustes cost O(n^3) per unit in sample space and O(d^3) in feature space:
    few rows and wide layers pick samples, and the pairs spread over >= 2 tiles per worker."""
    store = _MetaStore(4, 4, 2048, 500)
    plan = plan_for(_spec(["mean_cca", "procrustes"]), store, workers=2)
    assert plan.space == "sample" and plan.basis
    assert len(plan.tiles) >= 4
    many = _MetaStore(4, 4, 2048, 20_000)
    assert plan_for(_spec(["mean_cca", "procrustes"]), many, workers=2).space == "feature"


def test_spec_can_force_either_space():
    store = _MetaStore(4, 16, 2048, 4000)
    assert plan_for(_spec(["linear_cka"], space="feature"), store, workers=2).space == "feature"
    big = _MetaStore(2, 2, 64, 10_000)
    assert plan_for(_spec(["linear_cka"], space="sample"), big, workers=2).space == "sample"
    with pytest.raises(InputError, match="pwcca has no sample-space form"):
        plan_for(_spec(["pwcca"], space="sample"), store, workers=2)


@pytest.mark.parametrize("space", ["feature", "sample"])
def test_memory_budget_forces_tiles_instead_of_failing(space):
    store = _MetaStore(4, 16, 2048, 4000)
    roomy = plan_for(_spec(["linear_cka"], space=space, memory_per_worker="64GiB"), store,
                      workers=2)
    tight = plan_for(_spec(["linear_cka"], space=space, memory_per_worker="512MiB"), store,
                      workers=2)
    assert len(tight.tiles) > len(roomy.tiles)
    # Every unit pair lies in a tile, and each tile's state fits the budget.
    for a, b in tight.tiles:
        wa, wb = sum(tight.widths(a)), sum(tight.widths(b))
        if space == "feature":
            assert 8 * wa * wb <= 512 << 20
        else:
            units = len(tight.groups[a]) + (0 if a == b else len(tight.groups[b]))
            assert units * 4 * store.n_rows**2 + (128 << 20) <= 512 << 20
    groups = [set(g) for g in tight.groups]
    assert sorted(np.concatenate([list(g) for g in groups])) == list(range(64))


def test_sample_space_refuses_a_unit_larger_than_the_budget():
    with pytest.raises(InputError, match="one unit's Gram task .* memory_per_worker"):
        plan_for(_spec(["linear_cka"], space="sample", memory_per_worker="64MiB"),
                  _MetaStore(1, 2, 2048, 4000), workers=2)


def test_finished_task_moments_are_saved_only_when_they_wait():
    """A task's finished moments are checkpointed only if something runs after it before its
    tile is finished: sibling row ranges, or other tiles (tiles finished after the
    accumulation). The only task of a job saves nothing (W2: a 1.9 GB write)."""
    def flags(store, node_cpus=None, **compute):
        plan = plan_for(_spec(["linear_cka"], **compute), store, workers=2, node_cpus=node_cpus)
        return plan, [t.save_result for ts in tile_tasks(plan).values() for t in ts]

    plan, saves = flags(_MetaStore(10, 6, 256, 50_000))
    assert (len(plan.tiles), len(plan.row_ranges)) == (1, 1) and saves == [False]
    plan, saves = flags(_MetaStore(2, 13, 768, 100_000))
    assert len(plan.tiles) == 3 and not plan.stream_tiles and all(saves)
    plan, saves = flags(_MetaStore(2, 2, 64, 100_000), node_cpus=1)  # two nodes of 1 CPU
    assert len(plan.tiles) == 1 and len(plan.row_ranges) > 1 and all(saves)


def test_row_ranges_give_every_node_a_task():
    """One machine: one task with all its CPUs. Nodes of 1 CPU: the one tile is split into
    row ranges, one per CPU, whatever the tile's size (up to a quarter of the cluster's task
    memory); blocks never exceed a quarter of a worker's memory."""
    store = _MetaStore(2, 6, 512, 30_000)
    one = plan_for(_spec(["linear_cka"]), store, workers=2)
    assert (len(one.tiles), len(one.row_ranges), one.threads) == (1, 1, 2)
    eight = plan_for(_spec(["linear_cka"]), store, workers=8, node_cpus=1)
    assert len(eight.row_ranges) == 8 and eight.threads == 1
    assert len(eight.row_ranges) * 8 * 6144**2 <= 8 * eight.memory_per_worker // 4
    assert one.block_rows == 8192 and one.tile_block_rows(0, 0) == 8192
    tight = plan_for(_spec(["linear_cka"], memory_per_worker="64MiB"), store, workers=2)
    for a, b in tight.tiles:
        rows = tight.tile_block_rows(a, b)
        width = sum(tight.widths(a)) + (0 if a == b else sum(tight.widths(b)))
        assert 2 * rows * 4 * width <= (64 << 20) // 4 or rows == 1024


def test_row_splits_are_the_fewest_that_keep_every_cpu_busy():
    """Each further row range costs a whole tile's moments to move and merge: the planner
    takes the fewest ranges with the shortest run of equal tiles on the task slots."""
    from repscope.jobs.plan import _row_splits

    assert _row_splits(1, 1) == 1
    assert _row_splits(1, 2) == 2 and _row_splits(1, 8) == 8
    assert _row_splits(3, 2) == 2  # 6 tasks in 3 full waves beat 3 tasks in 2 (one half idle)
    assert _row_splits(2, 8) == 4
    assert _row_splits(15, 8) == 1  # 2 waves whatever the split
