"""`repscope report --html` in a real headless Chromium (Debian's `chromium`, driven by
Playwright; Playwright never downloads a browser here): the page loads offline with no console
error and no request but its own file, every metric's heatmap draws, and hover and the
dropdowns work on the data of a real run, nightly run and ground output."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from repscope.jobs import report as rp
from repscope.jobs.cli import main
from repscope.jobs.report_html import HTML_NAME
from repscope.jobs.results import open_results
from tests.jobs.reportdata import (
    METRICS,
    bootstrap_results,
    ground_output,
    nightly_results,
    shared,
)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
#: The page embeds plotly.js (4.8 MB); the data of these small results add little.
MAX_BYTES = 5_500_000


def chromium_path() -> str:
    """The system Chromium; missing, the test says so by name (and fails under CI, whose
    .ci/run installs it)."""
    path = os.environ.get("REPSCOPE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        why = (f"chromium not found ({path}): the HTML report is tested in headless Chromium; "
               "install Debian's package `chromium` (apt-get install -y chromium; .ci/run does)")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, embedded_ray):
    """Reports of a bootstrap run with grounding tables, and of a nightly run."""
    root = tmp_path_factory.mktemp("html")
    boot = shared(tmp_path_factory, bootstrap_results)
    ground = ground_output(boot.parent)
    nightly = shared(tmp_path_factory, nightly_results)
    assert main(["report", str(boot), "--out", str(root / "rep"), "--html",
                 "--ground", str(ground)]) == 0
    assert main(["report", str(nightly), "--out", str(root / "nrep"), "--html"]) == 0
    return {"root": root, "boot": boot, "ground": ground, "nightly": nightly,
            "page": root / "rep" / HTML_NAME, "nightly_page": root / "nrep" / HTML_NAME}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=executable,
            headless=True, args=CHROMIUM_ARGS, viewport={"width": 1300, "height": 900})
        yield context
        context.close()


class Loaded:
    """A page opened from a file, with every console message, page error and request."""

    def __init__(self, context, path: Path):
        self.url = path.resolve().as_uri()
        self.messages, self.requests = [], []
        self.page = context.new_page()
        self.page.on("console", lambda m: self.messages.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.messages.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        # Anything but the file itself is refused (and recorded above), so a page that
        # needs the network shows it here instead of hanging.
        self.page.route("**/*", lambda route: route.continue_() if route.request.url == self.url
                        else route.abort())
        self.page.goto(self.url, wait_until="load")

    def js(self, expression: str, arg=None):
        return self.page.evaluate(expression, arg)

    def choose(self, div: str, menu: int, label: str) -> None:
        """Open dropdown `menu` of figure `div` and click the entry `label`, as a user does."""
        self.page.locator(f"#{div} .updatemenu-header-group").nth(menu).click()
        buttons = self.page.locator(f"#{div} .updatemenu-dropdown-button")
        buttons.filter(has_text=label).first.click()

    def hover(self, div: str, row: int, col: int, axis: str = "") -> list[str]:
        """Move the mouse to cell (row, col) of a heatmap; the hover label's lines."""
        x, y = self.js("""([div, axis, row, col]) => {
            const gd = document.getElementById(div), L = gd._fullLayout;
            const r = gd.getBoundingClientRect();
            const xa = L['xaxis' + axis], ya = L['yaxis' + axis];
            return [r.left + xa._offset + xa.l2p(col), r.top + ya._offset + ya.l2p(row)]; }""",
                       [div, axis, row, col])
        self.page.mouse.move(x, y)
        self.page.wait_for_selector(f"#{div} .hoverlayer .hovertext")
        return self.js(f"""Array.from(document.querySelectorAll(
            '#{div} .hoverlayer .hovertext tspan.line')).map(t => t.textContent)""")

    def traces(self, div: str) -> list[dict]:
        return self.js(f"""document.getElementById('{div}').data.map(t => ({{name: t.name,
            visible: t.visible, z: t.z, x: t.x, y: t.y}}))""")


@pytest.fixture
def page(browser, built):
    loaded = Loaded(browser, built["page"])
    yield loaded
    loaded.page.close()


def block(ds, metric, a, b):
    return np.round(rp.block(ds, metric, a, b)[2], 5)


def test_page_loads_offline_with_every_metric_drawn(page, built):
    size = built["page"].stat().st_size
    assert 4_000_000 < size < MAX_BYTES  # plotly.js is in the page, and little else
    assert page.messages == []
    assert page.requests == [page.url]
    ds = open_results(str(built["boot"]))
    traces = page.traces("heatmaps")
    assert [t["name"] for t in traces] == METRICS
    for t in traces:  # the first pair of different models, for every metric
        np.testing.assert_allclose(np.array(t["z"], dtype=float),
                                   block(ds, t["name"], "a b", "a_b"), atol=1e-9)
    for metric in reversed(METRICS):
        page.choose("heatmaps", 0, metric)
        assert [t["name"] for t in page.traces("heatmaps") if t["visible"] is True] == [metric]
        assert page.page.locator("#heatmaps .hm image").count() == 1  # the heatmap is drawn
        assert page.page.locator("#heatmaps .cbtitle").all_text_contents() == [metric]
    assert page.messages == [] and page.requests == [page.url]


