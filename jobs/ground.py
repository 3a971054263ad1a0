"""`repscope ground SPEC --scores scores.csv`: the seed paper's tests on a user's store.

Ding, Denain & Steinhardt (2021) ground similarity metrics in function. This command runs their
tests on the models of a job spec and writes one table (CSV) and one plot (PNG) per test:

1. ``probes``: principal-component deletion (sensitivity), from each unit's moments;
2. ``rank``: rank correlation of metric distance with functional score differences;
3. ``specificity``: corresponding layers vs different layers across seeds;
4. ``matrix`` (+ ``bootstrap.png``): every matrix entry with a shard-bootstrap interval;
5. ``null.png`` (columns of ``matrix.csv``): a permutation null per unit pair;

plus ``summary.json``. Statistics are computed in this process (no Ray): one streamed pass over
the rows accumulates one diagonal tile of every unit's columns per row shard with
:func:`cluster.moments.block_moments` and :func:`cluster.moments.merge`. Memory is
``shards x D^2`` float64 for D columns in all, so D is capped at :data:`MAX_COLUMNS`; the
permutation null holds a row sample of every unit in memory. For larger jobs, select fewer
models or layers in the spec.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repscope.cluster.accumulate import block_moments
from repscope.cluster.bootstrap import bootstrap as shard_bootstrap
from repscope.cluster.bootstrap import permutation_null
from repscope.cluster.matrices import similarity_matrices
from repscope.cluster.moments import (
    CrossMoments,
    empty_moments,
    merge,
    merge_all,
    pair_moments,
    unit_moments,
)
from repscope.cluster.probes import pc_deletion_probe, probe_metrics
from repscope.cluster.rankstats import (
    as_distance,
    mean_rank_correlation,
    rank_correlation_with_function,
    seed_specificity,
)
from repscope.cluster.registry import METRICS
from repscope.errors import InputError, NotFoundError

#: Total columns of all units above which the in-process pass is refused (shards x D^2 floats).
MAX_COLUMNS = 4096
DEFAULT_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Bytes of activations the permutation null may hold in memory (a row sample beyond it).
NULL_BYTES = 512 << 20


# --- inputs ------------------------------------------------------------------------------


def read_scores(path: str | Path) -> dict[str, float]:
    """A CSV with columns ``model,score`` (header required; larger = better) -> {model: score}."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"scores file {str(path)!r} does not exist")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"model", "score"} <= set(rows[0]):
        raise InputError(f"scores file {str(path)!r} needs a header 'model,score' and rows")
    out: dict[str, float] = {}
    for line, row in enumerate(rows, start=2):
        model = (row["model"] or "").strip()
        try:
            score = float(row["score"])
        except (TypeError, ValueError):
            score = math.nan
        if not model or not math.isfinite(score):
            raise InputError(f"scores file {str(path)!r}, line {line}: need a model name and a "
                             f"finite score, got {row['model']!r}, {row['score']!r}")
        if model in out:
            raise InputError(f"scores file {str(path)!r} lists model {model!r} twice")
        out[model] = score
    return out


@dataclass(frozen=True)
class GroundJob:
    """What the tests run on: units (model, layer) in order, their widths, the models (with
    scores, same order) and the row range."""

    units: tuple[tuple[str, str], ...]
    widths: tuple[int, ...]
    models: tuple[str, ...]
    scores: tuple[float, ...]
    start: int
    stop: int


def plan_ground(spec, store, scores: dict[str, float]) -> GroundJob:
    """Check the spec against the store and the scores; pick the units. One-line errors."""
    in_store = store.models()
    missing = sorted(set(scores) - set(in_store))
    if missing:
        raise NotFoundError(f"models in the scores file are not in store {spec.store}: "
                            f"{', '.join(missing)} (store has {', '.join(in_store)})")
    if spec.models is not None:
        models = list(spec.models)
        unscored = [m for m in models if m not in scores]
        if unscored:
            raise InputError(f"models of the spec have no score in the scores file: "
                             f"{', '.join(unscored)}")
    else:
        models = [m for m in in_store if m in scores]  # the scored models of the store
    if len(models) < 3:
        raise InputError(f"ground needs at least 3 models with scores, got {len(models)} "
                         f"({', '.join(models)})")
    units = []
    for model in models:
        if isinstance(spec.layers, dict):
            layers = spec.layers.get(model, store.layers(model))
        else:
            layers = spec.layers or store.layers(model)
        units += [(model, layer) for layer in layers]
    widths = tuple(store.unit_info(m, layer).features for m, layer in units)
    if sum(widths) > MAX_COLUMNS:
        raise InputError(f"{len(units)} units have {sum(widths)} columns in all; ground runs in "
                         f"one process and holds at most {MAX_COLUMNS}: select fewer models or "
                         "layers in the spec")
    n = store.n_rows or 0
    start, stop = spec.rows[0], spec.rows[1] if spec.rows[1] is not None else n
    if not 0 <= start < stop <= n:
        raise InputError(f"rows {start}:{stop} out of range for a store of {n} rows")
    return GroundJob(tuple(units), widths, tuple(models), tuple(scores[m] for m in models),
                     start, stop)


