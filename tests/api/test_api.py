"""The Python API: ``import repscope`` gives the same values as the CLI, from any folder."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import repscope
from repscope.errors import InputError, NotFoundError
from repscope.jobs.cli import main
from tests.jobs.conftest import make_store

METRICS = ["linear_cka", "pwcca", "procrustes"]


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("api") / "acts.zarr")
    make_store(url, {"a": [7, 5], "b": [7, 5], "c": [6]}, rows=500)
    return url


def test_compare_equals_the_cli(store_url, tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"store: {store_url}\noutput: {tmp_path / 'cli.zarr'}\n"
                    f"metrics: {METRICS}\ncompute: {{precision: float64}}\n")
    assert main(["run", str(spec)]) == 0
    capsys.readouterr()
    cli = repscope.open_results(str(tmp_path / "cli.zarr"))
    api = repscope.compare(store_url, metrics=METRICS, compute={"precision": "float64"})
    written = repscope.compare(store_url, metrics=METRICS, compute={"precision": "float64"},
                               output=str(tmp_path / "api.zarr"))
    for ds in (api, written):
        assert list(ds["model_x"].values) == list(cli["model_x"].values)
        for m in METRICS:
            np.testing.assert_array_equal(ds[m].values, cli[m].values)
    assert (tmp_path / "api.zarr").exists() and not (tmp_path / "unwritten.zarr").exists()


def test_results_select_by_model(store_url):
    ds = repscope.compare(store_url, metrics=["linear_cka"], layers={"a": ["layer1"],
                                                                      "c": ["layer1"]})
    assert list(ds["model_x"].values) == ["a", "c"]
    block = ds.where(ds.model_x == "a", drop=True)
    assert block["linear_cka"].shape == (1, 2)
    assert block["linear_cka"].values[0, 0] == pytest.approx(1.0)


def test_compare_accepts_rows_and_an_open_store(store_url):
    from repscope.store import ActivationStore

    store = ActivationStore.open(store_url)
    ds = repscope.compare(store, models=["b"], metrics="linear_cka", rows=(100, 300))
    assert ds.attrs["rows"] == [100, 300] and ds.sizes["x"] == 2
    with pytest.raises(NotFoundError, match="model 'z' is not in store"):
        repscope.compare(store, models=["z"])
    with pytest.raises(InputError, match="rows must be"):
        repscope.compare(store, rows="all")


def test_compare_arrays_and_missing_results(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5))
    values = repscope.compare_arrays(x, x @ rng.standard_normal((5, 5)), ["linear_cka"])
    assert set(values) == {"linear_cka"} and 0 < values["linear_cka"] <= 1
    with pytest.raises(NotFoundError, match="no results store"):
        repscope.open_results(str(tmp_path / "none.zarr"))
    with pytest.raises(AttributeError):
        repscope.no_such_name  # noqa: B018


def test_import_from_a_folder_with_its_own_store_cluster_jobs(store_url, tmp_path):
    """A user's folder (a notebook's working directory) holding packages named store,
    cluster and jobs must not shadow repscope, on the driver nor on Ray's workers (which
    import the task functions by module name)."""
    for name in ("store", "cluster", "jobs"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            f"raise ImportError('the user\\'s own {name} package was imported')\n")
    script = textwrap.dedent(f"""
        import repscope
        ds = repscope.compare({store_url!r}, metrics=["linear_cka"],
                              compute={{"executor": "ray", "precision": "float64"}})
        print(ds.attrs["kind"], ds.sizes["x"])
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["run", "5"]


def test_quiet_by_default_and_verbose_on_request(store_url, capsys):
    repscope.compare(store_url, metrics=["linear_cka"])
    assert capsys.readouterr().err == ""
    repscope.compare(store_url, metrics=["linear_cka"], verbose=True)
    assert "plan:" in capsys.readouterr().err
