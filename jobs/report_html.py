"""The interactive report: ONE self-contained HTML file that works offline.

Drawn with plotly (its Python package builds the figures; plotly.js, about 4.8 MB, is embedded
once in the page, so nothing is fetched). Sections, top to bottom:

1. `heatmaps`: every model pair and metric; a dropdown picks the metric (which heatmap is
   visible), another the model pair (the data of every metric's heatmap). Hover shows both
   units, the value and, when the results have them, the confidence bounds.
2. `comparison`: CKA beside PWCCA for one model pair, as in Figures 1 and 2 of Ding, Denain &
   Steinhardt (2021), with a pair dropdown.
3. `trends`: for a series of models (report.series), each layer's value to the previous and
   to the first model, with a metric dropdown.
4. the grounding tables of a `repscope ground` output folder, as HTML tables.

Colours follow jobs/report.py: natural ranges by default, the data's own with scale "auto".
"""

from __future__ import annotations

import csv
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repscope.errors import InputError
from repscope.jobs import report as rp
from repscope.jobs.report_files import ReportFolder

#: The file name of the page inside a report folder.
HTML_NAME = "report.html"
#: Rows of a grounding table shown in the page (the CSV beside it holds all).
TABLE_ROWS = 500
#: Plotly's modebar: keep zoom, pan and "download as PNG"; no plotly logo.
CONFIG = {"displaylogo": False, "responsive": True}
CKA_METRICS = ("linear_cka", "linear_cka_debiased")
#: Grounding tables first in this order, then any other CSV of the folder by name.
GROUND_ORDER = ("rank.csv", "specificity.csv", "probes.csv", "matrix.csv")
#: Dropdowns sit above the plots (in units of the plot height), clear of subplot titles.
MENU_Y = 1.22


def _rounded(values: np.ndarray, digits: int = 5) -> list:
    """A matrix as nested lists for the page: rounded (the page shows 4 decimals, so this
    only keeps the file small), None where not finite."""
    return np.where(np.isfinite(values), np.round(values, digits), None).tolist()


def _pairs(ds) -> list[tuple[str, str]]:
    """Model pairs, pairs of two different models first (the interesting default)."""
    pairs = rp.model_pairs(ds)
    return [p for p in pairs if p[0] != p[1]] + [p for p in pairs if p[0] == p[1]]


def _label(text: str) -> str:
    # Hover labels and titles render a subset of HTML; plotly templates read "%{".
    return html.escape(str(text)).replace("%{", "%&#123;")


def pair_trace(ds, metric: str, a: str, b: str, scale: str) -> dict:
    """The properties of one metric's heatmap trace for model pair (a, b): rows = layers of
    a (y), columns = layers of b (x), hover = both units, value and bounds."""
    la, lb, values = rp.block(ds, metric, a, b)
    zmin, zmax = rp.color_limits(ds, metric, values, scale)
    bound = rp.bounds(ds, metric)
    hover = f"{_label(a)} / %{{y}} (row)<br>{_label(b)} / %{{x}} (column)<br>" \
            f"{_label(metric)} = %{{z:.4f}}"
    custom = lower = upper = None
    if bound:
        lower = rp.block(ds, bound.lower, a, b)[2]
        upper = rp.block(ds, bound.upper, a, b)[2]
        custom = np.stack([lower, upper], axis=-1)
        custom = np.where(np.isfinite(custom), np.round(custom, 5), None).tolist()
        hover += f" [%{{customdata[0]:.4f}}, %{{customdata[1]:.4f}}] ({bound.label})"
    return {"z": _rounded(values), "x": [str(v) for v in lb], "y": [str(v) for v in la],
            "customdata": custom, "text": _cell_text(values, lower, upper),
            "texttemplate": "%{text}", "hovertemplate": hover + "<extra></extra>",
            "zmin": zmin, "zmax": zmax}


def _cell_text(values: np.ndarray, lower=None, upper=None) -> list | None:
    """What small matrices show in their cells (as the PNGs: report._annotate)."""
    side = max(values.shape)
    if side > rp.ANNOTATE_MAX:
        return None
    with_bounds = lower is not None and side <= rp.ANNOTATE_BOUNDS_MAX
    return [["" if not np.isfinite(v) else f"{v:.2f}" + (
        f"<br>[{lower[i, j]:.2f}, {upper[i, j]:.2f}]" if with_bounds else "")
        for j, v in enumerate(row)] for i, row in enumerate(values)]


