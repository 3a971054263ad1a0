"""Run a job: spec -> plan -> Ray accumulation -> finalizers -> results store.

Everything that can be refused is refused before Ray starts: the spec, the store, the
models, layers and rows, and an output holding another spec's results. Nothing is written
until every matrix is computed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from repscope.cluster.bootstrap import bootstrap
from repscope.cluster.caches import UnitCache
from repscope.cluster.execute import (
    Checkpoints,
    GramTask,
    Progress,
    TileTask,
    connect,
    largest_node_cpus,
    run_grams,
    run_tiles,
)
from repscope.cluster.gram import gram_similarity_matrices
from repscope.cluster.matrices import similarity_matrices
from repscope.cluster.moments import merge_all, pair_moments, unit_moments
from repscope.cluster.registry import METRICS
from repscope.jobs.lock import output_lock
from repscope.jobs.plan import Plan, make_plan
from repscope.jobs.results import build_dataset, check_output, write_results
from repscope.jobs.spec import JobSpec
from repscope.jobs.state import StateStore, digest, state_url
from repscope.store import ActivationStore, redact


@dataclass(frozen=True)
class RunSummary:
    """What a run did; `to_dict` is the `--json` line."""

    output: str
    units: int
    pairs_total: int
    pairs_computed: int
    pairs_reused: int
    rows: int
    seconds: float
    metrics: tuple[str, ...]
    tiles: int
    tasks: int
    gemm_flops: float
    accumulate_seconds: float
    rows_reused: int = 0  # rows of checkpointed partials loaded instead of recomputed
    tiles_reused: int = 0  # tiles an interrupted run had finished, restored not recomputed

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["metrics"] = list(self.metrics)
        return d


def tile_tasks(plan: Plan, store=None) -> dict[tuple[int, int], list[TileTask]]:
    """Every tile's tasks, one per row range. With a store, each task gets a checkpoint key
    over everything its partial depends on: the store's rows, its units' content
    fingerprints, its row range and how it accumulates."""
    def units(g: int):
        return tuple((plan.units[i].model, plan.units[i].layer) for i in plan.groups[g])

    def key(a: int, b: int, start: int, stop: int) -> str | None:
        if store is None:
            return None
        content = [store.unit_info(m, layer).fingerprint for m, layer in units(a) + units(b)]
        return digest(store.row_fingerprint, units(a), units(b), content, start, stop,
                      plan.tile_block_rows(a, b), plan.precision, plan.fourth)

    tasks = {}
    for a, b in plan.tiles:
        tasks[(a, b)] = [
            TileTask(
                units_a=units(a),
                widths_a=plan.widths(a),
                units_b=None if a == b else units(b),
                widths_b=None if a == b else plan.widths(b),
                start=start,
                stop=stop,
                block_rows=plan.tile_block_rows(a, b),
                fourth=plan.fourth,
                precision=plan.precision,
                threads=plan.threads if plan.threads > 1 else None,
                checkpoint_key=key(a, b, start, stop),
                # A finished task's moments are saved only if they wait for something: sibling
                # row ranges, or (tiles finished after the accumulation) other tiles. A
                # streamed tile of one task is finished (and saved small) at once.
                save_result=len(plan.row_ranges) > 1 or (not plan.stream_tiles
                                                         and len(plan.tiles) > 1),
            )
            for start, stop in plan.row_ranges
        ]
    return tasks


def gram_tasks(plan: Plan) -> list[GramTask]:
    """Sample space: one task per unit, its Gram over the job's rows."""
    return [GramTask((u.model, u.layer), plan.rows[0], plan.rows[1], plan.precision,
                     plan.basis, threads=plan.threads) for u in plan.units]


def finalize_sample(plan: Plan, tiles: dict, metrics) -> dict:
    """(U, U) matrices from the tiles' Gram statistics and per-pair values (cluster.gram)."""
    where = [plan.group_of(i) for i in range(len(plan.units))]
    count = len(plan.units)
    kl, dd, trace = np.zeros((count, count)), np.zeros((count, count)), np.zeros(count)
    values = {m: np.zeros((count, count)) for m in metrics}
    for i, (gi, pi) in enumerate(where):
        trace[i] = tiles[(gi, gi)].trace_a[pi]
        for j in range(i, count):
            gj, pj = where[j]
            t = tiles[(gi, gj)]
            kl[i, j] = kl[j, i] = t.kl_off[pi, pj]
            dd[i, j] = dd[j, i] = t.dd[pi, pj]
            for m, v in t.values.items():
                values[m][i, j] = values[m][j, i] = v[pi, pj]  # all symmetric metrics
    values.update(gram_similarity_matrices(plan.n_rows, kl, dd, trace, metrics))
    return values


