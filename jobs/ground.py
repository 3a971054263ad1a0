"""``repscope ground SPEC --scores scores.csv``: the seed paper's tests on a user's store.

Ding, Denain & Steinhardt (2021) ground similarity metrics in function. The statistics come
from the job pipeline (:mod:`repscope.jobs.pipeline`: the same plan, execution, checkpoints
and finishing as ``repscope run``, on any executor), run with a row-shard bootstrap and
keeping each unit's moments; its results store is written to ``<out>/results.zarr``. The
tests then write one table (CSV) and one plot (PNG) each into ``<out>``:

1. ``probes``: principal-component deletion (sensitivity), from each unit's moments;
2. ``rank``: rank correlation of metric distance with functional score differences;
3. ``specificity``: corresponding layers vs different layers across seeds;
4. ``matrix`` (+ ``bootstrap.png``): every matrix entry with its bootstrap interval;
5. ``null.png`` (columns of ``matrix.csv``): a permutation null per unit pair, on an
   in-memory row sample (shuffled pairs' moments are not functions of the job's moments);

plus ``summary.json``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import numpy as np

from repscope.cluster.bootstrap import permutation_null
from repscope.cluster.probes import pc_deletion_probe, probe_metrics
from repscope.cluster.rankstats import (
    as_distance,
    mean_rank_correlation,
    rank_correlation_with_function,
    seed_specificity,
)
from repscope.cluster.registry import METRICS
from repscope.errors import InputError, NotFoundError
from repscope.jobs.ground_plots import (
    plot_intervals,
    plot_null,
    plot_probes,
    plot_rank,
    plot_specificity,
)
from repscope.jobs.ground_tables import plain, read_scores, write_table
from repscope.jobs.pipeline import Statistics, execute_job
from repscope.jobs.spec import JobSpec

__all__ = ["run_ground", "ground_spec", "DEFAULT_FRACTIONS", "NULL_BYTES", "one_blas_thread"]

DEFAULT_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Bytes of activations the permutation null may hold in memory (a row sample beyond it).
NULL_BYTES = 512 << 20


@dataclass(frozen=True)
class Scored:
    """The job's models (in order) and their functional scores."""

    models: tuple[str, ...]
    scores: tuple[float, ...]


def ground_spec(spec: JobSpec, store, scores: dict[str, float], out_dir: Path, *,
                replicates: int, shards: int) -> tuple[JobSpec, Scored]:
    """The job the tests need: the spec's (or the store's scored) models, with a bootstrap
    of ``replicates`` over ``shards`` row shards, written to ``<out_dir>/results.zarr``."""
    in_store = store.models()
    missing = sorted(set(scores) - set(in_store))
    if missing:
        raise NotFoundError(f"models in the scores file are not in store {store.url}: "
                            f"{', '.join(missing)} (store has {', '.join(in_store)})")
    if spec.models is not None:
        models = list(spec.models)
        unscored = [m for m in models if m not in scores]
        if unscored:
            raise InputError(f"models of the spec have no score in the scores file: "
                             f"{', '.join(unscored)}")
    elif isinstance(spec.layers, dict):
        models = list(spec.layers)
    else:
        models = [m for m in in_store if m in scores]  # the scored models of the store
    if len(models) < 3:
        raise InputError(f"ground needs at least 3 models with scores, got {len(models)} "
                         f"({', '.join(models)})")
    compute = replace(spec.compute, bootstrap=replicates, bootstrap_shards=shards)
    job = replace(spec, models=tuple(models), compute=compute,
                  output=str(Path(out_dir).absolute() / "results.zarr"))
    return job, Scored(tuple(models), tuple(scores[m] for m in models))


