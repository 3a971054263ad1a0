"""Show and draw results: labelled model-pair blocks as text, JSON or PNG heatmaps.

Heatmaps follow the seed post's Figures 1 and 2: one panel per metric for a pair of models,
rows = layers of the first model, columns = layers of the second, a colour bar, and a title
that says which direction means "more similar".
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np

from repscope.errors import InputError
from repscope.jobs.spec import closest


def metric_names(ds) -> list[str]:
    """Metrics in the spec's order (the `directions` attribute); other variables (confidence
    bounds) are not metrics."""
    order = list(json.loads(ds.attrs.get("directions", "{}")))
    return [m for m in order if m in ds.data_vars]


def _pick(ds, metric: str | None) -> list[str]:
    names = metric_names(ds)
    if metric is None:
        return names
    if metric not in names:
        raise InputError(f"metric {metric!r} is not in these results{closest(metric, names)}")
    return [metric]


def models(ds) -> list[str]:
    seen: list[str] = []
    for m in ds["model_x"].values.tolist():
        if m not in seen:
            seen.append(m)
    return seen


def block(ds, metric: str, model_a: str, model_b: str):
    """(layers of a, layers of b, values) of one model-pair block of a metric's matrix."""
    mx = ds["model_x"].values
    my = ds["model_y"].values
    ix = np.flatnonzero(mx == model_a)
    iy = np.flatnonzero(my == model_b)
    values = ds[metric].values[np.ix_(ix, iy)]
    return ds["layer_x"].values[ix].tolist(), ds["layer_y"].values[iy].tolist(), values


def model_pairs(ds) -> list[tuple[str, str]]:
    """Every unordered model pair, and each model with itself."""
    ms = models(ds)
    return [(a, a) for a in ms] + list(itertools.combinations(ms, 2))


def direction_text(ds, metric: str) -> str:
    direction = ds[metric].attrs.get("direction", "similarity")
    return "higher = more similar" if direction == "similarity" else "lower = more similar"


def show_text(ds, metric: str | None = None) -> str:
    """Every model-pair block of the chosen metrics as aligned text tables."""
    lines = []
    for name in _pick(ds, metric):
        for a, b in model_pairs(ds):
            la, lb, values = block(ds, name, a, b)
            lines.append(f"{name} ({direction_text(ds, name)}): {a} (rows) vs {b} (columns)")
            width = max(8, *(len(str(x)) for x in lb))
            head = max(len(str(x)) for x in la)
            lines.append(" " * head + " " + " ".join(f"{str(x):>{width}}" for x in lb))
            for layer, row in zip(la, values, strict=True):
                cells = " ".join(f"{v:>{width}.4f}" for v in row)
                lines.append(f"{str(layer):<{head}} {cells}")
            lines.append("")
    return "\n".join(lines)


def show_json(ds, metric: str | None = None) -> str:
    out = {
        "units": [f"{m}/{layer}" for m, layer in zip(
            ds["model_x"].values.tolist(), ds["layer_x"].values.tolist(), strict=True)],
        "metrics": {
            name: {
                "direction": ds[name].attrs.get("direction"),
                "values": np.where(np.isfinite(ds[name].values), ds[name].values, None).tolist(),
            }
            for name in _pick(ds, metric)
        },
    }
    return json.dumps(out)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def heatmap(ax, ds, metric: str, model_a: str, model_b: str):
    la, lb, values = block(ds, metric, model_a, model_b)
    direction = ds[metric].attrs.get("direction", "similarity")
    # Same colour for "similar" whatever the direction: distances use the reversed map.
    cmap = "magma" if direction == "similarity" else "magma_r"
    image = ax.imshow(values, cmap=cmap, origin="lower", aspect="auto")
    ax.set_xticks(range(len(lb)), lb, rotation=90, fontsize=7)
    ax.set_yticks(range(len(la)), la, fontsize=7)
    ax.set_xlabel(f"{model_b} layer")
    ax.set_ylabel(f"{model_a} layer")
    ax.set_title(f"{metric}\n({direction}: {direction_text(ds, metric)})", fontsize=9)
    return image


def trends(ds, metric: str) -> dict[str, dict[str, list[float]]]:
    """For models in order as a series of checkpoints: each layer's value to the previous
    checkpoint and to the first. {"previous" | "first": {layer: [value for ckpt 1..M-1]}}."""
    ms = models(ds)
    keys = list(zip(ds["model_x"].values.tolist(), ds["layer_x"].values.tolist(), strict=True))
    index = {k: i for i, k in enumerate(keys)}
    layers = [layer for m, layer in keys if m == ms[0]]
    values = ds[metric].values
    out: dict[str, dict[str, list[float]]] = {"previous": {}, "first": {}}
    for layer in layers:
        if not all((m, layer) in index for m in ms):
            continue  # a layer missing from some checkpoint has no series
        i = [index[(m, layer)] for m in ms]
        out["previous"][layer] = [float(values[i[k], i[k - 1]]) for k in range(1, len(ms))]
        out["first"][layer] = [float(values[i[k], i[0]]) for k in range(1, len(ms))]
    return out


def write_trends(ds, out: Path, names: list[str]) -> list[Path]:
    """Per metric, each layer's similarity to the previous and to the first checkpoint
    over the series of models (in the results' order); needs at least three models."""
    import matplotlib.pyplot as plt

    ms = models(ds)
    if len(ms) < 3:
        return []
    written = []
    for name in names:
        series = trends(ds, name)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, (kind, title) in zip(axes, (("previous", "to the previous checkpoint"),
                                            ("first", "to the first checkpoint")), strict=True):
            for layer, ys in series[kind].items():
                ax.plot(range(1, len(ms)), ys, marker="o", label=layer)
            ax.set_xticks(range(1, len(ms)), ms[1:], rotation=45, ha="right", fontsize=7)
            ax.set_title(f"{name} {title}", fontsize=9)
            ax.set_xlabel("checkpoint")
        axes[0].set_ylabel(f"{name} ({direction_text(ds, name)})")
        axes[1].legend(fontsize=7, title="layer")
        fig.tight_layout()
        path = out / f"trend__{_safe(name)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(ds, out_dir: str | Path, metric: str | None = None) -> list[Path]:
    """PNG heatmaps: one per model pair and metric, plus one per model pair with every
    chosen metric side by side; with three or more models, per metric each layer's trend
    over the models taken as a series of checkpoints. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _pick(ds, metric)
    def figure(panels: list[str], a: str, b: str, path: Path) -> Path:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2),
                                 squeeze=False)
        for ax, name in zip(axes[0], panels, strict=True):
            fig.colorbar(heatmap(ax, ds, name, a, b), ax=ax, fraction=0.046)
        fig.suptitle(f"{a} vs {b}")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    written = []
    for a, b in model_pairs(ds):
        pair = f"{_safe(a)}__vs__{_safe(b)}"
        written.append(figure(names, a, b, out / f"{pair}.png"))
        written += [figure([name], a, b, out / f"{_safe(name)}__{pair}.png") for name in names]
    return written + write_trends(ds, out, names)
