"""The one job pipeline: select -> plan -> execute -> finish -> write.

Every job goes through :func:`execute_job`: ``repscope run``, ``repscope nightly`` (which
pairs: only those with a new or changed unit, the rest reused from the previous result),
runs with a bootstrap (bounds on every entry), ``repscope ground`` (the same statistics, kept
for the paper's tests) and :func:`repscope.compare`. Two parameters vary:

- which pairs: all, or (``incremental``) those involving a unit that is new or changed since
  the output was written (:mod:`repscope.jobs.nightly`);
- where: an executor (:mod:`repscope.cluster.execute`): in this process, an embedded Ray
  instance, or a cluster. By default a job whose work is small, or whose store only this
  process can see (memory://), runs in this process; others on Ray.

Everything that can be refused is refused before any work: the spec, the store, the models,
layers and rows, and an output holding another spec's results. Nothing is written until
every matrix is computed, and a matrix with a NaN entry fails the job.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from typing import TextIO

import numpy as np

from repscope.cluster.execute import LocalExecutor, RayExecutor
from repscope.cluster.moments import UnitMoments, merge_all
from repscope.cluster.pages import on_plain_pages
from repscope.cluster.rank import RANK_RULE, AmbiguousRankError
from repscope.cluster.registry import METRICS, SHAPE_METRICS, metric_attributes
from repscope.cluster.tasks import Checkpoints
from repscope.errors import InputError, RepscopeError
from repscope.jobs import nightly
from repscope.jobs.finish import (
    TileFinalizer,
    TileValues,
    bootstrap_bounds,
    finalize_sample,
)
from repscope.jobs.kernel_job import run_kernel
from repscope.jobs.kernel_plan import kernel_metrics_of, make_kernel_plan
from repscope.jobs.lock import output_lock
from repscope.jobs.outputs import check_output_safe
from repscope.jobs.plan import Plan, Selection, gram_tasks, make_plan, select, tile_tasks
from repscope.jobs.progress import Progress
from repscope.jobs.results import build_results, check_output, write_results
from repscope.jobs.spec import JobSpec
from repscope.jobs.state import StateStore, digest, state_url
from repscope.store import ActivationStore, redact
from repscope.store.urls import scheme_of

__all__ = ["RunSummary", "Statistics", "execute_job", "run_job", "choose_executor"]

# Without a cluster, jobs whose accumulation needs fewer flops than this (a minute or two
# here) run in this process: on one machine Ray adds seconds of start-up and copies of the
# moments through its object store, and buys retries of lost workers, which only long jobs
# need (docs/performance.md).
IN_PROCESS_FLOPS = 5e12


@dataclass(frozen=True)
class RunSummary:
    """What a run did; ``to_dict`` is the ``--json`` line."""

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
    finish_seconds: float = 0.0  # finishing pairs from the statistics (per-unit, per-pair)
    rows_reused: int = 0  # rows of checkpointed partials loaded instead of recomputed
    tiles_reused: int = 0  # tiles an interrupted run had finished, restored not recomputed
    executor: str = ""  # where the tasks ran: process, embedded, cluster ("" if none ran)
    space: str = ""  # feature or sample ("" if nothing was computed)
    units_recomputed: int = 0  # units recomputed in float64 (ambiguous float32 rank)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["metrics"] = list(self.metrics)
        return d


@dataclass
class Statistics:
    """What a job computed, before it is written: (U, U) matrices per metric in the order of
    ``selection.units``, bootstrap bounds per metric (lower, upper) if asked, and with
    ``keep_units`` every computed unit's moments (index -> UnitMoments)."""

    selection: Selection
    matrices: dict[str, np.ndarray]
    bounds: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    unit_moments: dict[int, UnitMoments] = field(default_factory=dict)
    plan: Plan | None = None
    # State to remove once the result is written: task partials, finished tiles and caches.
    cleanup: tuple[list[str], dict[str, list[str]]] = ((), {})
    # Kernel metrics: how each was computed and its error bounds ({metric: {...}}).
    notes: dict[str, dict] = field(default_factory=dict)
    kernel_plan: object = None
    # Effective rank of each unit a whitening metric prepared (index -> rank), and the units
    # whose float32 rank was ambiguous and were recomputed in float64.
    ranks: dict[int, int] = field(default_factory=dict)
    recomputed: tuple[int, ...] = ()

    @property
    def n_pairs(self) -> int:
        return (self.plan or self.kernel_plan).n_pairs