def _heatmap(ds, metric: str, a: str, b: str, scale: str, colorbar: dict | None = None,
             **extra):
    import plotly.graph_objects as go

    # Same colour for "similar" whatever the direction, as in the PNGs: distances reversed.
    return go.Heatmap(name=metric, **pair_trace(ds, metric, a, b, scale), colorscale="Magma",
                      reversescale=rp.direction(ds, metric) != "similarity",
                      colorbar={"title": {"text": _label(metric)}, **(colorbar or {})}, **extra)


def _pair_menu(ds, metrics: list[str], pairs, scale: str, axes: list[str], x: float) -> dict:
    """A dropdown over model pairs: each entry restyles every trace (one per metric, in order)
    with that pair's block and retitles the axes."""
    buttons = []
    for a, b in pairs:
        traces = [pair_trace(ds, m, a, b, scale) for m in metrics]
        restyle = {key: [t[key] for t in traces] for key in traces[0]}
        layout = {}
        for axis in axes:
            layout[f"x{axis}.title.text"] = f"{_label(b)} layer (columns)"
            layout[f"y{axis}.title.text"] = f"{_label(a)} layer (rows)"
        buttons.append({"label": f"{a} vs {b}", "method": "update", "args": [restyle, layout]})
    return {"buttons": buttons, "active": 0, "x": x, "y": MENU_Y, "xanchor": "left",
            "yanchor": "top", "direction": "down", "showactive": True}


def _menu_label(text: str, x: float) -> dict:
    return {"text": text, "x": x, "y": MENU_Y + 0.01, "xref": "paper", "yref": "paper",
            "xanchor": "left", "yanchor": "bottom", "showarrow": False}


def _height(ds) -> int:
    layers = max(len(rp.block(ds, rp.metric_names(ds)[0], m, m)[0]) for m in rp.models(ds))
    return int(min(1100, max(480, 26 * layers + 260)))


def heatmap_figure(ds, metrics: list[str], scale: str):
    """Section 1: one heatmap trace per metric (the first visible), a metric dropdown that
    shows one, a model-pair dropdown that sets the data of all."""
    import plotly.graph_objects as go

    pairs = _pairs(ds)
    a, b = pairs[0]
    fig = go.Figure([_heatmap(ds, m, a, b, scale, visible=k == 0) for k, m in enumerate(metrics)])
    metric_menu = {
        "buttons": [{"label": m, "method": "restyle",
                     "args": [{"visible": [k == j for j in range(len(metrics))]}]}
                    for k, m in enumerate(metrics)],
        "active": 0, "x": 0.0, "y": MENU_Y, "xanchor": "left", "yanchor": "top",
        "direction": "down", "showactive": True,
    }
    fig.update_layout(
        updatemenus=[metric_menu, _pair_menu(ds, metrics, pairs, scale, ["axis"], 0.3)],
        annotations=[_menu_label("metric", 0.0), _menu_label("model pair", 0.3)],
        xaxis={"type": "category", "title": {"text": f"{_label(b)} layer (columns)"}},
        yaxis={"type": "category", "title": {"text": f"{_label(a)} layer (rows)"}},
        height=_height(ds), margin={"t": 150}, template="plotly_white",
    )
    return fig


def comparison_metrics(names: list[str]) -> tuple[str, str] | None:
    """(CKA metric, "pwcca") when both are among `names`, else None."""
    cka = next((m for m in CKA_METRICS if m in names), None)
    return (cka, "pwcca") if cka and "pwcca" in names else None


def comparison_figure(ds, metrics: tuple[str, str], scale: str):
    """Section 2: CKA (left) beside PWCCA (right) for one model pair, a pair dropdown."""
    from plotly.subplots import make_subplots

    pairs = _pairs(ds)
    a, b = pairs[0]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.22,
                        subplot_titles=[f"{m} ({rp.direction_text(ds, m)})" for m in metrics])
    for col, m in enumerate(metrics, start=1):
        fig.add_trace(_heatmap(ds, m, a, b, scale, colorbar={"x": 0.41 if col == 1 else 1.0}),
                      row=1, col=col)
    fig.update_xaxes(type="category", title_text=f"{_label(b)} layer (columns)")
    fig.update_yaxes(type="category", title_text=f"{_label(a)} layer (rows)")
    fig.update_layout(updatemenus=[_pair_menu(ds, list(metrics), pairs, scale, ["axis", "axis2"],
                                              0.0)],
                      annotations=[*fig.layout.annotations, _menu_label("model pair", 0.0)],
                      height=_height(ds), margin={"t": 150}, template="plotly_white")
    return fig