@dataclass(frozen=True)
class TileValues:
    """A finished tile's matrix entries, saved so that a rerun after a crash reuses them.

    ab : ndarray (metrics, k_a, k_b), value(unit of group a, unit of group b); ba : ndarray
    (metrics, k_b, k_a), the other direction (they differ for PWCCA only).
    """

    metrics: tuple[str, ...]
    ab: np.ndarray
    ba: np.ndarray


class TileFinalizer:
    """Similarity matrices finished tile by tile as tiles arrive, so the driver never holds
    all of a job's moments (a wide job's tiles together can exceed any one machine).

    A diagonal tile (a, a) gives its units' per-unit work (kept, small next to the moments)
    and its pairs; an off-diagonal tile (a, b) gives its pairs once both groups' units are
    prepared, and is held until then. Per-unit eigendecompositions and per-pair SVDs run on
    ``threads`` threads, one BLAS thread each (cluster.matrices.similarity_matrices).
    """

    def __init__(self, plan: Plan, metrics, *, svcca_threshold: float, threads: int,
                 on_done=None):
        self.plan, self.metrics = plan, tuple(metrics)
        self.on_done = on_done  # on_done(tile) once a tile's entries are all in
        self.svcca_threshold, self.threads = svcca_threshold, threads
        self.names = [u.label for u in plan.units]
        self.caches: dict = {}
        self.held: dict = {}
        count = len(plan.units)
        self.out = {m: np.full((count, count), np.nan) for m in self.metrics}
        self.seconds = 0.0  # spent finishing pairs (overlapping the accumulation)
        self.done: set = set()  # tiles whose entries are all in
        self.restored = 0  # of which restored from an earlier run

    def _ready(self, tile) -> bool:
        return all(i in self.caches for g in tile for i in self.plan.groups[g])

    def add(self, tile: tuple[int, int], moments) -> None:
        t0 = time.perf_counter()
        self._add(tile, moments)
        self.seconds += time.perf_counter() - t0

    def _add(self, tile: tuple[int, int], moments) -> None:
        a, b = tile
        if a == b:
            units = [None] * len(self.plan.units)
            for pos, i in enumerate(self.plan.groups[a]):
                units[i] = unit_moments(moments, pos)
            self._pairs(tile, moments, units)
            for waiting in [t for t in self.held if self._ready(t)]:
                self._pairs(waiting, self.held.pop(waiting))
        elif self._ready(tile):
            self._pairs(tile, moments)
        else:
            self.held[tile] = moments

    def add_all(self, tiles: dict) -> None:
        """Every tile of a finished accumulation, diagonal tiles first (none is held). Each
        is popped from ``tiles`` once finished, so its moments are released as we go."""
        for tile in sorted(tiles, key=lambda t: t[0] != t[1]):
            self.add(tile, tiles.pop(tile))

    def restore(self, tile: tuple[int, int], values: TileValues, caches: dict) -> None:
        """A tile finished by an earlier run: its entries, and a diagonal tile's caches."""
        ga, gb = (list(self.plan.groups[g]) for g in tile)
        for k, m in enumerate(values.metrics):
            self.out[m][np.ix_(ga, gb)] = values.ab[k]
            self.out[m][np.ix_(gb, ga)] = values.ba[k]
        self.caches.update(caches)
        self.done.add(tile)
        self.restored += 1

    def tile_values(self, tile: tuple[int, int]) -> TileValues:
        ga, gb = (list(self.plan.groups[g]) for g in tile)
        return TileValues(self.metrics,
                          np.stack([self.out[m][np.ix_(ga, gb)] for m in self.metrics]),
                          np.stack([self.out[m][np.ix_(gb, ga)] for m in self.metrics]))

    def _pairs(self, tile, moments, units=None) -> None:
        ga, gb = (self.plan.groups[g] for g in tile)
        pos = {i: k for k, i in enumerate(ga)} | {j: k for k, j in enumerate(gb)}
        pairs = [(i, j) for i in ga for j in gb if i <= j]
        mats = similarity_matrices(
            units or [None] * len(self.plan.units),
            lambda i, j: pair_moments(moments, pos[i], pos[j]),
            self.metrics, names=self.names, svcca_threshold=self.svcca_threshold,
            pairs=pairs, threads=self.threads, caches=self.caches)
        for m, v in mats.items():
            filled = ~np.isnan(v)
            self.out[m][filled] = v[filled]
        self.done.add(tile)
        if self.on_done:
            self.on_done(tile)

    def result(self) -> dict[str, np.ndarray]:
        if self.held:
            raise RuntimeError(f"tiles {sorted(self.held)} arrived without their diagonal tiles")
        return self.out