def choose_executor(spec: JobSpec, sel: Selection, address: str | None):
    """Where the job's tasks run: ``compute.executor`` if set; else a cluster when an
    address is given (or RAY_ADDRESS); else this process for a memory:// store (Ray
    workers cannot see it) or a small job; else an embedded Ray instance."""
    import os

    choice = spec.compute.executor
    cluster = address or os.environ.get("RAY_ADDRESS")
    if scheme_of(spec.store) == "memory" and (choice == "ray" or cluster):
        raise InputError(
            f"store {redact(spec.store)} lives in this process's memory, which Ray workers "
            "cannot read: use compute.executor: process, or a store on disk or object storage"
        )
    if choice == "process" or (choice == "auto" and not cluster and _in_process(spec, sel)):
        return LocalExecutor(spec.compute.workers)
    return RayExecutor(address, spec.compute.workers)


def _in_process(spec: JobSpec, sel: Selection) -> bool:
    if scheme_of(spec.store) == "memory":
        return True
    widths = [u.features for u in sel.units]
    n = sel.n_rows
    feature = float(n) * sum(widths) ** 2
    sample = float(n) ** 2 * sum(widths)
    return min(feature, sample) < IN_PROCESS_FLOPS


def _plan_line(plan: Plan, where: str) -> str:
    tasks = (sum(1 for _ in plan.row_ranges) * len(plan.tiles) if plan.space == "feature"
             else len(plan.units) + len(plan.tiles))
    return (f"plan: {len(plan.units)} units, {plan.n_pairs} pairs, {plan.n_rows:,} rows, "
            f"{plan.space} space, {len(plan.tiles)} tile(s), {tasks} task(s) on "
            f"{plan.workers} worker(s) ({where}), {plan.precision} GEMMs")


class _Counters:
    """What the summary reports about the execution."""

    def __init__(self) -> None:
        self.tiles = self.tasks = self.rows_reused = self.tiles_reused = 0
        self.flops = self.accumulate_seconds = self.finish_seconds = 0.0
        self.executor = self.space = ""


def _compute(spec: JobSpec, store, sel: Selection, executor, plan_fresh, known, *, state,
             log: TextIO, counters: _Counters, keep_units: bool, on_unit) -> Statistics:
    """Plan, execute and finish the pairs of ``plan_fresh`` units (None: all); ``known``:
    moments of other units, loaded instead of computed. Kernel metrics (sample-space tiles)
    and the others (feature moments, or Grams) are planned together: when the moments fit
    one tile, the kernel pass's diagonal tiles accumulate them and the rows are read once."""
    kernel = kernel_metrics_of(spec)
    if not kernel:
        return _compute_moments(spec, store, sel, executor, plan_fresh, known, state=state,
                                log=log, counters=counters, keep_units=keep_units,
                                on_unit=on_unit)
    res = executor.resources(spec.compute.memory_per_worker)
    kplan = make_kernel_plan(spec, sel, res, fresh=plan_fresh)
    others = tuple(m for m in spec.metrics if m not in kernel)
    fspec = replace(spec, metrics=others)
    fplan = make_plan(fspec, sel, res, fresh=plan_fresh, known=frozenset(known)) \
        if others else None
    fold = (fplan is not None and plan_fresh is None and fplan.space == "feature"
            and len(fplan.tiles) == 1 and not kplan.approximate)
    if others and not fold:
        stats = _compute_moments(fspec, store, sel, executor, plan_fresh, known, state=state,
                                 log=log, counters=counters, keep_units=keep_units,
                                 on_unit=on_unit, plan=fplan)
    else:
        stats = Statistics(sel, {}, plan=fplan)
        counters.executor, counters.space = res.where, fplan.space if fplan else ""
    stats.kernel_plan = kplan
    print(kplan.describe(), file=log)
    if fold:
        print(_plan_line(fplan, res.where) + "; the moments ride on the kernel pass's "
              "diagonal tiles (rows read once)", file=log)
    t0 = time.perf_counter()
    kres = run_kernel(kplan, store, executor, log=log,
                      moments={"widths": fplan.widths(0), "fourth": fplan.fourth} if fold
                      else None)
    counters.accumulate_seconds += time.perf_counter() - t0
    counters.space = "+".join(x for x in (counters.space, "kernel") if x)
    counters.tiles += len(kplan.tiles)
    counters.tasks += len(kplan.tiles) * kplan.passes
    if fold:
        fin = TileFinalizer(fplan, others, svcca_threshold=spec.compute.svcca_threshold,
                            known=known, on_unit=_unit_hook(stats, keep_units, on_unit),
                            metric_options=spec.metric_options,
                            eig_floor=spec.compute.eig_floor)
        fin.add((0, 0), kres.moments)
        stats.matrices.update(fin.result())
        stats = _ranks_decided(fspec, store, sel, executor, fplan, fin, stats, log=log,
                               counters=counters, keep_units=keep_units, on_unit=on_unit)
    wanted = _wanted(kplan)
    for m, v in kres.matrices.items():
        stats.matrices[m] = np.where(wanted, v, np.nan)
    if kres.bounds:
        stats.bounds = dict(stats.bounds or {})
        for m, (lower, upper) in kres.bounds.items():
            stats.bounds[m] = (np.where(wanted, lower, np.nan), np.where(wanted, upper, np.nan))
    stats.matrices = {m: stats.matrices[m] for m in spec.metrics}
    stats.notes = kres.notes
    return stats


