"""`show`, `show --json` and the PNG report: bounds, natural colour ranges, values in cells,
trend plots, collision-free file names, the CLI's help texts."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import xarray as xr

from repscope.errors import ConflictError
from repscope.jobs import report as rp
from repscope.jobs.cli import build_parser, main
from repscope.jobs.report_files import MANIFEST, file_stems
from repscope.jobs.results import build_results, open_results, to_dataset
from tests.jobs.reportdata import METRICS, MODELS, bootstrap_results, nightly_results, shared


@pytest.fixture(scope="module")
def boot(tmp_path_factory, embedded_ray):
    """A real `repscope run` with a bootstrap: 3 models x 3 layers, bounds for every metric."""
    return shared(tmp_path_factory, bootstrap_results)


def units_of(models: dict) -> list[str]:
    return [f"{m}/layer{i + 1}" for m, widths in models.items() for i in range(len(widths))]


def test_show_text_prints_each_value_with_its_bounds(boot, capsys):
    assert main(["show", str(boot), "--metric", "linear_cka"]) == 0
    text = capsys.readouterr().out
    ds = xr.open_zarr(boot)
    assert "90% row-shard bootstrap interval" in text
    # the block "c (rows) vs c (columns)": 3 rows of 3 cells "v [lo, hi]"
    lines = text.split("c (rows) vs c (columns)")[1].splitlines()[2:5]
    cells = [re.findall(r"(-?\d+\.\d+) \[(-?\d+\.\d+), (-?\d+\.\d+)\]", line) for line in lines]
    assert [len(row) for row in cells] == [3, 3, 3]
    got = np.array(cells, dtype=float)  # (3, 3, [value, lower, upper])
    for k, name in enumerate(("linear_cka", "linear_cka_lower", "linear_cka_upper")):
        np.testing.assert_allclose(got[..., k], ds[name].values[6:, 6:], atol=5e-5)
    off = ~np.eye(3, dtype=bool)
    assert (got[..., 2][off] > got[..., 1][off]).all()  # real intervals


def test_show_json_has_bounds_fields(boot, capsys):
    assert main(["show", str(boot), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    ds = xr.open_zarr(boot)
    assert shown["units"] == units_of(MODELS)
    assert set(shown["metrics"]) == set(METRICS)  # bounds are fields, not metrics
    for m in METRICS:
        entry = shown["metrics"][m]
        assert entry["confidence_level"] == 0.9
        assert entry["interval_method"] == "row-shard bootstrap"
        for key, var in (("values", m), ("lower", f"{m}_lower"), ("upper", f"{m}_upper")):
            np.testing.assert_array_equal(np.array(entry[key], dtype=float), ds[var].values)


def small_ds(spread: tuple[float, float], with_bounds: bool = True, models=("p", "q")):
    """Two models x 3 layers: linear_cka uniform in `spread`, procrustes 2 - 2 cka."""
    units = [(m, f"l{i}") for m in models for i in range(3)]
    rng = np.random.default_rng(0)
    cka = rng.uniform(*spread, size=(len(units),) * 2)
    mats = {"linear_cka": cka, "procrustes": 2 - 2 * cka}
    bounds = {k: (v - 0.01, v + 0.02) for k, v in mats.items()} if with_bounds else None
    return to_dataset(build_results(
        mats, units, {"linear_cka": "similarity", "procrustes": "distance"}, {},
        bounds=bounds))


def test_heatmaps_use_natural_ranges_and_write_values(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, high = small_ds((0.03, 0.12)), small_ds((0.80, 0.93))
    fig, ax = plt.subplots()
    for ds in (low, high):
        image = rp.heatmap(ax, ds, "linear_cka", "p", "q")
        assert (image.norm.vmin, image.norm.vmax) == (0.0, 1.0)
        ax.clear()
    image = rp.heatmap(ax, low, "procrustes", "p", "q")
    assert (image.norm.vmin, image.norm.vmax) == (0.0, 2.0)
    ax.clear()
    image = rp.heatmap(ax, low, "linear_cka", "p", "q", scale="auto")
    block = rp.block(low, "linear_cka", "p", "q")[2]
    assert (image.norm.vmin, image.norm.vmax) == (block.min(), block.max())
    # each of the 3 x 3 cells holds "value\n[lower, upper]", as the store has them
    texts = sorted(t.get_position() + (t.get_text(),) for t in ax.texts)
    assert len(texts) == 9
    lower, upper = (rp.block(low, f"linear_cka_{s}", "p", "q")[2] for s in ("lower", "upper"))
    for x, y, text in texts:
        i, j = int(y), int(x)
        assert text == f"{block[i, j]:.2f}\n[{lower[i, j]:.2f}, {upper[i, j]:.2f}]"
    ax.clear()
    rp.heatmap(ax, small_ds((0.1, 0.2), with_bounds=False), "linear_cka", "p", "q")
    assert all("\n" not in t.get_text() for t in ax.texts) and len(ax.texts) == 9
    plt.close(fig)


def test_report_draws_bounds_and_scales(boot, tmp_path):
    ds = open_results(str(boot))
    files = rp.write_report(ds, tmp_path / "rep", "linear_cka")
    one = next(f for f in files if f.name == "linear_cka__c__vs__c.png")
    both = next(f for f in files if f.name == "c__vs__c.png")
    import matplotlib.image

    # the per-metric file has a second panel (interval widths): wider than the pair's one
    assert matplotlib.image.imread(one).shape[1] > 1.6 * matplotlib.image.imread(both).shape[1]
    with pytest.raises(Exception, match="--scale"):
        rp.write_report(ds, tmp_path / "rep2", scale="loud")
    assert main(["report", str(boot), "--out", str(tmp_path / "auto"), "--html",
                 "--scale", "auto"]) == 0
    assert "each heatmap on the range of its own values" in (tmp_path / "auto" / "report.html"
                                                       ).read_text()


def test_file_names_are_distinct_for_names_a_file_name_cannot_keep(boot, tmp_path):
    ds = open_results(str(boot))
    out = tmp_path / "rep"
    files = rp.write_report(ds, out, "pwcca")
    pairs = len(MODELS) * (len(MODELS) + 1) // 2
    assert len(files) == pairs * 2  # no trends: these models are no series
    assert len(set(files)) == len(files)
    on_disk = sorted(p.name for p in out.glob("*.png"))
    assert on_disk == sorted(f.name for f in files)  # none overwritten by another
    hashed = file_stems(["a b"])["a b"]
    assert re.fullmatch(r"a_b-[0-9a-f]{8}", hashed)
    assert f"{hashed}__vs__a_b.png" in on_disk and "a_b__vs__a_b.png" in on_disk
    assert "c__vs__c.png" in on_disk  # safe names are kept as they are
    # names equal but for case would be one file on macOS: both get a hash
    stems = file_stems(["Seed", "seed", "x y/z", "ok-1.0"])
    assert len({s.lower() for s in stems.values()}) == 4 and stems["ok-1.0"] == "ok-1.0"
    assert all("__" not in s and "/" not in s for s in stems.values())


def test_report_never_replaces_a_file_it_did_not_write(boot, tmp_path, capsys):
    out = tmp_path / "rep"
    out.mkdir()
    mine = out / "c__vs__c.png"
    mine.write_bytes(b"a user's own picture")
    assert main(["report", str(boot), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "c__vs__c.png" in err and "not written by repscope" in err and err.count("\n") == 1
    assert mine.read_bytes() == b"a user's own picture"
    assert sorted(p.name for p in out.iterdir()) == ["c__vs__c.png"]  # nothing written
    mine.unlink()
    assert main(["report", str(boot), "--out", str(out), "--metric", "linear_cka"]) == 0
    before = (out / "report.html").stat().st_mtime_ns
    assert main(["report", str(boot), "--out", str(out), "--html"]) == 0  # replaces its own
    assert (out / "report.html").stat().st_mtime_ns > before
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.html").write_text("a user's page")
    assert main(["report", str(boot), "--out", str(other)]) == 1  # before any PNG is drawn
    assert sorted(p.name for p in other.iterdir()) == ["report.html"]
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert "c__vs__c.png" in listed and "report.html" in listed
    with pytest.raises(ConflictError, match="share a name"):
        rp.ReportFolder(out).claim([out / "x.png", out / "X.png"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, embedded_ray):
    """A real nightly run over checkpoints named out of numeric order in the store."""
    return shared(tmp_path_factory, nightly_results)


def test_series_rule():
    def named(*names, nightly=False):
        units = [(m, "l") for m in names]
        eye = np.eye(len(units))
        return to_dataset(build_results({"linear_cka": eye}, units,
                                        {"linear_cka": "similarity"},
                                        {"kind": "nightly" if nightly else "run"},
                                        keys=[str(k) for k in range(len(units))]))

    found = rp.series(named("ckpt0", "ckpt10", "ckpt2"))
    assert found.models == ["ckpt0", "ckpt2", "ckpt10"] and found.noun == "checkpoint"
    assert rp.series(named("run-step100", "run-step200", "run-step300")).noun == "checkpoint"
    assert rp.series(named("mlp-seed0", "mlp-seed1", "mlp-seed2")) is None  # seeds: no order
    nightly = rp.series(named("mlp-seed0", "mlp-seed1", "mlp-seed2", nightly=True))
    assert nightly.noun == "model" and nightly.models == ["mlp-seed0", "mlp-seed1", "mlp-seed2"]
    assert rp.series(named("ckpt0", "ckpt1", nightly=True)) is None  # two: no trend


def test_trend_legend_sits_outside_the_axes(checkpoints, tmp_path):
    # tests/jobs/test_nightly.py writes the trend PNG
    import matplotlib

    matplotlib.use("Agg")
    ds = open_results(str(checkpoints))
    found = rp.series(ds)
    assert found.models == ["ckpt0", "ckpt2", "ckpt10"]
    fig = rp.trend_figure(ds, "linear_cka", found)
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent(renderer))
        assert ax.get_xlabel() == "checkpoint"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["ckpt2", "ckpt10"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["layer1", "layer2", "layer3"]
    # the trend follows the checkpoints' numbers: ckpt10's value to ckpt2, not to ckpt0
    series = rp.trends(ds, "linear_cka")
    keys = list(zip(ds["model_x"].values, ds["layer_x"].values, strict=True))
    i10, i2 = keys.index(("ckpt10", "layer1")), keys.index(("ckpt2", "layer1"))
    assert series["previous"]["layer1"][1] == pytest.approx(ds["linear_cka"].values[i10, i2])
    planned = rp.plan_report(ds, tmp_path, ["linear_cka"])
    assert planned[-1].path == tmp_path / "trend__linear_cka.png"


def test_nightly_over_seeds_says_model():
    import matplotlib

    matplotlib.use("Agg")
    units = [(m, layer) for m in ("seed1", "seed2", "seed3") for layer in ("l1", "l2")]
    ds = to_dataset(build_results({"pwcca": np.eye(6)}, units, {"pwcca": "similarity"},
                                  {"kind": "nightly"}, keys=[f"key{k}" for k in range(6)]))
    fig = rp.trend_figure(ds, "pwcca", rp.series(ds))
    assert {ax.get_xlabel() for ax in fig.axes} == {"model"}
    assert "previous model" in fig.axes[0].get_title()


def test_show_and_report_refuse_an_activation_store(tmp_path, capsys):
    from tests.jobs.conftest import make_store

    acts = tmp_path / "acts.zarr"
    make_store(str(acts), {"a": [3]}, rows=20)
    for command in (["show", str(acts)], ["report", str(acts), "--out", str(tmp_path / "r")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "not a results store" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def _subparser(name: str):
    parser = build_parser()
    return next(a for a in parser._subparsers._group_actions).choices[name]


def test_cli_help_texts():
    assert "Run a job spec" in (_subparser("run").description or "")
    for command, dest in (("submit", "overwrite"), ("show", "json")):
        action = next(a for a in _subparser(command)._actions if a.dest == dest)
        assert action.help and len(action.help) > 20, (command, dest)
    report = {a.dest: a for a in _subparser("report")._actions}
    assert {"scale", "png", "html", "ground"} <= set(report)
    assert all(report[d].help for d in ("scale", "png", "html", "ground"))