def _finish_tiles(spec: JobSpec, plan: Plan, store, state: StateStore, tasks: dict, progress,
                  checkpoints, log) -> tuple[TileFinalizer, dict[str, list[str]]]:
    """Feature space: run the tiles and finish them (TileFinalizer): each one as it arrives
    when the plan streams tiles (the job's moments are too large to hold), else all of them
    after the accumulation, when the finishing has every CPU to itself.

    With checkpoints, a finished tile's entries (and a diagonal tile's per-unit caches) are
    saved and its task partials removed, so the state never holds a whole job's moments
    after its tiles are finished; a rerun restores finished tiles instead of running them.
    Returns the finalizer and the state keys to remove once the result is written.
    """
    fin = TileFinalizer(plan, spec.metrics, svcca_threshold=spec.compute.svcca_threshold,
                        threads=plan.workers)
    tile_keys = {} if checkpoints is None else {
        tile: digest([t.checkpoint_key for t in ts], spec.metrics, spec.compute.svcca_threshold)
        for tile, ts in tasks.items()
    }

    def cache_key(tile, unit: int) -> str:
        return digest(tile_keys[tile], unit)

    for tile, key in tile_keys.items():
        values = state.get("tiles", key, TileValues)
        caches = {}
        if values is not None and tile[0] == tile[1]:
            caches = {i: state.get("caches", cache_key(tile, i), UnitCache)
                      for i in plan.groups[tile[0]]}
        if values is not None and None not in caches.values():
            fin.restore(tile, values, caches)
    if fin.restored:
        print(f"resume: {fin.restored} finished tile(s) of an interrupted run are reused",
              file=log)

    def done(tile) -> None:
        state.put("tiles", tile_keys[tile], fin.tile_values(tile))
        if tile[0] == tile[1]:
            for i in plan.groups[tile[0]]:
                state.put("caches", cache_key(tile, i), fin.caches[i])
        state.remove_partials([t.checkpoint_key for t in tasks[tile]])

    if tile_keys:
        fin.on_done = done
    todo = {tile: ts for tile, ts in tasks.items() if tile not in fin.done}
    if plan.stream_tiles:
        run_tiles(store, todo, progress, checkpoints, on_tile=fin.add)
        progress.close()
    else:
        merged = run_tiles(store, todo, progress, checkpoints)
        progress.close()
        fin.add_all(merged)
    cleanup = {"tiles": list(tile_keys.values()),
               "caches": [cache_key(t, i) for t in tile_keys if t[0] == t[1]
                          for i in plan.groups[t[0]]]}
    return fin, cleanup


def finalize(plan: Plan, tiles, metrics, *, svcca_threshold: float, threads: int | None = None):
    """Similarity matrices from all merged tiles at once (the bootstrap's replicates)."""
    fin = TileFinalizer(plan, metrics, svcca_threshold=svcca_threshold,
                        threads=plan.workers if threads is None else threads)
    fin.add_all(tiles)
    return fin.result()


BOOTSTRAP_LEVEL = 0.9


def bootstrap_bounds(plan: Plan, parts: dict, spec: JobSpec) -> dict:
    """Percentile bounds of every matrix entry from a bootstrap over the row shards
    (cluster.bootstrap; seed 0, so a rerun gives the same bounds):
    {metric: (lower, upper, level, replicates)}."""
    metrics = list(spec.metrics)
    shards = [[parts[tile][s] for tile in plan.tiles] for s in range(len(plan.row_ranges))]

    def statistic(tiles: list) -> np.ndarray:
        mats = finalize(plan, dict(zip(plan.tiles, tiles, strict=True)), metrics,
                        svcca_threshold=spec.compute.svcca_threshold)
        return np.stack([mats[m] for m in metrics])

    result = bootstrap(shards, statistic, spec.compute.bootstrap, level=BOOTSTRAP_LEVEL,
                       rng=np.random.default_rng(0))
    return {m: (result.lower[k], result.upper[k]) for k, m in enumerate(metrics)}


def spec_identity(spec: JobSpec) -> str:
    return json.dumps(spec.identity(), sort_keys=True)


def open_checked(spec: JobSpec) -> tuple[ActivationStore, Plan]:
    """Open the store and plan the job for this machine: every name and the rows are
    checked before anything starts or is written."""
    store = ActivationStore.open(spec.store, spec.storage_options)
    return store, make_plan(spec, store, workers=spec.compute.workers or os.cpu_count() or 1)


def run_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    overwrite: bool = False,
    log: TextIO | None = None,
) -> RunSummary:
    """Run a job end to end and write its results store. See the module docstring."""
    log = log or sys.stderr
    t0 = time.perf_counter()
    store, _ = open_checked(spec)
    with output_lock(spec.output, spec.storage_options):
        return _run_locked(spec, store, address=address, overwrite=overwrite, log=log, t0=t0)


