"""Incremental ("nightly") runs: results grow as checkpoints land, instead of restarting.

Each unit is identified by a key over its content (the store's row fingerprint, the unit's
content fingerprint and the rows used). A nightly run reuses the stored value of every pair
whose two units are unchanged, and computes only pairs that involve a new or changed unit:
one streamed pass over the rows for the new units' own moments and their cross moments
with the unchanged units. The unchanged units' own moments (mean, X'X) come from
`<output>.state/units/` (jobs/state.py), so their data is read only for the cross products.
Every nightly result is also kept as a dated snapshot in `<output>.state/history/`.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import replace
from datetime import UTC, datetime
from typing import TextIO

import numpy as np

from repscope.cluster.execute import Progress, connect, largest_node_cpus, run_tiles
from repscope.cluster.matrices import similarity_matrices
from repscope.cluster.moments import UnitMoments, pair_moments, unit_moments
from repscope.cluster.registry import METRICS
from repscope.errors import ConflictError, NotFoundError
from repscope.jobs.lock import output_lock
from repscope.jobs.plan import Plan, make_groups, make_plan
from repscope.jobs.results import build_dataset, open_results, to_zarr, write_results
from repscope.jobs.run import RunSummary, open_checked, tile_tasks
from repscope.jobs.spec import JobSpec
from repscope.jobs.state import StateStore, digest
from repscope.store import redact


def nightly_identity(spec: JobSpec) -> str:
    """What must match for stored values to be reused: not the models or layers, which are
    expected to grow."""
    d = spec.identity()
    keep = {k: d[k] for k in ("store", "metrics", "rows", "compute")}
    return json.dumps({"nightly": keep}, sort_keys=True)


def unit_key(store, model: str, layer: str, rows: tuple[int, int]) -> str:
    info = store.unit_info(model, layer)
    return digest(store.row_fingerprint, info.fingerprint, info.features, list(rows))


def _previous(spec: JobSpec, identity: str, overwrite: bool):
    try:
        ds = open_results(spec.output, spec.storage_options)
    except NotFoundError:
        return None
    if ds.attrs.get("spec_identity") != identity or "key_x" not in ds.coords:
        if not overwrite:
            raise ConflictError(
                f"output {redact(spec.output)} holds results of a different job spec (or of "
                "`repscope run`); choose another output or pass --overwrite to start it anew"
            )
        return None
    return ds


def _subplan(plan: Plan, new: list[int], old: list[int]) -> Plan:
    """The plan of the work left: new units first, then the unchanged ones, grouped
    separately; tiles among new groups and between new and old groups, none among old."""
    order = new + old
    units = tuple(plan.units[i] for i in order)
    max_width = max(1, max(sum(plan.units[i].features for i in g) for g in plan.groups))
    new_groups = make_groups([units[k].features for k in range(len(new))], max_width)
    old_groups = make_groups([units[k].features for k in range(len(new), len(order))],
                             max_width) if old else ()
    shift = len(new)
    groups = new_groups + tuple(tuple(k + shift for k in g) for g in old_groups)
    n_new = len(new_groups)
    tiles = tuple((a, b) for a in range(n_new) for b in range(a, len(groups)))
    return replace(plan, units=units, groups=groups, tiles=tiles)


def nightly_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    overwrite: bool = False,
    log: TextIO | None = None,
) -> RunSummary:
    """Update the results of `spec` with what changed since the last nightly run."""
    log = log or sys.stderr
    t0 = time.perf_counter()
    if spec.compute.space == "sample":
        warnings.warn("nightly runs keep feature-space statistics; space: sample is ignored",
                      stacklevel=2)
    spec = replace(spec, compute=replace(spec.compute, space="feature"))
    store, full = open_checked(spec)
    with output_lock(spec.output, spec.storage_options):
        identity = nightly_identity(spec)
        previous = _previous(spec, identity, overwrite)
        state = StateStore(spec.output, spec.storage_options)
        keys = [unit_key(store, u.model, u.layer, full.rows) for u in full.units]
        index = {}
        if previous is not None:
            index = {k: i for i, k in enumerate(previous["key_x"].values.tolist())}
        old = [i for i, k in enumerate(keys) if k in index and state.has("units", k)]
        new = [i for i in range(len(keys)) if i not in old]
        count = len(keys)
        matrices = {m: np.full((count, count), np.nan) for m in spec.metrics}
        for m in spec.metrics:
            prev = previous[m].values if previous is not None else None
            for i in old:
                for j in old:
                    matrices[m][i, j] = prev[index[keys[i]], index[keys[j]]]

        computed, tiles_run, tasks_run, flops, accumulate_seconds = 0, 0, 0, 0.0, 0.0
        print(f"nightly: {count} units, {len(new)} new or changed, {len(old)} unchanged",
              file=log)
        if new:
            cpus = connect(address, spec.compute.workers)
            plan = _subplan(make_plan(spec, store, workers=spec.compute.workers or cpus,
                                      node_cpus=largest_node_cpus()), new, old)
            tasks = tile_tasks(plan)
            tiles_run, tasks_run = len(tasks), sum(len(t) for t in tasks.values())
            flops = plan.gemm_flops()
            progress = Progress(plan.n_rows, "accumulate", stream=log)
            t_acc = time.perf_counter()
            tiles = run_tiles(store, tasks, progress)
            accumulate_seconds = time.perf_counter() - t_acc
            progress.close()

            order = new + old
            where = [plan.group_of(k) for k in range(len(order))]
            moments: list[UnitMoments] = []
            for k, i in enumerate(order):
                if k < len(new):
                    g, pos = where[k]
                    moments.append(unit_moments(tiles[(g, g)], pos))
                    state.put("units", keys[i], moments[-1])
                else:
                    moments.append(state.get("units", keys[i], UnitMoments))

            def cross(s: int, t: int):
                (gs, ps), (gt, pt) = where[s], where[t]
                return pair_moments(tiles[(gs, gt)], ps, pt)

            needed = [(s, t) for s in range(len(new)) for t in range(s, len(order))]
            sub = similarity_matrices(
                moments, cross, spec.metrics, names=[u.label for u in plan.units],
                svcca_threshold=spec.compute.svcca_threshold, pairs=needed, threads=plan.workers,
            )
            for m in spec.metrics:
                for s, t in needed:
                    i, j = order[s], order[t]
                    matrices[m][i, j] = sub[m][s, t]
                    matrices[m][j, i] = sub[m][t, s]
            computed = len(needed)

        ds = build_dataset(
            matrices,
            [(u.model, u.layer) for u in full.units],
            {m: METRICS[m].direction for m in spec.metrics},
            {
                "spec": json.dumps(spec.to_dict(), sort_keys=True),
                "spec_identity": identity,
                "store_fingerprint": store.row_fingerprint or "",
                "rows": list(full.rows),
                "kind": "nightly",
            },
            keys=keys,
        )
        write_results(ds, spec.output, spec.storage_options)
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S.%fZ")
        to_zarr(ds, state.history_url(stamp), spec.storage_options)
        print(f"results: {redact(spec.output)} ({computed} pairs computed, "
              f"{full.n_pairs - computed} reused; snapshot {stamp})", file=log)
    return RunSummary(
        output=redact(spec.output),
        units=count,
        pairs_total=full.n_pairs,
        pairs_computed=computed,
        pairs_reused=full.n_pairs - computed,
        rows=full.n_rows,
        seconds=round(time.perf_counter() - t0, 3),
        metrics=tuple(spec.metrics),
        tiles=tiles_run,
        tasks=tasks_run,
        gemm_flops=flops,
        accumulate_seconds=round(accumulate_seconds, 3),
    )
