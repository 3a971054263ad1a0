"""Running a :class:`~repscope.jobs.kernel_plan.KernelPlan` on an executor.

Exact regime: per pass, every tile a task (:meth:`run_kernel_tiles`), partials merged by a
:class:`~repscope.cluster.kernel_tiles.KernelAccumulator` as they arrive; with histogram
sketches the units' sampled rows are read first, for the ranges. The first pass's diagonal
tiles can carry the feature-space moments of the job's other metrics (``moments``), so the
rows are read once for both.

Approximate regime (rows beyond exact_rows): the sampled rows of every unit are read once;
rbf_cka and rsa are computed on them in this process, with error bars from four disjoint
quarters of the sample; mutual_knn for the sampled rows as queries against every row block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from repscope.cluster.kernel_tiles import (
    KernelAccumulator,
    PassContext,
    kernel_accumulate,
    sketch_ranges,
)
from repscope.cluster.moments import merge_all
from repscope.cluster.tasks import KernelTileTask
from repscope.jobs.kernel_plan import KernelPlan
from repscope.jobs.progress import Progress

__all__ = ["KernelResult", "run_kernel", "QUARTERS"]

#: Disjoint parts of the row sample whose spread gives the approximations' error bars.
QUARTERS = 4
# Student's t, 97.5% quantile with QUARTERS - 1 degrees of freedom: the standard error comes
# from only four values.
T_95 = 3.182


@dataclass
class KernelResult:
    """Matrices (U, U) per kernel metric; ``notes`` per metric for the results' attributes;
    ``bounds`` {metric: (lower, upper)} for approximated metrics; ``moments``: the merged
    feature moments of all units when the first pass carried them (else None)."""

    matrices: dict[str, np.ndarray]
    notes: dict[str, dict]
    bounds: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    moments: object = None


def run_kernel(plan: KernelPlan, store, executor, *, log: TextIO,
               moments: dict | None = None) -> KernelResult:
    """Compute the plan's kernel metrics. ``moments``: {widths, fourth} to also return the
    units' feature moments from the first pass (exact regime only)."""
    if plan.approximate:
        return _approximate(plan, store, executor, log)
    setup = plan.setup
    ranges = None
    if plan.sample:
        samples = executor.read_samples(store, plan.sample_tasks())
        ranges = sketch_ranges(setup, samples)
        del samples
    local = tuple((s - plan.rows[0], t - plan.rows[0]) for s, t in plan.blocks)
    extra = dict(moments=True, **moments) if moments else {}
    acc = KernelAccumulator(setup, local, ranges=ranges, **extra)
    tasks = plan.tasks()
    stage = 0
    while (ctx := acc.context()) is not None:
        stage += 1
        progress = Progress(len(tasks), f"kernel pass {stage}/{plan.passes} ({ctx.stage})",
                            stream=log, unit="tiles")
        executor.run_kernel_tiles(store, ctx, tasks, acc.add, progress=progress)
        progress.close()
        acc.finish_pass()
    merged = merge_all(acc.moment_parts) if acc.moment_parts else None
    notes = {m: dict(acc.notes.get(m, {}), regime="exact tiles") for m in setup.metrics}
    return KernelResult(acc.result(), notes, moments=merged)


def _approximate(plan: KernelPlan, store, executor, log: TextIO) -> KernelResult:
    setup = plan.setup
    samples = executor.read_samples(store, plan.sample_tasks())
    s = len(plan.sample)
    out = KernelResult({}, {})
    dense = [m for m in setup.metrics if m != "mutual_knn"]
    if dense:
        def estimate(rows) -> KernelAccumulator:
            return kernel_accumulate([x[rows] for x in samples], dense, setup.options,
                                     precision=setup.precision, names=setup.names)

        full = estimate(slice(None))
        order = np.random.default_rng(1).permutation(s)
        parts = [estimate(np.sort(order[q::QUARTERS])).result() for q in range(QUARTERS)]
        for m in dense:
            value = full.result()[m]
            quarters = np.stack([p[m] for p in parts])
            # A quarter's spread is twice the full sample's (sd ~ 1/sqrt(rows)); the bias
            # of a finite sample (~ 1/rows) is a third of the quarters' mean minus the full.
            se = quarters.std(axis=0, ddof=1) / 2.0
            bias = (quarters.mean(axis=0) - value) / 3.0
            err = T_95 * se + np.abs(bias)
            out.matrices[m] = value
            out.bounds[m] = (value - err, value + err)
            out.notes[m] = dict(full.notes.get(m, {}), regime="row sample", sample_rows=s,
                                error_bars="95% t interval (3 degrees of freedom) + "
                                           "|bias|, from 4 disjoint quarters of the sample",
                                max_error_bar=float(np.max(err)))
    if "mutual_knn" in setup.metrics:
        value, se = _query_knn(plan, store, executor, samples, log)
        out.matrices["mutual_knn"] = value
        out.bounds["mutual_knn"] = (value - 2 * se, value + 2 * se)
        out.notes["mutual_knn"] = {"regime": "sampled query rows", "query_rows": s,
                                   "neighbours": "exact, among all rows",
                                   "error_bars": "2 standard errors of the mean over the "
                                                 "query rows",
                                   "max_error_bar": float(np.max(2 * se))}
    return out


def _query_knn(plan: KernelPlan, store, executor, samples, log: TextIO):
    """mutual_knn of the sampled rows (queries) against all rows: (value, standard error)."""
    from dataclasses import replace

    setup = replace(plan.setup, metrics=("mutual_knn",))
    block = plan.blocks[0][1] - plan.blocks[0][0]
    s = len(plan.sample)
    query_blocks = tuple((q, min(s, q + block)) for q in range(0, s, block))
    local = tuple((a - plan.rows[0], b - plan.rows[0]) for a, b in plan.blocks)
    acc = KernelAccumulator(setup, local, query_blocks=query_blocks)
    ids = np.asarray(plan.sample, dtype=np.int64) - plan.rows[0]
    ctx = PassContext(setup, "final", queries=tuple(samples), query_ids=ids)
    refs = tuple(u.ref for u in plan.units)
    tasks = [KernelTileTask(refs, qi, j, qb, plan.blocks[j], plan.rows[0],
                            threads=plan.threads if plan.threads > 1 else None, query=True)
             for qi, qb in enumerate(query_blocks) for j in range(len(plan.blocks))]
    progress = Progress(len(tasks), "kernel pass 1/1 (query neighbours)", stream=log,
                        unit="tiles")
    executor.run_kernel_tiles(store, ctx, tasks, acc.add, progress=progress)
    progress.close()
    acc.finish_pass()
    return acc.result()["mutual_knn"], acc.knn_se