def _run_locked(spec: JobSpec, store, *, address, overwrite, log, t0) -> RunSummary:
    identity = spec_identity(spec)
    check_output(spec.output, identity, spec.storage_options, overwrite)

    cpus = connect(address, spec.compute.workers)
    plan = make_plan(spec, store, workers=spec.compute.workers or cpus,
                     node_cpus=largest_node_cpus())
    state = StateStore(spec.output, spec.storage_options)
    checkpointing = plan.space == "feature" and spec.compute.checkpoint_seconds > 0
    if plan.space == "feature":
        tasks = tile_tasks(plan, store if checkpointing else None)
        keys = [t.checkpoint_key for ts in tasks.values() for t in ts if t.checkpoint_key]
    else:
        tasks, keys = gram_tasks(plan), []
    n_tasks = (sum(len(t) for t in tasks.values()) if plan.space == "feature"
               else len(tasks) + len(plan.tiles))
    rows_reused = sum(state.partial_rows(k) for k in keys)
    if rows_reused:
        print(f"resume: {rows_reused:,} task rows of an interrupted run are reused "
              f"({state_url(spec.output)})", file=log)
    print(
        f"plan: {len(plan.units)} units, {plan.n_pairs} pairs, {plan.n_rows:,} rows, "
        f"{plan.space} space, {len(plan.tiles)} tile(s), {n_tasks} task(s) on {plan.workers} "
        f"worker(s), {plan.precision} GEMMs",
        file=log,
    )
    progress = (Progress(plan.n_rows, "accumulate", stream=log) if plan.space == "feature"
                else Progress(len(plan.units), "grams", stream=log, unit="units"))
    t_acc = time.perf_counter()
    parts = bounds = None
    tiles_reused, done_keys = 0, {}
    finalize_seconds = 0.0  # finishing pairs inside the accumulation stage (feature space)
    checkpoints = Checkpoints(state, spec.compute.checkpoint_seconds) if keys else None
    if plan.space == "feature" and spec.compute.bootstrap:
        parts = run_tiles(store, tasks, progress, checkpoints, keep_parts=True)
    elif plan.space == "feature":
        finalizer, done_keys = _finish_tiles(spec, plan, store, state, tasks, progress,
                                             checkpoints, log)
        finalize_seconds = finalizer.seconds
    else:
        grams = run_grams(store, tasks, plan.groups, plan.tiles, spec.metrics,
                          svcca_threshold=spec.compute.svcca_threshold, progress=progress,
                          tile_threads=plan.tile_threads)
    accumulate_seconds = time.perf_counter() - t_acc - finalize_seconds
    progress.close()

    t_fin = time.perf_counter()
    if parts is not None:
        matrices = finalize(plan, {tile: merge_all(ps) for tile, ps in parts.items()},
                            spec.metrics, svcca_threshold=spec.compute.svcca_threshold)
    elif plan.space == "feature":
        matrices = finalizer.result()
        tiles_reused = finalizer.restored
    else:
        matrices = finalize_sample(plan, grams, spec.metrics)
    finalize_seconds += time.perf_counter() - t_fin
    print(f"finalize: {plan.n_pairs} pairs in {finalize_seconds:.1f} s", file=log)
    if parts is not None:
        t_boot = time.perf_counter()
        bounds = bootstrap_bounds(plan, parts, spec)
        print(f"bootstrap: {spec.compute.bootstrap} replicates over "
              f"{len(plan.row_ranges)} row shards in {time.perf_counter() - t_boot:.1f} s",
              file=log)

    ds = build_dataset(
        matrices,
        [(u.model, u.layer) for u in plan.units],
        {m: METRICS[m].direction for m in spec.metrics},
        {
            "spec": json.dumps(spec.to_dict(), sort_keys=True),
            "spec_identity": identity,
            "store_fingerprint": store.row_fingerprint or "",
            "rows": list(plan.rows),
        },
        bounds=bounds,
    )
    write_results(ds, spec.output, spec.storage_options)
    # The result is safe: checkpoints have done their work.
    state.remove_partials(keys)
    for kind, done in done_keys.items():
        state.remove(kind, done)
    print(f"results: {redact(spec.output)}", file=log)
    return RunSummary(
        output=redact(spec.output),
        units=len(plan.units),
        pairs_total=plan.n_pairs,
        pairs_computed=plan.n_pairs,
        pairs_reused=0,
        rows=plan.n_rows,
        seconds=round(time.perf_counter() - t0, 3),
        metrics=tuple(spec.metrics),
        tiles=len(plan.tiles),
        tasks=n_tasks,
        gemm_flops=plan.gemm_flops(),
        accumulate_seconds=round(accumulate_seconds, 3),
        rows_reused=rows_reused,
        tiles_reused=tiles_reused,
    )