def test_hover_shows_both_units_value_and_bounds(page, built):
    ds = open_results(str(built["boot"]))
    lines = page.hover("heatmaps", row=1, col=2)
    v, lo, hi = (rp.block(ds, name, "a b", "a_b")[2][1, 2]
                 for name in ("linear_cka", "linear_cka_lower", "linear_cka_upper"))
    assert lines == ["a b / layer2 (row)", "a_b / layer3 (column)",
                     f"linear_cka = {v:.4f} [{lo:.4f}, {hi:.4f}] "
                     "(90% row-shard bootstrap interval)"]


def test_pair_selector_sets_every_metric(page, built):
    ds = open_results(str(built["boot"]))
    page.choose("heatmaps", 1, "a_b vs c")
    for t in page.traces("heatmaps"):
        np.testing.assert_allclose(np.array(t["z"], dtype=float),
                                   block(ds, t["name"], "a_b", "c"), atol=1e-9)
    assert page.js("document.getElementById('heatmaps').layout.xaxis.title.text") == \
        "c layer (columns)"
    page.choose("heatmaps", 0, "procrustes")
    assert page.hover("heatmaps", row=0, col=0)[:2] == ["a_b / layer1 (row)",
                                                         "c / layer1 (column)"]
    assert page.messages == []


def test_cka_beside_pwcca_and_grounding_tables(page, built):
    ds = open_results(str(built["boot"]))
    traces = page.traces("comparison")
    assert [t["name"] for t in traces] == ["linear_cka", "pwcca"]
    assert page.page.locator("#comparison .hm image").count() == 2  # side by side
    page.choose("comparison", 0, "a b vs c")
    for t in page.traces("comparison"):
        np.testing.assert_allclose(np.array(t["z"], dtype=float),
                                   block(ds, t["name"], "a b", "c"), atol=1e-9)
    assert page.hover("comparison", 0, 1, axis="2")[-1].startswith("pwcca = ")
    for name in ("rank", "specificity", "probes"):
        with (built["ground"] / f"{name}.csv").open() as f:
            rows = list(csv.reader(f))
        shown = page.js(f"document.querySelectorAll('#ground-{name} tbody tr').length")
        header = page.js(f"""Array.from(document.querySelectorAll('#ground-{name} th'))
            .map(t => t.textContent)""")
        assert header == rows[0] and shown == min(len(rows) - 1, 500) and shown > 0
    assert page.js("document.getElementById('trends')") is None  # these models: no series
    assert page.messages == [] and page.requests == [page.url]


def test_nightly_trends_with_the_legend_outside(browser, built):
    loaded = Loaded(browser, built["nightly_page"])
    try:
        assert loaded.messages == [] and loaded.requests == [loaded.url]
        traces = loaded.traces("trends")
        assert len(traces) == len(METRICS) * 2 * 3  # metric x (previous, first) x layer
        visible = [t for t in traces if t["visible"] is True]
        # in the checkpoints' order, not the store's (ckpt0, ckpt10, ckpt2)
        assert len(visible) == 6 and all(t["x"] == ["ckpt2", "ckpt10"] for t in visible)
        ds = open_results(str(built["nightly"]))
        series = rp.trends(ds, "linear_cka")
        np.testing.assert_allclose([t["y"] for t in visible[:3]],
                                   list(series["previous"].values()), atol=1e-12)
        loaded.choose("trends", 0, "procrustes")
        assert sum(t["visible"] is True for t in loaded.traces("trends")) == 6
        boxes = loaded.js("""() => {
            const box = e => { const r = e.getBoundingClientRect();
                               return [r.left, r.top, r.right, r.bottom]; };
            const gd = document.getElementById('trends');
            return {legend: box(gd.querySelector('.legend')),
                    plots: Array.from(gd.querySelectorAll('.nsewdrag')).map(box)}; }""")
        lx0, ly0, lx1, ly1 = boxes["legend"]
        assert len(boxes["plots"]) == 2
        for x0, y0, x1, y1 in boxes["plots"]:
            assert lx0 >= x1 or lx1 <= x0 or ly0 >= y1 or ly1 <= y0  # no overlap
        titles = loaded.js("""Array.from(document.querySelectorAll(
            '#trends .xtitle, #trends .x2title')).map(t => t.textContent)""")
        assert titles == ["checkpoint", "checkpoint"]
        assert loaded.messages == []
    finally:
        loaded.page.close()


def test_report_options_refused_before_any_work(built, tmp_path, capsys):
    out = tmp_path / "rep"
    args = ["report", str(built["boot"]), "--out", str(out)]
    assert main([*args, "--ground", str(tmp_path / "nowhere")]) == 2
    assert "--ground" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--png", "--ground", str(built["ground"])]) == 2
    assert "HTML" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--html", "--metric", "pwcca"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".repscope-report.json", HTML_NAME]
    assert "CKA beside PWCCA" in (out / HTML_NAME).read_text()