def trends_figure(ds, metrics: list[str], found: rp.Series):
    """Section 3: per metric (dropdown) and layer, the value to the previous and to the first
    model of the series; the legend right of the plots, outside them."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=[
        f"to the previous {found.noun}", f"to the first {found.noun}"])
    from plotly.colors import qualitative

    x = found.models[1:]
    palette = qualitative.Plotly
    owner = []
    for k, m in enumerate(metrics):
        points = rp.trends(ds, m, found.models)
        for col, kind in enumerate(("previous", "first"), start=1):
            for n, (layer, ys) in enumerate(points[kind].items()):
                fig.add_trace(go.Scatter(
                    x=x, y=[v if np.isfinite(v) else None for v in ys], mode="lines+markers",
                    name=str(layer), legendgroup=str(layer), showlegend=col == 1,
                    line={"color": palette[n % len(palette)]},
                    visible=k == 0, hovertemplate=f"{_label(m)} of layer {_label(layer)}, "
                    f"%{{x}} to the {kind} {found.noun}: %{{y:.4f}}<extra></extra>"),
                    row=1, col=col)
                owner.append(k)
    buttons = [{"label": m, "method": "update",
                "args": [{"visible": [o == k for o in owner]},
                         {"yaxis.title.text": f"{_label(m)} ({rp.direction_text(ds, m)})"}]}
               for k, m in enumerate(metrics)]
    fig.update_xaxes(type="category", title_text=found.noun)
    fig.update_layout(
        updatemenus=[{"buttons": buttons, "active": 0, "x": 0.0, "y": MENU_Y, "xanchor": "left",
                      "yanchor": "top", "direction": "down"}],
        annotations=[*fig.layout.annotations, _menu_label("metric", 0.0)],
        yaxis={"title": {"text": f"{_label(metrics[0])} "
                                 f"({rp.direction_text(ds, metrics[0])})"}},
        legend={"title": {"text": "layer"}, "x": 1.02, "xanchor": "left", "y": 0.5,
                "yanchor": "middle"},
        height=480, margin={"t": 150}, template="plotly_white")
    return fig


# --- grounding tables ----------------------------------------------------------------------

@dataclass(frozen=True)
class Table:
    name: str  # the CSV's file name
    header: list[str]
    rows: list[list[str]]  # the first TABLE_ROWS rows
    total: int  # rows in the file


def ground_tables(folder: str | Path) -> list[Table]:
    """The CSV tables of a `repscope ground` output folder (GROUND_ORDER first); InputError
    naming the folder when it holds none."""
    path = Path(folder)
    files = sorted(path.glob("*.csv"), key=lambda p: (
        GROUND_ORDER.index(p.name) if p.name in GROUND_ORDER else len(GROUND_ORDER), p.name))
    if not path.is_dir() or not files:
        raise InputError(f"--ground {folder}: no grounding tables (*.csv of `repscope ground "
                         "--out`) in that folder")
    tables = []
    for f in files:
        with f.open(newline="") as handle:
            rows = list(csv.reader(handle))
        if rows:
            tables.append(Table(f.name, rows[0], rows[1:TABLE_ROWS + 1], len(rows) - 1))
    return tables


def _number(text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        return html.escape(text)
    return html.escape(text) if value.is_integer() and "." not in text else f"{value:.4g}"


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{_number(c)}</td>" for c in row) + "</tr>"
                   for row in table.rows)
    note = "" if len(table.rows) == table.total else (
        f"<p class='note'>First {len(table.rows)} of {table.total} rows; all in "
        f"{html.escape(table.name)}.</p>")
    return (f"<h3>{html.escape(table.name)}</h3>{note}<div class='scroll'>"
            f"<table id='ground-{html.escape(Path(table.name).stem)}'><thead><tr>{head}</tr>"
            f"</thead><tbody>{body}</tbody></table></div>")


# --- the page ------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.5em; text-align: right; }
th { background: #f4f4f4; position: sticky; top: 0; }
.scroll { max-height: 28em; overflow: auto; display: inline-block; }
.note { color: #555; font-size: 0.9em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: 600; }
"""


