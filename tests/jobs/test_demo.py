"""`make demo` end to end: store, job, results and the side-by-side heatmap."""

from __future__ import annotations

import numpy as np
import xarray as xr

from repscope.jobs.demo import main


def test_demo_writes_results_and_heatmaps(demo_output):
    tmp_path = demo_output
    out = (demo_output / "printed.txt").read_text()
    assert "mlp-seed0__vs__mlp-seed1.png" in out
    ds = xr.open_zarr(tmp_path / "results.zarr")
    assert set(ds.data_vars) == {"linear_cka", "pwcca", "procrustes"}
    assert ds.sizes["x"] == 12  # 3 models x 4 hidden layers
    png = tmp_path / "report" / "mlp-seed0__vs__mlp-seed1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # models that differ only in seed: a layer is most similar to the same layer of the
    # other seed more often than not (the seed paper's diagonal)
    cka = ds["linear_cka"].values[:4, 4:8]
    assert (np.argmax(cka, axis=1) == np.arange(4)).sum() >= 3
    assert (tmp_path / "report" / "report.html").stat().st_size > 1 << 20  # plotly inside
    assert (tmp_path / "scores.csv").read_text().startswith("model,score\nmlp-seed0,")


def test_demo_runs_again_on_its_own_output(demo_output, tmp_path, capsys):
    """A second `make demo` replaces its own store (not a user's) and succeeds."""
    import shutil

    shutil.copytree(demo_output, tmp_path, dirs_exist_ok=True)
    assert main(["--out", str(tmp_path)]) == 0
    capsys.readouterr()
    (tmp_path / "acts.zarr").rename(tmp_path / "mine")
    (tmp_path / "acts.zarr").mkdir()
    (tmp_path / "acts.zarr" / "notes.txt").write_text("a user's file")
    from repscope.errors import InputError

    try:
        main(["--out", str(tmp_path)])
    except InputError as exc:
        assert "not the demo's store" in str(exc)
    else:
        raise AssertionError("the demo replaced a folder it did not write")
    assert (tmp_path / "acts.zarr" / "notes.txt").read_text() == "a user's file"
