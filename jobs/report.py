"""Read results for people: labelled model-pair blocks, their confidence bounds, colour
ranges and series, as text, JSON or PNG heatmaps (jobs/report_html.py: the interactive page).

Heatmaps follow the seed post's Figures 1 and 2: one panel per metric for a pair of models,
rows = layers of the first model, columns = layers of the second, a colour bar, and a title
that says which direction means "more similar". docs/report.md describes every file.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repscope.errors import InputError
from repscope.jobs.report_files import ReportFolder, file_stems
from repscope.jobs.spec import closest

#: Matrices up to this many layers per side get their values written in the cells.
ANNOTATE_MAX = 16
#: ... and up to this many, their confidence bounds too ("value\n[lower, upper]").
ANNOTATE_BOUNDS_MAX = 8
#: The range a metric can take, for colour scales that compare across runs: every similarity
#: lies in [0, 1] (debiased CKA can dip below 0 by chance; its colour is clipped there);
#: Procrustes distance in [0, 2]. A distance not listed here is scaled to its data.
SIMILARITY_RANGE = (0.0, 1.0)
DISTANCE_RANGES = {"procrustes": (0.0, 2.0)}
SCALES = ("natural", "auto")


def metric_names(ds) -> list[str]:
    """Metrics in the spec's order (the `directions` attribute); other variables (confidence
    bounds) are not metrics."""
    order = list(json.loads(ds.attrs.get("directions", "{}")))
    return [m for m in order if m in ds.data_vars]


def check_results(ds, source: str) -> None:
    """InputError unless `ds` is a results store with at least one metric (an activation
    store opens as a Zarr group too, with none)."""
    if "model_x" not in ds.coords or not metric_names(ds):
        raise InputError(f"{source} is not a results store (it holds no metric matrices); "
                         "`repscope inspect` reads activation stores")


def pick_metrics(ds, metric: str | None) -> list[str]:
    """All metrics of the results, or the one named; InputError for a name not in them."""
    names = metric_names(ds)
    if metric is None:
        return names
    if metric not in names:
        raise InputError(f"metric {metric!r} is not in these results{closest(metric, names)}")
    return [metric]


def models(ds) -> list[str]:
    """Models in the results' order."""
    seen: list[str] = []
    for m in ds["model_x"].values.tolist():
        if m not in seen:
            seen.append(m)
    return seen


def block(ds, variable: str, model_a: str, model_b: str):
    """(layers of a, layers of b, values of shape (layers of a, layers of b)) of one
    model-pair block of a variable's (U, U) matrix (a metric or one of its bounds)."""
    mx = ds["model_x"].values
    my = ds["model_y"].values
    ix = np.flatnonzero(mx == model_a)
    iy = np.flatnonzero(my == model_b)
    values = ds[variable].values[np.ix_(ix, iy)]
    return ds["layer_x"].values[ix].tolist(), ds["layer_y"].values[iy].tolist(), values


def model_pairs(ds) -> list[tuple[str, str]]:
    """Every unordered model pair, and each model with itself."""
    ms = models(ds)
    return [(a, a) for a in ms] + list(itertools.combinations(ms, 2))


def direction(ds, metric: str) -> str:
    return ds[metric].attrs.get("direction", "similarity")


def direction_text(ds, metric: str) -> str:
    return "higher = more similar" if direction(ds, metric) == "similarity" else \
        "lower = more similar"


@dataclass(frozen=True)
class Bounds:
    """Confidence bounds of a metric: the variables ``<metric>_lower`` and ``_upper``.

    level: the confidence level (0.9 for 90%); method: how they were computed."""

    lower: str
    upper: str
    level: float
    method: str

    @property
    def label(self) -> str:
        return f"{self.level:.0%} {self.method} interval"


def bounds(ds, metric: str) -> Bounds | None:
    """The confidence bounds stored for a metric (variables whose attribute ``bound_of``
    names it), or None when the run had no bootstrap."""
    sides = {}
    for name, var in ds.data_vars.items():
        if var.attrs.get("bound_of") == metric:
            for side in ("lower", "upper"):
                if str(name).endswith(f"_{side}"):
                    sides[side] = (str(name), var.attrs)
    if set(sides) != {"lower", "upper"}:
        return None
    attrs = sides["lower"][1]
    return Bounds(sides["lower"][0], sides["upper"][0], float(attrs.get("confidence_level", 0.9)),
                  str(attrs.get("method", "bootstrap")))


def natural_range(ds, metric: str) -> tuple[float, float] | None:
    """The range a metric takes whatever the data (module constants), or None if unknown."""
    if direction(ds, metric) == "similarity":
        return SIMILARITY_RANGE
    return DISTANCE_RANGES.get(metric)


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise InputError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    return scale