# --- one streamed pass -------------------------------------------------------------------


def read_block(store, units: Sequence[tuple[str, str]], start: int, stop: int) -> np.ndarray:
    """Rows start:stop of every unit side by side: ndarray of shape (rows, D)."""
    return np.hstack([store.read(m, layer, start, stop) for m, layer in units])


def shard_moments(store, job: GroundJob, shards: int, block_rows: int = 4096, *,
                  fourth: bool = False, gemm_dtype=np.float64) -> list[CrossMoments]:
    """One diagonal tile of all units per row shard (``shards`` equal row ranges), each the
    exact merge of its blocks' moments."""
    bounds = np.linspace(job.start, job.stop, shards + 1).astype(int)
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        acc = empty_moments(job.widths, fourth=fourth)
        for b in range(lo, hi, block_rows):
            z = read_block(store, job.units, b, min(b + block_rows, hi))
            acc = merge(acc, block_moments(z, widths_a=job.widths, fourth=fourth,
                                           gemm_dtype=gemm_dtype))
        out.append(acc)
    return out


def tile_matrices(tile: CrossMoments, names: Sequence[str], metrics, svcca_threshold: float):
    """{metric: (U, U)} from one diagonal tile of every unit."""
    count = len(tile.widths_a)
    return similarity_matrices(
        [unit_moments(tile, u) for u in range(count)], lambda i, j: pair_moments(tile, i, j),
        metrics, names=names, svcca_threshold=svcca_threshold)


# --- the tests ---------------------------------------------------------------------------