def _wanted(kplan) -> np.ndarray:
    """(U, U) True for the pairs the job computes (all, or those with a fresh unit)."""
    count = len(kplan.units)
    fresh = np.zeros(count, bool)
    fresh[list(kplan.fresh)] = True
    return fresh[:, None] | fresh[None, :]


def _unit_hook(stats: Statistics, keep_units: bool, on_unit):
    def unit_arrived(i: int, moments: UnitMoments) -> None:
        if keep_units:
            stats.unit_moments[i] = moments
        if on_unit:
            on_unit(i, moments)
    return unit_arrived


def _compute_moments(spec: JobSpec, store, sel: Selection, executor, plan_fresh, known, *,
                     state, log: TextIO, counters: _Counters, keep_units: bool, on_unit,
                     plan: Plan | None = None, seed: tuple[dict, dict] | None = None
                     ) -> Statistics:
    """The metrics of feature moments or Grams (the feature or sample space). ``seed``:
    per-unit caches (moments, shape) of units already decided, which need no moments."""
    res = executor.resources(spec.compute.memory_per_worker)
    if plan is None:
        plan = make_plan(spec, sel, res, fresh=plan_fresh, known=frozenset(known))
    counters.space, counters.executor = plan.space, res.where
    counters.tiles, counters.flops = len(plan.tiles), plan.gemm_flops()
    print(_plan_line(plan, res.where), file=log)
    stats = Statistics(sel, {}, plan=plan)
    unit_arrived = _unit_hook(stats, keep_units, on_unit)

    t0 = time.perf_counter()
    if plan.space == "sample":
        tasks = gram_tasks(plan, spec.compute.eig_floor, spec.compute.ambiguous_rank)
        counters.tasks = len(tasks) + len(plan.tiles)
        progress = Progress(len(plan.units), "grams", stream=log, unit="units")
        tiles = {t: (spec.metrics if plan.tile_pairs(t) else ()) for t in plan.tiles}
        grams = executor.run_grams(store, tasks, plan.groups, tiles,
                                   svcca_threshold=spec.compute.svcca_threshold,
                                   progress=progress, tile_threads=plan.tile_threads)
        progress.close()
        counters.accumulate_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        stats.matrices = finalize_sample(plan, grams, spec.metrics)
        counters.finish_seconds = time.perf_counter() - t1
        for (a, b), t in grams.items():
            if a == b and t.ranks_a is not None:
                group = plan.groups[a]
                stats.ranks.update({i: int(r) for i, r in zip(group, t.ranks_a, strict=True)
                                    if r >= 0})
                stats.recomputed += tuple(i for i, p in zip(group, t.precision_a, strict=True)
                                          if p != plan.precision)
        _say_recomputed(stats, plan, log)
        return stats

    checkpointing = spec.compute.checkpoint_seconds > 0 and state is not None
    tasks = tile_tasks(plan, sel.row_fingerprint if checkpointing else None)
    counters.tasks = sum(len(ts) for ts in tasks.values())
    keys = [t.checkpoint_key for ts in tasks.values() for t in ts if t.checkpoint_key]
    counters.rows_reused = sum(state.partial_rows(k) for k in keys) if keys else 0
    if counters.rows_reused:
        print(f"resume: {counters.rows_reused:,} task rows of an interrupted run are reused "
              f"({redact(state_url(spec.output))})", file=log)
    checkpoints = Checkpoints(state, spec.compute.checkpoint_seconds) if keys else None
    progress = Progress(plan.n_rows, "accumulate", stream=log)
    fin = TileFinalizer(plan, spec.metrics, svcca_threshold=spec.compute.svcca_threshold,
                        known=known, on_unit=unit_arrived, metric_options=spec.metric_options,
                        eig_floor=spec.compute.eig_floor,
                        caches=seed[0] if seed else None, shape_caches=seed[1] if seed else None)

    if spec.compute.bootstrap:
        parts: dict = {}
        executor.run_tiles(store, tasks, lambda tile, ps: parts.__setitem__(tile, ps),
                           progress=progress, checkpoints=checkpoints, keep_parts=True)
        progress.close()
        counters.accumulate_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        fin.add_all({tile: merge_all(ps) for tile, ps in parts.items()})
        stats.matrices = fin.result()
        counters.finish_seconds = time.perf_counter() - t1
        t2 = time.perf_counter()
        stats.bounds = bootstrap_bounds(plan, parts, spec.metrics, spec.compute.bootstrap,
                                        svcca_threshold=spec.compute.svcca_threshold,
                                        metric_options=spec.metric_options,
                                        eig_floor=spec.compute.eig_floor)
        print(f"bootstrap: {spec.compute.bootstrap} replicates over "
              f"{len(plan.row_ranges)} row shards in {time.perf_counter() - t2:.1f} s",
              file=log)
        if state is not None:
            state.remove_partials(keys)
        return _ranks_decided(spec, store, sel, executor, plan, fin, stats, log=log,
                              counters=counters, keep_units=keep_units, on_unit=on_unit)

    done_keys = _restore_and_save(spec, plan, state, tasks, fin, log) if checkpointing else {}
    todo = {tile: ts for tile, ts in tasks.items() if tile not in fin.done}
    if plan.stream_tiles:
        executor.run_tiles(store, todo, fin.add, progress=progress, checkpoints=checkpoints)
        progress.close()
    else:
        arrived: dict = {}
        executor.run_tiles(store, todo, arrived.__setitem__, progress=progress,
                           checkpoints=checkpoints)
        progress.close()
        fin.add_all(arrived)
    counters.finish_seconds = fin.seconds
    counters.accumulate_seconds = time.perf_counter() - t0 - fin.seconds
    counters.tiles_reused = fin.restored
    stats.matrices = fin.result()
    stats.cleanup = (keys, done_keys)
    return _ranks_decided(spec, store, sel, executor, plan, fin, stats, log=log,
                          counters=counters, keep_units=keep_units, on_unit=on_unit)