def color_limits(ds, metric: str, values: np.ndarray, scale: str) -> tuple[float, float]:
    """(vmin, vmax) of a heatmap's colour scale: the metric's natural range, or with scale
    "auto" (or no natural range) the finite values' own range."""
    check_scale(scale)
    known = natural_range(ds, metric)
    if scale == "natural" and known is not None:
        return known
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return known or SIMILARITY_RANGE
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < 1e-12:  # a constant block: centre it in a small range
        lo, hi = lo - 0.5e-3, hi + 0.5e-3
    return lo, hi


# --- series of models (trends) --------------------------------------------------------------

#: Words that, in the common prefix of numbered model names, say the models are positions in
#: one training run ("ckpt3", "run1-step2000", "epoch_12").
CHECKPOINT_WORDS = ("ckpt", "checkpoint", "step", "epoch", "iter")


@dataclass(frozen=True)
class Series:
    """Models taken as a series for trends: their order and what to call one of them."""

    models: list[str]
    noun: str  # "checkpoint" or "model"


def series(ds) -> Series | None:
    """The models as a series, or None when they are not one (then there are no trends).

    Rule (docs/report.md): the models are checkpoints when every name is the same prefix
    followed by a number and the prefix contains a word of CHECKPOINT_WORDS; they are then
    ordered by that number. Otherwise results of a nightly run (attribute ``kind: nightly``) are a
    series of models in the order they were added. Anything else (seeds, fine-tunes of one
    base) has no order, hence no trend. A series needs three models."""
    ms = models(ds)
    if len(ms) < 3:
        return None
    parts = [re.fullmatch(r"(.*?)(\d+)", m) for m in ms]
    if all(parts) and len({p.group(1) for p in parts}) == 1:
        prefix = parts[0].group(1).lower()
        if any(word in prefix for word in CHECKPOINT_WORDS):
            order = sorted(ms, key=lambda m: int(re.fullmatch(r".*?(\d+)", m).group(1)))
            return Series(order, "checkpoint")
    if ds.attrs.get("kind") == "nightly":
        return Series(ms, "model")
    return None