def one_blas_thread():
    """Limit BLAS to one thread for the many small eigh/SVDs of the tests: on a loaded
    machine a threaded 64 x 64 eigh measured 14 ms against 0.3 ms single-threaded."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def run_ground(spec: JobSpec, scores_path, out_dir, *, fractions=DEFAULT_FRACTIONS,
               replicates: int = 100, permutations: int = 10, shards: int = 20,
               seed: int = 0, address: str | None = None, log: TextIO | None = None) -> dict:
    """Run the job, then every test; write the tables and plots into ``out_dir``.

    scores_path: CSV ``model,score`` (larger = better). replicates, shards: the bootstrap
    (0 replicates: none). permutations: row shuffles per unit pair for the null (0: none).
    log: where the job's stage lines go (default stderr). Returns the summary (also written
    as ``summary.json``).
    """
    log = log or sys.stderr
    from repscope.store import ActivationStore

    scores = read_scores(scores_path)
    store = ActivationStore.open(spec.store, spec.storage_options)
    n = (spec.rows[1] or store.n_rows or 0) - spec.rows[0]
    shards = max(2, min(shards, n // 8))
    out = Path(out_dir)
    job, scored = ground_spec(spec, store, scores, out, replicates=replicates, shards=shards)
    print(f"ground: {len(scored.models)} models, {n:,} rows, metrics "
          f"{', '.join(spec.metrics)}"
          + (f", bootstrap {replicates} x {shards} shards" if replicates else ""), file=log)
    out.mkdir(parents=True, exist_ok=True)
    _, stats = execute_job(job, address=address, overwrite=True, keep_units=True, log=log)
    units = [(u.model, u.layer) for u in stats.selection.units]
    summary: dict = {"units": len(units), "models": list(scored.models),
                     "rows": stats.selection.n_rows, "metrics": list(spec.metrics),
                     "results": job.output, "files": {}}
    with one_blas_thread():
        summary["files"]["probes"] = _probes(spec, stats, units, fractions, out, summary)
        summary["files"]["rank"] = _rank(spec, stats, units, scored, out, summary)
        summary["files"]["specificity"] = _specificity(stats, units, out, summary)
        summary["files"]["matrix"] = _matrix(spec, store, stats, units, out, summary,
                                             replicates=replicates, shards=shards,
                                             permutations=permutations,
                                             rng=np.random.default_rng(seed))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=plain))
    summary["files"]["summary"] = [str(out / "summary.json")]
    return summary


def _probes(spec, stats: Statistics, units, fractions, out: Path, summary) -> list[str]:
    """1. PC deletion, per unit, from its moments."""
    metrics = spec.metrics
    pmetrics = probe_metrics(metrics)
    rows = []
    for u, (model, layer) in enumerate(units):
        if not pmetrics:
            break
        # A unit recomputed in float64 (its float32 rank was ambiguous) has float64 moments.
        precision = "float64" if u in stats.recomputed else spec.compute.precision
        for pt in pc_deletion_probe(stats.unit_moments[u], fractions, pmetrics,
                                    svcca_threshold=spec.compute.svcca_threshold,
                                    precision=precision, eig_floor=spec.compute.eig_floor,
                                    name=f"{model}/{layer}"):
            for k, d in pt.distance.items():
                rows.append([model, layer, k, pt.end, pt.k, round(pt.fraction, 6),
                             pt.variance_kept, d])
    summary["probes"] = {"metrics": list(pmetrics),
                         "excluded": [k for k in metrics if k not in pmetrics]}
    files = write_table(out / "probes.csv", ["model", "layer", "metric", "end", "k", "fraction",
                                             "variance_kept", "distance"], rows)
    if rows:
        files.append(plot_probes(out / "probes.png", rows, pmetrics))
    return [str(f) for f in files]


def _rank(spec, stats: Statistics, units, scored: Scored, out: Path, summary) -> list[str]:
    """2. Rank correlation with function, per layer and metric, averaged over layers."""
    index = {u: i for i, u in enumerate(units)}
    models = scored.models
    common = [layer for m, layer in units if m == models[0]
              and all((other, layer) in index for other in models)]
    rows, points, means = [], [], {}
    for k in spec.metrics:
        d = as_distance(k, stats.matrices[k])
        ranks = []
        for layer in common:
            sel = [index[(m, layer)] for m in models]
            r = rank_correlation_with_function(d[np.ix_(sel, sel)], scored.scores, models,
                                               layer)
            ranks.append(r)
            rows.append([k, layer, r.reference, len(r.models), r.spearman_rho, r.spearman_p,
                         r.kendall_tau, r.kendall_p])
            points += [(k, layer, g, v) for g, v in zip(r.score_gap, r.distance, strict=True)]
        mean = mean_rank_correlation(ranks)
        means[k] = mean
        rows.append([k, "mean", "", mean["layers"], mean["spearman_rho"], "",
                     mean["kendall_tau"], ""])
    summary["rank"] = means
    files = write_table(out / "rank.csv", ["metric", "layer", "reference", "models",
                                           "spearman_rho", "spearman_p", "kendall_tau",
                                           "kendall_p"], rows)
    files.append(plot_rank(out / "rank.png", points, means, spec.metrics))
    return [str(f) for f in files]


def _specificity(stats: Statistics, units, out: Path, summary) -> list[str]:
    """3. Specificity to seeds: same-layer vs different-layer distances across models."""
    seps = seed_specificity(stats.matrices, [m for m, _ in units], [lay for _, lay in units])
    rows = []
    for k, sep in seps.items():
        for group, s in sep.summary().items():
            rows.append([k, group, s.get("count"), s.get("mean"), s.get("median"),
                         s.get("std"), s.get("min"), s.get("max"), sep.auc, sep.p_value])
    summary["specificity"] = {k: {"auc": s.auc, "p_value": s.p_value, **s.summary()}
                              for k, s in seps.items()}
    files = write_table(out / "specificity.csv", ["metric", "group", "count", "mean", "median",
                                                  "std", "min", "max", "auc", "p_value"], rows)
    files.append(plot_specificity(out / "specificity.png", seps))
    return [str(f) for f in files]


def _null(spec, store, stats: Statistics, units, permutations: int, rng) -> tuple[dict, int]:
    """5. A permutation null per unit pair, on a row sample held in memory."""
    metrics = spec.metrics
    widths = [u.features for u in stats.selection.units]
    start, stop = stats.selection.rows
    sample = min(stop - start, max(8, NULL_BYTES // (8 * sum(widths))))
    data = [store.read(m, layer, start, start + sample).astype(np.float64) for m, layer in units]
    count = len(units)
    mean = {k: np.full((count, count), np.nan) for k in metrics}
    q95 = {k: np.full((count, count), np.nan) for k in metrics}
    symmetric = all(METRICS[k].symmetric for k in metrics)
    for i in range(count):
        for j in range(count):
            if i == j or (j < i and symmetric):
                continue
            null = permutation_null(data[i], data[j], metrics, permutations, rng=rng,
                                    svcca_threshold=spec.compute.svcca_threshold)
            for k, v in null.items():
                for a, b in ((i, j), (j, i)) if METRICS[k].symmetric else ((i, j),):
                    mean[k][a, b] = v.mean()
                    q95[k][a, b] = np.quantile(v, 0.95)
    return {"null_mean": mean, "null_q95": q95}, int(sample)


def _matrix(spec, store, stats: Statistics, units, out: Path, summary, *, replicates: int,
            shards: int, permutations: int, rng) -> list[str]:
    """4. Every entry with its bootstrap interval, and 5. its permutation null."""
    metrics = spec.metrics
    columns: dict[str, dict] = {}
    if replicates and stats.bounds:
        columns["ci_lower"] = {k: stats.bounds[k][0] for k in metrics}
        columns["ci_upper"] = {k: stats.bounds[k][1] for k in metrics}
        summary["bootstrap"] = {"replicates": replicates, "shards": shards, "level": 0.9}
    if permutations:
        null, sample = _null(spec, store, stats, units, permutations, rng)
        columns.update(null)
        summary["null"] = {"permutations": permutations, "rows": sample}
    header = ["metric", "model_x", "layer_x", "model_y", "layer_y", "value", *columns]
    rows = []
    for k in metrics:
        for i, (mx, lx) in enumerate(units):
            for j, (my, ly) in enumerate(units):
                rows.append([k, mx, lx, my, ly, stats.matrices[k][i, j],
                             *[columns[c][k][i, j] for c in columns]])
    files = write_table(out / "matrix.csv", header, rows)
    if "ci_lower" in columns:
        files.append(plot_intervals(out / "bootstrap.png", rows, header, metrics))
    if permutations:
        files.append(plot_null(out / "null.png", rows, header, metrics))
    return [str(f) for f in files]