def _ranks_decided(spec: JobSpec, store, sel: Selection, executor, plan: Plan,
                   fin: TileFinalizer, stats: Statistics, *, log: TextIO,
                   counters: _Counters, keep_units: bool, on_unit) -> Statistics:
    """Feature space, once the pairs are finished: record each unit's effective rank, and
    for the units whose float32 statistics cannot decide it (cluster/rank.py) recompute
    their pairs in float64 (``compute.ambiguous_rank: recompute``) or refuse the job.

    The float64 pass computes only the tiles of the ambiguous units' groups and reuses the
    other units' float32 decisions (a clear gap there); with a bootstrap it recomputes every
    unit's moments, since each replicate needs them all."""
    stats.ranks.update(fin.ranks())
    bad = fin.ambiguous() if plan.precision == "float32" else []
    if not bad:
        return stats
    names = [plan.units[i].label for i in bad]
    listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    first = fin.caches.get(bad[0]) or fin.shape_caches[bad[0]]
    if spec.compute.ambiguous_rank == "refuse":
        raise AmbiguousRankError(
            f"float32 statistics cannot decide the rank of {len(bad)} unit(s): {listed} "
            f"({names[0]}: {first.ambiguous}); recompute them in float64 "
            "(compute.ambiguous_rank: recompute, or compute.precision: float64) or set "
            "compute.eig_floor")
    print(f"rank: float32 statistics cannot decide the rank of {listed} "
          f"({names[0]}: {first.ambiguous}); their pairs are recomputed in float64", file=log)
    spec64 = replace(spec, compute=replace(spec.compute, precision="float64",
                                           checkpoint_seconds=0))
    res = executor.resources(spec.compute.memory_per_worker)
    others = [i for i in range(len(plan.units)) if i not in bad]
    if spec.compute.bootstrap:
        seed, known = None, frozenset()
    else:
        seed = ({i: c for i, c in fin.caches.items() if i in others},
                {i: c for i, c in fin.shape_caches.items() if i in others})
        known = frozenset(others)
    plan64 = make_plan(spec64, sel, res, fresh=frozenset(bad), known=known)
    sub = _Counters()
    stats64 = _compute_moments(spec64, store, sel, executor, frozenset(bad), {}, state=None,
                               log=log, counters=sub, keep_units=keep_units, on_unit=on_unit,
                               plan=plan64, seed=seed)
    counters.accumulate_seconds += sub.accumulate_seconds
    counters.finish_seconds += sub.finish_seconds
    counters.flops += sub.flops
    counters.tasks += sub.tasks
    # Overwrite the pairs of the ambiguous units that this job computes.
    fresh = np.zeros(len(plan.units), bool)
    fresh[list(plan.fresh)] = True
    redo = np.zeros(len(plan.units), bool)
    redo[bad] = True
    mask = (fresh[:, None] | fresh[None, :]) & (redo[:, None] | redo[None, :])
    for m, v in stats64.matrices.items():
        stats.matrices[m] = np.where(mask, v, stats.matrices[m])
    for m, (lower, upper) in (stats64.bounds or {}).items():
        old_lower, old_upper = stats.bounds[m]
        stats.bounds[m] = (np.where(mask, lower, old_lower), np.where(mask, upper, old_upper))
    stats.ranks.update({i: r for i, r in stats64.ranks.items() if i in bad})
    stats.unit_moments.update({i: m for i, m in stats64.unit_moments.items() if i in bad})
    stats.recomputed = tuple(bad)
    return stats


