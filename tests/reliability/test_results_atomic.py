"""Results are replaced atomically, and one run at a time writes an output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading

import numpy as np
import pytest
import xarray as xr

from repscope.errors import ConflictError
from repscope.jobs.lock import output_lock
from repscope.jobs.pipeline import run_job
from repscope.jobs.results import build_results, open_results, to_dataset, write_results
from repscope.jobs.spec import parse_spec
from tests.jobs.conftest import make_store

UNITS = [("m", f"l{i}") for i in range(8)]


def dataset(value: float):
    mats = {name: np.full((8, 8), value) for name in ("linear_cka", "procrustes", "pwcca")}
    dirs = {"linear_cka": "similarity", "procrustes": "distance", "pwcca": "similarity"}
    return to_dataset(build_results(mats, UNITS, dirs, {"run": value}))


@pytest.mark.filterwarnings("ignore:Consolidated metadata")  # the raw read at the end
@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_reader_never_sees_a_mixture(tmp_path, monkeypatch, swap):
    import repscope.jobs.results

    if swap == "two renames":  # as on a system or file system without RENAME_EXCHANGE
        monkeypatch.setattr(repscope.jobs.results, "exchange", lambda a, b: False)
    out = str(tmp_path / "r.zarr")
    write_results(dataset(1.0), out)
    stop = threading.Event()
    seen, mixtures, errors = set(), [], []

    def writer():
        try:
            for k in range(30):
                write_results(dataset(float(k % 2 + 1)), out)
        finally:
            stop.set()

    def reader():
        while not stop.is_set():
            try:
                ds = open_results(out)
            except Exception as exc:  # noqa: BLE001 (any failure to read is one)
                errors.append(exc)
                continue
            values = {float(v) for n in ds.data_vars for v in np.unique(ds[n].values)}
            values.add(float(ds.attrs["run"]))
            seen.update(values)
            if len(values) != 1:
                mixtures.append(values)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not mixtures
    assert not errors
    assert seen == {1.0, 2.0}
    assert os.listdir(tmp_path) == ["r.zarr"]  # a plain folder, nothing hidden beside it
    assert not os.path.islink(out)
    assert float(xr.open_zarr(out).attrs["run"]) == 2.0


def test_second_writer_refuses_while_first_holds_the_output(tmp_path):
    store = tmp_path / "acts.zarr"
    make_store(str(store), {"m": [4, 3]}, rows=100)
    out = tmp_path / "r.zarr"
    spec = parse_spec(f"store: {store}\noutput: {out}\nmetrics: [linear_cka]\n")
    with output_lock(str(out)):
        with pytest.raises(ConflictError, match=r"being written by another run \(pid \d+"):
            run_job(spec)
    assert not out.exists()


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "r.zarr"
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / "r.zarr.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": 0}))
    with output_lock(str(out)):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_lock_on_s3(s3_server):
    out = s3_server.url("locked.zarr")
    options = s3_server.storage_options
    with output_lock(out, options):
        with pytest.raises(ConflictError, match="being written by another run"):
            with output_lock(out, options):
                pass
    with output_lock(out, options):  # released
        pass


def test_object_store_commit_is_journaled_and_rolls_forward(s3_server):
    options = s3_server.storage_options
    out = s3_server.url("journal.zarr")
    write_results(dataset(1.0), out, options)
    assert float(open_results(out, options).attrs["run"]) == 1.0

    # a writer that crashed after its commit point, half-way through copying into place:
    # the output holds a mixture, the staged copy the complete new result
    from repscope.jobs.results import _marker, _staging, to_zarr

    to_zarr(dataset(2.0), _staging(out), options)
    fs, marker = _marker(out, options)
    with fs.open(marker, "w") as f:
        f.write("committing")
    mixed = dataset(1.0)
    mixed["linear_cka"] = dataset(2.0)["linear_cka"]
    to_zarr(mixed, out, options)

    ds = open_results(out, options)  # reads the complete staged result, not the mixture
    values = {float(v) for n in ds.data_vars for v in np.unique(ds[n].values)}
    assert values == {2.0} and float(ds.attrs["run"]) == 2.0

    write_results(dataset(3.0), out, options)  # rolls forward, then commits its own
    ds = xr.open_zarr(out, storage_options=options)
    values = {float(v) for n in ds.data_vars for v in np.unique(ds[n].values)}
    assert values == {3.0}
    assert not fs.exists(marker) and not fs.exists(_staging(out).split("://", 1)[1])
