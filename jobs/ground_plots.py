"""The grounding tests' plots: the seed paper's figures in kind (PNG, matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_probes", "plot_rank", "plot_specificity", "plot_intervals", "plot_null"]


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
