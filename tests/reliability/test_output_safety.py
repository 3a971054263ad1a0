"""repscope replaces or deletes only what it can prove it wrote: anything else at `output`
is refused with exit 2 before any work, --overwrite included, and left exactly as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from repscope.errors import InputError
from repscope.jobs.cli import main
from repscope.jobs.outputs import check_output_safe
from repscope.jobs.results import build_results, open_results, to_dataset, write_results
from tests.jobs.conftest import make_store
from tests.reliability.snapshots import snapshot


def results(value: float = 1.0):
    units = [("m", "l1"), ("m", "l2")]
    return to_dataset(build_results({"linear_cka": np.full((2, 2), value)}, units,
                                    {"linear_cka": "similarity"}, {"spec_identity": "x"}))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety-store")
    make_store(str(root / "acts.zarr"), {"a": [4, 3]}, rows=120)
    return root / "acts.zarr"


def _folder(tmp):
    (tmp / "mydata").mkdir()
    (tmp / "mydata" / "notes.txt").write_text("precious")
    return "mydata", "existing folder that is not a results store (it holds 1 entry: 'notes.txt')"


def _file(tmp):
    (tmp / "report.pdf").write_bytes(b"precious")
    return "report.pdf", "is an existing file, not a results store"


def _the_store(tmp):
    return "acts.zarr", "activation store"


def _working_folder(tmp):
    return ".", "is the working folder"


def _above_working_folder(tmp):
    return "..", "holds the working folder"


def _inside_store(tmp):
    return "acts.zarr/units/r.zarr", "lies inside the activation store acts.zarr"


def _holds_store(tmp):
    return "work", "contains the activation store work/acts.zarr"


def _results_with_foreign_file(tmp):
    write_results(results(), str(tmp / "r.zarr"))
    (tmp / "r.zarr" / "my-notes.txt").write_text("precious")
    return "r.zarr", "also holds entries repscope did not write ('my-notes.txt')"


def _zarr_of_another_tool(tmp):
    xr.Dataset({"v": ("x", np.arange(3.0))}).to_zarr(tmp / "other.zarr", zarr_format=3,
                                                            consolidated=False)
    return "other.zarr", "is a Zarr store that repscope did not write"


def _below_a_file(tmp):
    (tmp / "plain.txt").write_text("precious")
    return "plain.txt/r.zarr", "plain.txt is a file, not a folder"


def _name_too_long(tmp):
    return "r" * 245 + ".zarr", "bytes; file systems allow 255"


def _foreign_state(tmp):
    (tmp / "r.zarr.state").mkdir()
    (tmp / "r.zarr.state" / "mine.csv").write_text("precious")
    return "r.zarr", "r.zarr.state exists and is not repscope's state folder"


def _unsupported_scheme(tmp):
    return "ftp://host/r.zarr", "unsupported output URL ftp://host/r.zarr"


CASES = [_folder, _file, _the_store, _working_folder, _above_working_folder, _inside_store,
         _holds_store, _results_with_foreign_file, _zarr_of_another_tool, _below_a_file,
         _name_too_long, _foreign_state, _unsupported_scheme]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_run_refuses_what_it_did_not_write(tmp_path, store, monkeypatch, capsys, embedded_ray,
                                           case, overwrite):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    shutil.copytree(store, work / "acts.zarr")
    output, message = case(work)
    if case is _holds_store:
        monkeypatch.chdir(tmp_path)
        (work / "job.yaml").write_text(f"store: work/acts.zarr\noutput: {output}\n"
                                       "metrics: [linear_cka]\n")
        spec = "work/job.yaml"
    else:
        (work / "job.yaml").write_text(f"store: acts.zarr\noutput: {output}\n"
                                       "metrics: [linear_cka]\n")
        spec = "job.yaml"
    before = snapshot(tmp_path)
    code = main(["run", spec] + (["--overwrite"] if overwrite else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("repscope run: error: ")
    assert message in err[0]
    assert snapshot(tmp_path) == before  # nothing moved, replaced, created or deleted


def test_check_names_the_store_when_it_knows_it(tmp_path, store):
    s = str(store)
    for output, message in ((s, "is the job's activation store"),
                            (f"{s}/new.zarr", "lies inside the activation store"),
                            (str(store.parent), "contains the activation store")):
        with pytest.raises(InputError, match=message):
            check_output_safe(output, s)
    for output, message in (("s3://b/acts.zarr", "is the job's activation store"),
                            ("s3a://b/acts.zarr/r.zarr", "lies inside the activation store"),
                            ("s3://b", "contains the activation store")):
        with pytest.raises(InputError, match=message):
            check_output_safe(output, "s3://user:pw@b/acts.zarr/")


def test_what_repscope_may_write_is_accepted(tmp_path):
    check_output_safe(str(tmp_path / "new" / "deeper" / "r.zarr"))  # created when written
    (tmp_path / "empty").mkdir()
    check_output_safe(str(tmp_path / "empty"))
    write_results(results(1.0), str(tmp_path / "empty"))  # an empty folder holds nothing
    check_output_safe(str(tmp_path / "empty"))
    write_results(results(2.0), str(tmp_path / "empty"))
    assert float(open_results(str(tmp_path / "empty"))["linear_cka"][0, 0]) == 2.0


def test_write_results_itself_refuses(tmp_path):
    """The last guard, for Python callers that skip the pre-flight check."""
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "notes.txt").write_text("precious")
    (tmp_path / "file.bin").write_bytes(b"precious")
    before = snapshot(tmp_path)
    for name in ("mydata", "file.bin"):
        with pytest.raises(InputError, match="repscope replaces only results stores"):
            write_results(results(), str(tmp_path / name))
    assert snapshot(tmp_path) == before


def test_object_store_outputs_are_checked_too(s3_server):
    import fsspec

    options = s3_server.storage_options
    fs = fsspec.filesystem("s3", **options)
    prefix = s3_server.url("theirs")
    fs.pipe(f"{prefix[5:]}/data.csv", b"precious")
    single = s3_server.url("single.bin")
    fs.pipe(single[5:], b"precious")
    with pytest.raises(InputError, match="existing folder that is not a results store"):
        check_output_safe(prefix, None, options)
    with pytest.raises(InputError, match="existing folder"):
        write_results(results(), prefix, options)
    with pytest.raises(InputError, match="is an existing file"):
        check_output_safe(single, None, options)
    assert fs.cat(f"{prefix[5:]}/data.csv") == b"precious" and fs.cat(single[5:]) == b"precious"
    ours = s3_server.url("ours.zarr")
    write_results(results(1.0), ours, options)
    check_output_safe(ours, None, options)
    write_results(results(2.0), ours, options)
    assert float(open_results(ours, options)["linear_cka"][0, 0]) == 2.0