def _say_recomputed(stats: Statistics, plan: Plan, log: TextIO) -> None:
    if stats.recomputed:
        names = [plan.units[i].label for i in stats.recomputed]
        print(f"rank: float32 statistics could not decide the rank of {', '.join(names[:5])}"
              f"{' ...' if len(names) > 5 else ''}: their Grams were recomputed in float64",
              file=log)


def _restore_and_save(spec: JobSpec, plan: Plan, state: StateStore, tasks: dict,
                      fin: TileFinalizer, log: TextIO) -> dict[str, list[str]]:
    """Checkpointed tiles: restore those an interrupted run finished (their entries and a
    diagonal tile's per-unit caches), and from now on save each finished tile the same way
    and drop its task partials, so the state never holds a whole job's moments. Returns the
    state keys to remove once the result is written."""
    from repscope.cluster.caches import UnitCache

    tile_keys = {tile: digest([t.checkpoint_key for t in ts], spec.metrics,
                              spec.compute.svcca_threshold)
                 for tile, ts in tasks.items()}

    def cache_key(tile, unit: int) -> str:
        return digest(tile_keys[tile], unit)

    # The shape metric prepares units from their moments, which a restored tile lacks: such
    # jobs recompute finished tiles (their task partials are still reused).
    restorable = not any(m in SHAPE_METRICS for m in spec.metrics)
    for tile, key in tile_keys.items():
        values = state.get("tiles", key, TileValues) if restorable else None
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
                if i in fin.caches:
                    state.put("caches", cache_key(tile, i), fin.caches[i])
        state.remove_partials([t.checkpoint_key for t in tasks[tile]])

    fin.on_done = done
    return {"tiles": list(tile_keys.values()),
            "caches": [cache_key(t, i) for t in tile_keys if t[0] == t[1]
                       for i in plan.groups[t[0]]]}