def run_ground(spec, scores_path, out_dir, *, fractions=DEFAULT_FRACTIONS, replicates=100,
               permutations=10, shards=20, level=0.9, seed=0, log=print) -> dict:
    """Run every test and write the tables and plots into ``out_dir``; returns the summary."""
    from repscope.store import ActivationStore

    scores = read_scores(scores_path)
    store = ActivationStore.open(spec.store, spec.storage_options)
    job = plan_ground(spec, store, scores)
    metrics = spec.metrics
    n = job.stop - job.start
    shards = max(2, min(shards, n // 8))
    fourth = any(METRICS[k].needs_fourth for k in metrics)
    log(f"ground: {len(job.units)} units of {len(job.models)} models, {n:,} rows, "
        f"{shards} shards, metrics {', '.join(metrics)}")
    parts = shard_moments(store, job, shards, fourth=fourth,
                          gemm_dtype=np.dtype(spec.compute.precision))
    with one_blas_thread():
        return _tests(spec, job, store, parts, out_dir, fractions=fractions,
                      replicates=replicates, permutations=permutations, shards=shards,
                      level=level, seed=seed)


def one_blas_thread():
    """Limit BLAS to one thread for the many small eigh/SVDs of the tests: on a loaded
    machine a threaded 64 x 64 eigh measured 14 ms against 0.3 ms single-threaded."""
    from contextlib import nullcontext

    try:
        from threadpoolctl import threadpool_limits
    except ModuleNotFoundError:  # optional: without it BLAS keeps its own setting
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _tests(spec, job, store, parts, out_dir, *, fractions, replicates, permutations, shards,
           level, seed) -> dict:
    metrics = spec.metrics
    names = [f"{m}/{layer}" for m, layer in job.units]
    n = job.stop - job.start
    tile = merge_all(parts)
    matrices = tile_matrices(tile, names, metrics, spec.compute.svcca_threshold)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    summary: dict = {"units": len(job.units), "models": list(job.models), "rows": n,
                     "metrics": list(metrics), "files": {}}

    # 1. PC deletion, per unit, from its moments.
    pmetrics = probe_metrics(metrics)
    probe_rows = []
    for u, (model, layer) in enumerate(job.units):
        for pt in pc_deletion_probe(unit_moments(tile, u), fractions, pmetrics or None,
                                    svcca_threshold=spec.compute.svcca_threshold,
                                    name=names[u]) if pmetrics else []:
            for k, d in pt.distance.items():
                probe_rows.append([model, layer, k, pt.end, pt.k, round(pt.fraction, 6),
                                   pt.variance_kept, d])
    summary["probes"] = {"metrics": list(pmetrics),
                         "excluded": [k for k in metrics if k not in pmetrics]}
    files = write_table(out / "probes.csv", ["model", "layer", "metric", "end", "k", "fraction",
                                             "variance_kept", "distance"], probe_rows)
    if probe_rows:
        files.append(plot_probes(out / "probes.png", probe_rows, pmetrics))
    summary["files"]["probes"] = [str(f) for f in files]

    # 2. Rank correlation with function, per layer and metric, averaged over layers.
    index = {u: i for i, u in enumerate(job.units)}
    common = [layer for m, layer in job.units if m == job.models[0]
              and all((other, layer) in index for other in job.models)]
    rank_rows, rank_points, rank_summary = [], [], {}
    for k in metrics:
        d = as_distance(k, matrices[k])
        ranks = []
        for layer in common:
            rows = [index[(m, layer)] for m in job.models]
            r = rank_correlation_with_function(d[np.ix_(rows, rows)], job.scores, job.models,
                                               layer)
            ranks.append(r)
            rank_rows.append([k, layer, r.reference, len(r.models), r.spearman_rho,
                              r.spearman_p, r.kendall_tau, r.kendall_p])
            rank_points += [(k, layer, g, v) for g, v in zip(r.score_gap, r.distance,
                                                             strict=True)]
        mean = mean_rank_correlation(ranks)
        rank_summary[k] = mean
        rank_rows.append([k, "mean", "", mean["layers"], mean["spearman_rho"], "",
                          mean["kendall_tau"], ""])
    summary["rank"] = rank_summary
    files = write_table(out / "rank.csv", ["metric", "layer", "reference", "models",
                                           "spearman_rho", "spearman_p", "kendall_tau",
                                           "kendall_p"], rank_rows)
    files.append(plot_rank(out / "rank.png", rank_points, rank_summary, metrics))
    summary["files"]["rank"] = [str(f) for f in files]

    # 3. Specificity to seeds.
    model_of = [m for m, _ in job.units]
    layer_of = [layer for _, layer in job.units]
    seps = seed_specificity(matrices, model_of, layer_of)
    spec_rows = []
    for k, sep in seps.items():
        for group, stats_ in sep.summary().items():
            spec_rows.append([k, group, stats_.get("count"), stats_.get("mean"),
                              stats_.get("median"), stats_.get("std"), stats_.get("min"),
                              stats_.get("max"), sep.auc, sep.p_value])
    summary["specificity"] = {k: {"auc": s.auc, "p_value": s.p_value, **s.summary()}
                              for k, s in seps.items()}
    files = write_table(out / "specificity.csv", ["metric", "group", "count", "mean", "median",
                                                  "std", "min", "max", "auc", "p_value"],
                        spec_rows)
    files.append(plot_specificity(out / "specificity.png", seps))
    summary["files"]["specificity"] = [str(f) for f in files]

    # 4. Bootstrap intervals and 5. permutation null, beside every matrix entry.
    columns = {k: {} for k in ("ci_lower", "ci_upper", "null_mean", "null_q95")}
    if replicates:
        def statistic(tiles):
            m = tile_matrices(tiles[0], names, metrics, spec.compute.svcca_threshold)
            return np.stack([m[k] for k in metrics])

        res = shard_bootstrap([[p] for p in parts], statistic, replicates, level=level, rng=rng)
        for i, k in enumerate(metrics):
            columns["ci_lower"][k], columns["ci_upper"][k] = res.lower[i], res.upper[i]
        summary["bootstrap"] = {"replicates": replicates, "shards": shards, "level": level}
    if permutations:
        sample = min(n, max(8, NULL_BYTES // (8 * sum(job.widths))))
        data = read_block(store, job.units, job.start, job.start + sample).astype(np.float64)
        offsets = np.concatenate(([0], np.cumsum(job.widths)))
        for k in metrics:
            columns["null_mean"][k] = np.full(matrices[k].shape, np.nan)
            columns["null_q95"][k] = np.full(matrices[k].shape, np.nan)
        count = len(job.units)
        for i in range(count):
            for j in range(count):
                if i == j or (j < i and all(METRICS[k].symmetric for k in metrics)):
                    continue
                x = data[:, offsets[i]:offsets[i + 1]]
                y = data[:, offsets[j]:offsets[j + 1]]
                null = permutation_null(x, y, metrics, permutations, rng=rng,
                                        svcca_threshold=spec.compute.svcca_threshold)
                for k, v in null.items():
                    for a, b in ((i, j), (j, i)) if METRICS[k].symmetric else ((i, j),):
                        columns["null_mean"][k][a, b] = v.mean()
                        columns["null_q95"][k][a, b] = np.quantile(v, 0.95)
        summary["null"] = {"permutations": permutations, "rows": int(sample)}
    header = ["metric", "model_x", "layer_x", "model_y", "layer_y", "value",
              *[c for c in columns if columns[c]]]
    rows = []
    for k in metrics:
        for i, (mx, lx) in enumerate(job.units):
            for j, (my, ly) in enumerate(job.units):
                rows.append([k, mx, lx, my, ly, matrices[k][i, j],
                             *[columns[c][k][i, j] for c in columns if columns[c]]])
    files = write_table(out / "matrix.csv", header, rows)
    if replicates:
        files.append(plot_intervals(out / "bootstrap.png", rows, header, metrics))
    if permutations:
        files.append(plot_null(out / "null.png", rows, header, metrics))
    summary["files"]["matrix"] = [str(f) for f in files]
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_plain))
    summary["files"]["summary"] = [str(out / "summary.json")]
    return summary


def _plain(value):
    return None if isinstance(value, float) and math.isnan(value) else float(value)


def write_table(path: Path, header: Sequence[str], rows) -> list[Path]:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return [path]


# --- plots (the paper's figures in kind) ------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(count: int, width: float = 4.0, height: float = 3.4):
    plt = _pyplot()
    cols = min(count, 3)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:count])


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_probes(path: Path, rows, metrics) -> Path:
    """Distance vs fraction of principal components deleted: mean over units, min-max band."""
    plt, fig, axes = _panels(len(metrics))
    for ax, k in zip(axes, metrics, strict=True):
        for end, colour in (("lowest", "tab:blue"), ("highest", "tab:red")):
            pts = [(r[5], r[7]) for r in rows if r[2] == k and r[3] == end]
            fr = sorted({f for f, _ in pts})
            vals = [[d for f2, d in pts if f2 == f] for f in fr]
            ax.plot(fr, [np.mean(v) for v in vals], "o-", color=colour, ms=3,
                    label=f"{end}-variance PCs deleted")
            ax.fill_between(fr, [min(v) for v in vals], [max(v) for v in vals], color=colour,
                            alpha=0.15)
        ax.set_xlabel("fraction of principal components deleted")
        ax.set_ylabel(f"{k} distance")
        ax.set_title(k, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("PC deletion (Ding et al. 2021): mean over units, band = min-max")
    return _save(plt, fig, path)


def plot_rank(path: Path, points, summary, metrics) -> Path:
    """Metric distance to the best model vs |score difference|, coloured by layer."""
    plt, fig, axes = _panels(len(metrics))
    layers = sorted({p[1] for p in points})
    colours = plt.get_cmap("viridis")(np.linspace(0, 1, max(len(layers), 1)))
    for ax, k in zip(axes, metrics, strict=True):
        for layer, colour in zip(layers, colours, strict=True):
            xy = [(g, d) for m, lay, g, d in points if m == k and lay == layer]
            if xy:
                ax.scatter(*zip(*xy, strict=True), color=colour, s=14, label=layer)
        s = summary[k]
        ax.set_title(f"{k}: mean rho {s['spearman_rho']:.2f}, tau {s['kendall_tau']:.2f}",
                     fontsize=9)
        ax.set_xlabel("|score difference| to the best model")
        ax.set_ylabel(f"{k} distance")
    axes[0].legend(fontsize=6)
    return _save(plt, fig, path)


def plot_specificity(path: Path, seps) -> Path:
    """Histograms of same-layer vs different-layer distances across seeds, AUC in the title."""
    plt, fig, axes = _panels(len(seps))
    for ax, (k, sep) in zip(axes, seps.items(), strict=True):
        values = np.concatenate([sep.same, sep.different])
        bins = np.linspace(values.min(), values.max(), 25) if values.size else 10
        ax.hist(sep.different, bins=bins, alpha=0.6, label="different layers")
        ax.hist(sep.same, bins=bins, alpha=0.6, label="same layer")
        ax.set_title(f"{k}: AUC {sep.auc:.2f}", fontsize=9)
        ax.set_xlabel(f"{k} distance across models")
    axes[0].legend(fontsize=7)
    return _save(plt, fig, path)


def _cross_model(rows, header, metric):
    at = {h: i for i, h in enumerate(header)}
    return [r for r in rows if r[0] == metric and r[at["model_x"]] != r[at["model_y"]]
            and r[at["layer_x"]] == r[at["layer_y"]]], at


def plot_intervals(path: Path, rows, header, metrics) -> Path:
    """Same-layer cross-model values with their bootstrap intervals."""
    plt, fig, axes = _panels(len(metrics), width=5.0)
    for ax, k in zip(axes, metrics, strict=True):
        sel, at = _cross_model(rows, header, k)
        v = np.array([r[at["value"]] for r in sel])
        lo = np.array([r[at["ci_lower"]] for r in sel])
        hi = np.array([r[at["ci_upper"]] for r in sel])
        # A percentile interval need not contain the estimate (bias): bars, then points.
        ax.vlines(range(len(v)), lo, hi, color="tab:blue", lw=1.5)
        ax.plot(range(len(v)), v, "o", color="k", ms=3)
        ax.set_xticks(range(len(v)), [f"{r[1]}:{r[3]} {r[2]}" for r in sel], rotation=90,
                      fontsize=5)
        ax.set_title(f"{k}: same layer across models, bootstrap interval", fontsize=9)
    return _save(plt, fig, path)


def plot_null(path: Path, rows, header, metrics) -> Path:
    """Every cross-unit value against its permutation null's 95th percentile."""
    plt, fig, axes = _panels(len(metrics))
    for ax, k in zip(axes, metrics, strict=True):
        at = {h: i for i, h in enumerate(header)}
        sel = [r for r in rows if r[0] == k and (r[1], r[2]) != (r[3], r[4])]
        ax.scatter([r[at["null_q95"]] for r in sel], [r[at["value"]] for r in sel], s=8)
        lim = [0, max(1.0, max((r[at["value"]] for r in sel), default=1.0))]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xlabel("permutation null, 95th percentile")
        ax.set_ylabel(f"{k} value")
        ax.set_title(k, fontsize=9)
    return _save(plt, fig, path)


# --- command line ------------------------------------------------------------------------


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise InputError(f"--pc-fractions must be comma-separated numbers in [0, 1], got {text!r}")
    return values


def cmd_ground(args) -> int:
    from repscope.jobs.spec import load_spec

    spec = load_spec(args.spec)
    summary = run_ground(
        spec, args.scores, args.out, fractions=_fractions(args.pc_fractions),
        replicates=args.bootstrap, permutations=args.permutations, shards=args.shards,
        seed=args.seed, log=(lambda *a: None) if args.json else print)
    if args.json:
        print(json.dumps(summary, default=_plain))
    else:
        for test, files in summary["files"].items():
            print(f"{test}: {', '.join(files)}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ground", help="the seed paper's statistical tests (PC deletion, rank correlation with "
        "function, seed specificity, bootstrap intervals, permutation null)")
    p.add_argument("spec", help="job spec (YAML): store, models, layers, metrics, rows")
    p.add_argument("--scores", required=True, help="CSV 'model,score' (larger = better)")
    p.add_argument("--out", default="ground-output", help="folder for tables and plots")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--pc-fractions", default=",".join(str(f) for f in DEFAULT_FRACTIONS),
                   help="fractions of principal directions to delete")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap replicates (0: off)")
    p.add_argument("--permutations", type=int, default=10,
                   help="row shuffles per unit pair for the null (0: off)")
    p.add_argument("--shards", type=int, default=20, help="row shards the bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="random seed of bootstrap and null")
    p.set_defaults(func=cmd_ground)