def _summary(ds, names: list[str], scale: str, source: str) -> str:
    def range_text(m: str) -> str:
        known = rp.natural_range(ds, m)
        return f"[{known[0]:g}, {known[1]:g}]" if known else "its data's range"

    bounds = {m: rp.bounds(ds, m) for m in names}
    found = [b for b in bounds.values() if b]
    items = {
        "results": source,
        "created": ds.attrs.get("created", "?"),
        "repscope": ds.attrs.get("repscope_version", "?"),
        "rows": "[{}, {})".format(*ds.attrs["rows"]) if "rows" in ds.attrs else "?",
        "models": ", ".join(rp.models(ds)),
        "metrics": "; ".join(f"{m} ({rp.direction_text(ds, m)})" for m in names),
        "colours": "each metric on its natural range: " + "; ".join(
            f"{m} {range_text(m)}" for m in names) if scale == "natural"
        else "each heatmap on the range of its own values (--scale auto)",
        "bounds": (f"{found[0].label} for " + ", ".join(m for m, b in bounds.items() if b))
        if found else "none (run with compute: {bootstrap: N} for confidence bounds)",
    }
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>"
                   for k, v in items.items())
    return f"<dl>{rows}</dl>"


def _figure_html(fig, div_id: str) -> str:
    import plotly.io as pio

    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id,
                       config=CONFIG, default_height=f"{fig.layout.height}px")


def render_html(ds, *, metric: str | None = None, scale: str = "natural",
                ground: str | Path | None = None, source: str = "") -> str:
    """The page as a string (module docstring); plotly.js is embedded, nothing is fetched."""
    from plotly.offline import get_plotlyjs

    rp.check_scale(scale)
    names = rp.pick_metrics(ds, metric)
    if not names:
        raise InputError("these results hold no metric to report")
    tables = ground_tables(ground) if ground is not None else []
    parts = [f"<h1>repscope report: {html.escape(source)}</h1>",
             _summary(ds, names, scale, source),
             "<h2>Heatmaps</h2><p class='note'>Rows: layers of the first model of the pair; "
             "columns: layers of the second. Hover a cell for both units, the value and its "
             "bounds. pwcca [row, column] is weighted by the row unit's canonical variates."
             "</p>", _figure_html(heatmap_figure(ds, names, scale), "heatmaps")]
    pair = comparison_metrics(names)
    parts.append("<h2>CKA beside PWCCA</h2>")
    if pair:
        parts += ["<p class='note'>As in Figures 1 and 2 of Ding, Denain &amp; Steinhardt "
                  "(2021): the same model pair under both metrics.</p>",
                  _figure_html(comparison_figure(ds, pair, scale), "comparison")]
    else:
        parts.append("<p class='note'>Needs linear_cka (or linear_cka_debiased) and pwcca "
                     f"among the metrics; these results have {html.escape(', '.join(names))}."
                     "</p>")
    found = rp.series(ds)
    if found:
        parts += [f"<h2>Trends over the {found.noun}s</h2><p class='note'>In order: "
                  f"{html.escape(', '.join(found.models))}.</p>",
                  _figure_html(trends_figure(ds, names, found), "trends")]
    if tables:
        parts.append(f"<h2>Grounding</h2><p class='note'>Tables of "
                     f"<code>repscope ground</code> from {html.escape(str(ground))} "
                     "(docs/grounding.md).</p>")
        parts += [_table_html(t) for t in tables]
    meta = html.escape(json.dumps({"metrics": names, "pairs": [list(p) for p in _pairs(ds)]}))
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>repscope report: {html.escape(source)}</title>"
            f"<meta name='repscope-report' content='{meta}'>"
            f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def write_html(ds, out_dir: str | Path, *, metric: str | None = None, scale: str = "natural",
               ground: str | Path | None = None, source: str = "") -> Path:
    """Write `out_dir/report.html` (render_html); refuses to replace a report.html that
    repscope did not write (report_files). Returns its path."""
    page = render_html(ds, metric=metric, scale=scale, ground=ground, source=source)
    path = Path(out_dir) / HTML_NAME
    ReportFolder(out_dir).claim([path])
    tmp = path.with_name(f".{HTML_NAME}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