def _check_finite(stats: Statistics) -> None:
    """A NaN or Inf entry is a failed job, never a value: name the first one."""
    units = stats.selection.units
    for metric, matrix in stats.matrices.items():
        bad = np.argwhere(~np.isfinite(matrix))
        if bad.size:
            i, j = (int(v) for v in bad[0])
            raise RepscopeError(
                f"{metric} of {units[i].label} and {units[j].label} is not finite "
                f"({bad.shape[0]} such entries): the statistics lost all precision; check "
                "these units for extreme values, or run with compute.precision: float64"
            )


# The driver's memory (plans, merges, finishing) without numpy's huge-page advice where it
# stalls page faults (cluster/pages.py); workers' tasks get the same in cluster/execute.py.
@on_plain_pages
def execute_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    overwrite: bool = False,
    incremental: bool = False,
    write: bool = True,
    keep_units: bool = False,
    executor=None,
    log: TextIO | None = None,
) -> tuple[RunSummary, Statistics]:
    """Run a job end to end; see the module docstring.

    Parameters
    ----------
    spec : the checked job spec.
    address : Ray cluster address (None: RAY_ADDRESS, else an embedded instance or this
        process, see :func:`choose_executor`).
    overwrite : replace an output that holds results of a different spec.
    incremental : compute only pairs with a new or changed unit (nightly).
    write : write the results store (and take the output's lock).
    keep_units : keep every computed unit's moments in the returned statistics (ground).
    executor : an executor to use instead of choosing one (it is closed by the caller).
    log : where progress and stage lines go (default stderr).

    Returns
    -------
    (summary, statistics): what ran, and the matrices as written.
    """
    log = log or sys.stderr
    t0 = time.perf_counter()
    if incremental and not write:
        raise ValueError("an incremental job reuses and rewrites its output: write=True")
    if write:  # an output that may not be written is refused before the store is opened
        check_output_safe(spec.output, spec.store, spec.storage_options)
    store = ActivationStore.open(spec.store, spec.storage_options)
    sel = select(spec, store)
    if not write:
        return _execute(spec, store, sel, t0, address=address, overwrite=overwrite,
                        incremental=incremental, write=False, keep_units=keep_units,
                        executor=executor, log=log)
    with output_lock(spec.output, spec.storage_options, store=spec.store, log=log):
        return _execute(spec, store, sel, t0, address=address, overwrite=overwrite,
                        incremental=incremental, write=True, keep_units=keep_units,
                        executor=executor, log=log)