def trends(ds, metric: str, order: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    """For models in order (default: the series', else the results' order): each layer's
    value to the previous model and to the first.
    {"previous" | "first": {layer: [value for model 1..M-1]}}; a layer missing from some
    model has no series."""
    if order is None:
        found = series(ds)
        order = found.models if found else models(ds)
    keys = list(zip(ds["model_x"].values.tolist(), ds["layer_x"].values.tolist(), strict=True))
    index = {k: i for i, k in enumerate(keys)}
    layers = [layer for m, layer in keys if m == order[0]]
    values = ds[metric].values
    out: dict[str, dict[str, list[float]]] = {"previous": {}, "first": {}}
    for layer in layers:
        if not all((m, layer) in index for m in order):
            continue
        i = [index[(m, layer)] for m in order]
        out["previous"][layer] = [float(values[i[k], i[k - 1]]) for k in range(1, len(order))]
        out["first"][layer] = [float(values[i[k], i[0]]) for k in range(1, len(order))]
    return out


# --- text and JSON ----------------------------------------------------------------------------

def _cell(value: float, lo: float | None = None, hi: float | None = None) -> str:
    text = f"{value:.4f}"
    return text if lo is None else f"{text} [{lo:.4f}, {hi:.4f}]"


def show_text(ds, metric: str | None = None) -> str:
    """Every model-pair block of the chosen metrics as aligned text tables; with bounds, each
    cell is "value [lower, upper]"."""
    lines = []
    for name in pick_metrics(ds, metric):
        bound = bounds(ds, name)
        for a, b in model_pairs(ds):
            la, lb, values = block(ds, name, a, b)
            if bound:
                lower, upper = block(ds, bound.lower, a, b)[2], block(ds, bound.upper, a, b)[2]
            title = f"{name} ({direction_text(ds, name)}): {a} (rows) vs {b} (columns)"
            lines.append(title + (f", value [{bound.label}]" if bound else ""))
            cells = [[_cell(v, *((lower[i, j], upper[i, j]) if bound else ()))
                      for j, v in enumerate(row)] for i, row in enumerate(values)]
            width = max(8, *(len(str(x)) for x in lb), *(len(c) for row in cells for c in row))
            head = max(len(str(x)) for x in la)
            lines.append(" " * head + " " + " ".join(f"{str(x):>{width}}" for x in lb))
            for layer, row in zip(la, cells, strict=True):
                lines.append(f"{str(layer):<{head}} " + " ".join(f"{c:>{width}}" for c in row))
            lines.append("")
    lines += rank_lines(ds)
    return "\n".join(lines)


def rank_lines(ds) -> list[str]:
    """One line per unit whose effective rank (the directions the whitening metrics keep,
    docs/metrics.md) is below its width, and one for units recomputed in float64."""
    if "rank_x" not in ds.coords or "features_x" not in ds.coords:
        return []  # results written before ranks were recorded
    lines = []
    for model, layer, rank, width in zip(ds["model_x"].values.tolist(),
                                         ds["layer_x"].values.tolist(),
                                         ds["rank_x"].values.tolist(),
                                         ds["features_x"].values.tolist(), strict=True):
        if 0 <= rank < width:
            lines.append(f"rank: {model}/{layer} keeps {rank} of {width} directions")
    recomputed = list(ds.attrs.get("recomputed_float64", []))
    if recomputed:
        lines.append(f"rank: recomputed in float64 (ambiguous in float32): "
                     f"{', '.join(recomputed)}")
    return lines


def _plain(values: np.ndarray) -> list:
    return np.where(np.isfinite(values), values, None).tolist()


def show_json(ds, metric: str | None = None) -> str:
    """{"units": ["model/layer", ...], "metrics": {name: {"direction", "values" (U x U),
    and with bounds "lower", "upper" (U x U), "confidence_level", "interval_method"}}}."""
    metrics = {}
    for name in pick_metrics(ds, metric):
        entry = {"direction": ds[name].attrs.get("direction"),
                 "values": _plain(ds[name].values)}
        bound = bounds(ds, name)
        if bound:
            entry.update(lower=_plain(ds[bound.lower].values), upper=_plain(ds[bound.upper].values),
                         confidence_level=bound.level, interval_method=bound.method)
        metrics[name] = entry
    units = [f"{m}/{layer}" for m, layer in zip(
        ds["model_x"].values.tolist(), ds["layer_x"].values.tolist(), strict=True)]
    out = {"units": units, "metrics": metrics}
    if "rank_x" in ds.coords:
        out["ranks"] = ds["rank_x"].values.tolist()
    return json.dumps(out)


# --- PNG heatmaps -----------------------------------------------------------------------------

def _annotate(ax, image, values, lower=None, upper=None) -> None:
    """Write each cell's value (and bounds, on small matrices) in a colour that reads on it."""
    rows, cols = values.shape
    if max(rows, cols) > ANNOTATE_MAX:
        return
    with_bounds = lower is not None and max(rows, cols) <= ANNOTATE_BOUNDS_MAX
    size = max(4.5, 9 - 0.3 * max(rows, cols)) - (1.5 if with_bounds else 0)
    for i, j in itertools.product(range(rows), range(cols)):
        v = values[i, j]
        if not np.isfinite(v):
            continue
        text = f"{v:.2f}" + (f"\n[{lower[i, j]:.2f}, {upper[i, j]:.2f}]" if with_bounds else "")
        r, g, b, _ = image.cmap(image.norm(v))
        ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        ax.text(j, i, text, ha="center", va="center", fontsize=size, color=ink)


def _axes_labels(ax, la, lb, model_a, model_b) -> None:
    ax.set_xticks(range(len(lb)), lb, rotation=90, fontsize=7)
    ax.set_yticks(range(len(la)), la, fontsize=7)
    ax.set_xlabel(f"{model_b} layer")
    ax.set_ylabel(f"{model_a} layer")


def heatmap(ax, ds, metric: str, model_a: str, model_b: str, scale: str = "natural"):
    """One metric's model-pair block on `ax`, coloured on the metric's natural range (or its
    own with scale "auto"), values (and bounds) written in the cells of small matrices."""
    la, lb, values = block(ds, metric, model_a, model_b)
    # Same colour for "similar" whatever the direction: distances use the reversed map.
    cmap = "magma" if direction(ds, metric) == "similarity" else "magma_r"
    vmin, vmax = color_limits(ds, metric, values, scale)
    image = ax.imshow(values, cmap=cmap, origin="lower", aspect="auto", vmin=vmin, vmax=vmax)
    bound = bounds(ds, metric)
    lower = block(ds, bound.lower, model_a, model_b)[2] if bound else None
    upper = block(ds, bound.upper, model_a, model_b)[2] if bound else None
    _annotate(ax, image, values, lower, upper)
    _axes_labels(ax, la, lb, model_a, model_b)
    ax.set_title(f"{metric}\n({direction(ds, metric)}: {direction_text(ds, metric)})",
                 fontsize=9)
    return image


def interval_width_map(ax, ds, metric: str, model_a: str, model_b: str):
    """The width (upper - lower) of a metric's confidence interval over a model-pair block."""
    bound = bounds(ds, metric)
    la, lb, lower = block(ds, bound.lower, model_a, model_b)
    width = block(ds, bound.upper, model_a, model_b)[2] - lower
    finite = width[np.isfinite(width)]
    image = ax.imshow(width, cmap="viridis", origin="lower", aspect="auto", vmin=0.0,
                      vmax=float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
    _annotate(ax, image, width)
    _axes_labels(ax, la, lb, model_a, model_b)
    ax.set_title(f"{metric}: width of the {bound.label}\n(upper - lower)", fontsize=9)
    return image


def _colorbar(fig, ax, image) -> None:
    """A colour bar, with an arrow at an end the data go past (debiased CKA below 0)."""
    values = np.ma.filled(np.ma.masked_invalid(image.get_array()), np.nan).ravel()
    values = values[np.isfinite(values)]
    low = bool(values.size) and values.min() < image.norm.vmin - 1e-12
    high = bool(values.size) and values.max() > image.norm.vmax + 1e-12
    extend = {(True, True): "both", (True, False): "min", (False, True): "max"}.get(
        (low, high), "neither")
    fig.colorbar(image, ax=ax, fraction=0.046, extend=extend)


def trend_figure(ds, metric: str, found: Series):
    """Per layer, the metric to the previous and to the first model of the series; the
    legend outside the axes, right of both panels."""
    import matplotlib.pyplot as plt

    points = trends(ds, metric, found.models)
    ticks = range(1, len(found.models))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (kind, title) in zip(axes, (("previous", f"to the previous {found.noun}"),
                                        ("first", f"to the first {found.noun}")), strict=True):
        for layer, ys in points[kind].items():
            ax.plot(ticks, ys, marker="o", label=layer)
        ax.set_xticks(ticks, found.models[1:], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{metric} {title}", fontsize=9)
        ax.set_xlabel(found.noun)
    axes[0].set_ylabel(f"{metric} ({direction_text(ds, metric)})")
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, title="layer", loc="center left",
               bbox_to_anchor=(1.0, 0.5), bbox_transform=axes[1].transAxes)
    return fig


@dataclass(frozen=True)
class Planned:
    """A PNG to draw: its path, the model pair, the metrics side by side, whether it has a
    panel of interval widths."""

    path: Path
    pair: tuple[str, str] | None
    metrics: tuple[str, ...]
    widths: bool = False


def plan_report(ds, out_dir: str | Path, names: list[str]) -> list[Planned]:
    """Every PNG of a report and its file name. Names are the models' and metrics' own where
    they are safe in a file name, else sanitised plus a hash of the name (report_files), so
    no two files share a name: `a b` and `a_b` get `a_b-<hash>` and `a_b`."""
    out = Path(out_dir)
    stem = file_stems(models(ds) + names)
    planned = []
    for a, b in model_pairs(ds):
        pair = f"{stem[a]}__vs__{stem[b]}"
        planned.append(Planned(out / f"{pair}.png", (a, b), tuple(names)))
        planned += [Planned(out / f"{stem[n]}__{pair}.png", (a, b), (n,), bounds(ds, n) is not None)
                    for n in names]
    if series(ds):
        planned += [Planned(out / f"trend__{stem[n]}.png", None, (n,)) for n in names]
    return planned


def write_report(ds, out_dir: str | Path, metric: str | None = None,
                 scale: str = "natural") -> list[Path]:
    """PNG heatmaps: one per model pair and metric (with a panel of interval widths when the
    results have bounds), one per model pair with every chosen metric side by side, and for a
    series of models (`series`) one trend plot per metric. Refuses, before drawing, to
    replace a file repscope did not write (report_files). Returns the files written.

    scale: "natural" colours every metric on its natural range (`natural_range`), "auto" each
    panel on its own values' range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_scale(scale)
    names = pick_metrics(ds, metric)
    planned = plan_report(ds, out_dir, names)
    ReportFolder(out_dir).claim([p.path for p in planned])
    found = series(ds)
    written = []
    for item in planned:
        if item.pair is None:
            fig = trend_figure(ds, item.metrics[0], found)
        else:
            a, b = item.pair
            panels = len(item.metrics) + item.widths
            fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.2), squeeze=False)
            for ax, name in zip(axes[0], item.metrics, strict=False):
                _colorbar(fig, ax, heatmap(ax, ds, name, a, b, scale))
            if item.widths:
                ax = axes[0][-1]
                _colorbar(fig, ax, interval_width_map(ax, ds, item.metrics[0], a, b))
            fig.suptitle(f"{a} vs {b}")
            fig.tight_layout()
        # A trend's legend lies outside the axes: "tight" grows the image to hold it.
        fig.savefig(item.path, dpi=110, bbox_inches="tight" if item.pair is None else None)
        plt.close(fig)
        written.append(item.path)
    return written
