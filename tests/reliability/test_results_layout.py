"""A local results store is a plain folder: `cp -r` copies a complete, readable store and
`rm -r` leaves nothing behind. What a killed write leaves is finished or removed by the next
run, and repscope 0.2's layout (a link into a hidden versions folder) is replaced by it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from repscope.jobs.lock import output_lock
from repscope.jobs.outputs import TEMP_OWNER, clean_leftovers
from repscope.jobs.results import build_results, open_results, to_dataset, to_zarr, write_results

UNITS = [("m", "l1"), ("m", "l2"), ("n", "l1")]


def result(value: float):
    return build_results({"linear_cka": np.full((3, 3), value)}, UNITS,
                         {"linear_cka": "similarity"}, {"run": value, "spec_identity": "s"})


def value(url: str) -> float:
    return float(open_results(url).attrs["run"])


def test_cp_and_rm_work_as_on_any_folder(tmp_path):
    out = tmp_path / "runs" / "r.zarr"
    write_results(result(1.0), str(out))
    write_results(result(2.0), str(out))
    assert out.is_dir() and not out.is_symlink()
    assert os.listdir(out.parent) == ["r.zarr"]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["cp", "-r", str(out), str(elsewhere)], check=True)
    copy = xr.open_zarr(elsewhere / "r.zarr")
    assert float(copy.attrs["run"]) == 2.0
    np.testing.assert_array_equal(copy["linear_cka"].values, np.full((3, 3), 2.0))
    assert value(str(elsewhere / "r.zarr")) == 2.0
    assert list(copy["model_x"].values) == ["m", "m", "n"]

    subprocess.run(["rm", "-r", str(out)], check=True)
    assert os.listdir(out.parent) == []  # no versions, links or state left behind


def test_a_finished_run_leaves_only_its_output(tmp_path):
    """The state folder holds checkpoints while a run works; once they are removed (the
    run's last step) the emptied folders go too."""
    from repscope.cluster.moments import UnitMoments
    from repscope.jobs.state import StateStore

    out = str(tmp_path / "r.zarr")
    state = StateStore(out)
    unit = UnitMoments(n=3, mean=np.zeros(2), cxx=np.eye(2), sum_a2=None)
    state.put("tiles", "k1", unit)
    state.put("caches", "k2", unit)
    write_results(result(1.0), out)
    state.remove("tiles", ["k1"])
    assert (tmp_path / "r.zarr.state" / "caches").is_dir()
    state.remove("caches", ["k2"])
    assert sorted(os.listdir(tmp_path)) == ["r.zarr"]


def test_a_users_link_is_kept_and_written_through(tmp_path):
    (tmp_path / "big-disk").mkdir()
    target = tmp_path / "big-disk" / "r.zarr"
    write_results(result(1.0), str(target))
    link = tmp_path / "r.zarr"
    link.symlink_to(target)
    write_results(result(2.0), str(link))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert value(str(target)) == 2.0 and value(str(link)) == 2.0
    assert os.listdir(target.parent) == ["r.zarr"]


def _temp(parent: Path, name: str, token: str, complete: bool) -> Path:
    temp = parent / f".{name}.repscope-{token}"
    temp.mkdir()
    (temp / "owner.json").write_text(json.dumps(
        {"repscope": TEMP_OWNER, "output": name, "pid": 1, "complete": complete}))
    return temp


def test_a_write_killed_before_its_swap_is_removed(tmp_path, capsys):
    out = tmp_path / "r.zarr"
    write_results(result(1.0), str(out))
    temp = _temp(tmp_path, "r.zarr", "0123abcd", complete=False)
    to_zarr(result(9.0), str(temp / "data"), None)  # half a write, as far as anyone knows
    # look-alikes repscope cannot prove it wrote are kept
    (tmp_path / ".r.zarr.repscope-ffffffff").mkdir()
    (tmp_path / ".r.zarr.repscope-ffffffff" / "mine.txt").write_text("precious")
    with output_lock(str(out)):
        pass
    assert "cleanup: removed or finished 1 leftover(s)" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == [".r.zarr.repscope-ffffffff", "r.zarr"]
    assert value(str(out)) == 1.0


@pytest.mark.parametrize("complete", [True, False])
def test_a_swap_killed_between_its_two_renames_is_finished(tmp_path, complete):
    """Without RENAME_EXCHANGE a swap is two renames; killed between them there is no
    output: the complete new result is moved into place, else the previous one."""
    out = tmp_path / "r.zarr"
    write_results(result(1.0), str(out))
    temp = _temp(tmp_path, "r.zarr", "0123abcd", complete=complete)
    to_zarr(result(2.0), str(temp / "data"), None)
    os.rename(out, temp / "old")
    clean_leftovers(str(out))
    assert os.listdir(tmp_path) == ["r.zarr"]
    assert value(str(out)) == (2.0 if complete else 1.0)


def _legacy_layout(tmp_path: Path, value_: float) -> Path:
    """What repscope 0.2 wrote: r.zarr -> .r.zarr.versions/<version>/ (no write id)."""
    versions = tmp_path / ".r.zarr.versions"
    versions.mkdir()
    for k, v in enumerate((value_ - 1, value_)):
        # written by xarray itself, as 0.2 did
        to_dataset(result(v)).to_zarr(versions / f"2025010{k}T000000-abcd000{k}", mode="w",
                                      zarr_format=3, consolidated=True)
    out = tmp_path / "r.zarr"
    out.symlink_to(".r.zarr.versions/20250101T000000-abcd0001")
    return out


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_the_0_2_layout_is_read_and_replaced_by_a_plain_folder(tmp_path):
    out = _legacy_layout(tmp_path, 5.0)
    assert value(str(out)) == 5.0
    (tmp_path / ".r.zarr.versions" / "keep-me.txt").write_text("not repscope's")
    write_results(result(6.0), str(out))
    assert out.is_dir() and not out.is_symlink() and value(str(out)) == 6.0
    # the old versions are gone; what repscope cannot prove it wrote stays
    assert os.listdir(tmp_path / ".r.zarr.versions") == ["keep-me.txt"]


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_the_0_2_versions_of_a_replaced_output_are_cleaned_by_the_next_run(tmp_path):
    out = _legacy_layout(tmp_path, 5.0)
    out.unlink()  # e.g. the user removed the link, then reruns
    with output_lock(str(out)):
        pass
    assert os.listdir(tmp_path) == []


def test_object_store_leftovers_are_finished_or_removed_by_the_next_run(s3_server, capsys):
    import fsspec

    from repscope.jobs.results import _marker, _staging

    options = s3_server.storage_options
    fs = fsspec.filesystem("s3", **options)
    for committed in (True, False):
        out = s3_server.url()
        write_results(result(1.0), out, options)
        to_zarr(result(2.0), _staging(out), options)  # a writer killed after step 1 ...
        if committed:  # ... or after its commit point
            with fs.open(_marker(out, options)[1], "w") as f:
                f.write("committing")
        with output_lock(out, options):
            pass
        assert "cleanup: removed or finished 1 leftover(s)" in capsys.readouterr().err
        assert not fs.exists(_staging(out)[5:]) and not fs.exists(_marker(out, options)[1])
        assert float(open_results(out, options).attrs["run"]) == (2.0 if committed else 1.0)