def _execute(spec, store, sel, t0, *, address, overwrite, incremental, write, keep_units,
             executor, log) -> tuple[RunSummary, Statistics]:
    # Checkpoints live beside the output: a job that writes none keeps none.
    state = StateStore(spec.output, spec.storage_options) if write else None
    count = len(sel.units)
    keys = nightly.unit_keys(sel)
    previous = None
    if write:
        if incremental:
            previous = nightly.previous_result(spec, sel, keys, state, overwrite)
        else:
            check_output(spec.output, spec_identity(spec), spec.storage_options, overwrite)
    fresh = set(range(count)) if previous is None else set(previous.fresh)
    counters = _Counters()
    matrices = {m: np.full((count, count), np.nan) for m in spec.metrics}
    stats = Statistics(sel, matrices)
    if fresh:
        own = executor is None
        executor = executor or choose_executor(spec, sel, address)
        try:
            stats = _compute(
                spec, store, sel, executor, None if previous is None else frozenset(fresh),
                {} if previous is None else previous.known, state=state, log=log,
                counters=counters, keep_units=keep_units,
                on_unit=(lambda i, m: state.put("units", keys[i], m)) if incremental else None)
        finally:
            if own:
                executor.close()
        print(f"finalize: {stats.n_pairs} pairs in {counters.finish_seconds:.1f} s",
              file=log)
        low = [f"{sel.units[i].label} {r} of {sel.units[i].features}"
               for i, r in sorted(stats.ranks.items()) if r < sel.units[i].features]
        if low:
            print(f"rank: {len(low)} unit(s) keep fewer directions than their width: "
                  f"{', '.join(low[:6])}{' ...' if len(low) > 6 else ''}", file=log)
    if previous is not None:
        nightly.fill_reused(stats, previous)
    _check_finite(stats)
    computed = stats.n_pairs if fresh else 0
    total = count * (count + 1) // 2
    if write:
        results = to_results(spec, stats, "nightly" if incremental else "run")
        write_results(results, spec.output, spec.storage_options)
        # The result is safe: checkpoints have done their work.
        partials, done_keys = stats.cleanup
        state.remove_partials(partials)
        for kind, done in done_keys.items():
            state.remove(kind, done)
        if incremental:
            stamp = nightly.snapshot(results, spec, state)
            print(f"results: {redact(spec.output)} ({computed} pairs computed, "
                  f"{total - computed} reused; snapshot {stamp})", file=log)
        else:
            print(f"results: {redact(spec.output)}", file=log)
    summary = RunSummary(
        output=redact(spec.output),
        units=count,
        pairs_total=total,
        pairs_computed=computed,
        pairs_reused=total - computed,
        rows=sel.n_rows,
        seconds=round(time.perf_counter() - t0, 3),
        metrics=tuple(spec.metrics),
        tiles=counters.tiles,
        tasks=counters.tasks,
        gemm_flops=counters.flops,
        accumulate_seconds=round(counters.accumulate_seconds, 3),
        finish_seconds=round(counters.finish_seconds, 3),
        rows_reused=counters.rows_reused,
        tiles_reused=counters.tiles_reused,
        executor=counters.executor,
        space=counters.space,
        units_recomputed=len(stats.recomputed),
    )
    return summary, stats


def to_results(spec: JobSpec, stats: Statistics, kind: str = "run") -> dict:
    """The results of a job's statistics, as jobs.results.build_results' dict
    (jobs/results.py has the layout)."""
    sel = stats.selection
    attrs = {
        "spec": json.dumps(spec.to_dict(), sort_keys=True),
        "spec_identity": spec_identity(spec),
        "reuse_identity": nightly.reuse_identity(spec),
        "store_fingerprint": sel.row_fingerprint,
        "rows": list(sel.rows),
        "kind": kind,
    }
    if stats.notes:  # how each kernel metric was computed, with its error bounds
        attrs["estimates"] = json.dumps(stats.notes, sort_keys=True)
    results = build_results(
        stats.matrices,
        [(u.model, u.layer) for u in sel.units],
        {m: METRICS[m].direction for m in spec.metrics},
        attrs,
        keys=nightly.unit_keys(sel),
        bounds=stats.bounds,
        unit_coords={
            # -1: no metric of the job decided this unit's rank (none whitens).
            "rank": np.array([stats.ranks.get(i, -1) for i in range(len(sel.units))]),
            "features": np.array([u.features for u in sel.units]),
        },
    )
    variables = results["data_vars"]
    for m in spec.metrics:
        variables[m]["attrs"].update(metric_attributes(m))
    results["attrs"]["rank_rule"] = RANK_RULE
    results["attrs"]["eig_floor"] = ("auto" if spec.compute.eig_floor is None
                                     else spec.compute.eig_floor)
    results["attrs"]["recomputed_float64"] = [sel.units[i].label for i in stats.recomputed]
    for m, note in stats.notes.items():
        variables[m]["attrs"]["estimate"] = json.dumps(note, sort_keys=True)
        if f"{m}_lower" in variables:  # an approximation's error bars, not a bootstrap's
            for side in ("lower", "upper"):
                variables[f"{m}_{side}"]["attrs"].update(method=note.get("error_bars", ""),
                                                         confidence_level=0.95)
    return results


def spec_identity(spec: JobSpec) -> str:
    """What must match for a run to replace an output without --overwrite."""
    return json.dumps(spec.identity(), sort_keys=True)


def run_job(spec: JobSpec, *, address: str | None = None, overwrite: bool = False,
            log: TextIO | None = None) -> RunSummary:
    """``repscope run``: compute every pair of the spec and write its results store."""
    return execute_job(spec, address=address, overwrite=overwrite, log=log)[0]

