"""The CLI's one error boundary, walked with a table of bad inputs: every command that fails
ends in ONE line naming the culprit, exit 2 for what the user gave and 1 for what the
machine did, never a traceback, no secret in it, and nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import repscope.jobs.commands
from repscope.jobs.cli import describe_error, main
from repscope.jobs.results import build_results, write_results
from tests.jobs.conftest import make_store
from tests.raycluster import free_port
from tests.reliability.snapshots import snapshot

REPSCOPE = str(Path(sys.executable).with_name("repscope"))
KEY, SECRET = "AKIAPLANTEDFAKEKEY42", "planted-secret-value-Zq81"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("boundary-store")
    make_store(str(root / "acts.zarr"), {"a": [4, 3]}, rows=120)
    return root / "acts.zarr"


def spec(tmp: Path, output: str = "r.zarr", extra: str = "", store: str = "acts.zarr",
         name: str = "job.yaml") -> str:
    (tmp / name).write_text(f"store: {store}\noutput: {output}\nmetrics: [linear_cka]\n{extra}")
    return name


def results_store(tmp: Path, name: str = "r.zarr") -> str:
    results = build_results({"linear_cka": np.eye(2)}, [("m", "a"), ("m", "b")],
                            {"linear_cka": "similarity"}, {"spec_identity": "{}"})
    write_results(results, str(tmp / name))
    return name


def s3_options(endpoint: str, secret: bool = True) -> list[str]:
    options = [f"--storage-option=key={KEY}",
               f"--storage-option=client_kwargs.endpoint_url={endpoint}"]
    return options + ([f"--storage-option=secret={SECRET}"] if secret else [])


@dataclass
class Case:
    id: str
    argv: Callable[[Path], list[str]]  # builds what it needs in the folder, returns argv
    code: int
    message: str  # a fragment of the one line


def _folder(t):
    (t / "mine").mkdir()
    (t / "mine" / "notes.txt").write_text("precious")
    return ["run", spec(t, "mine"), "--overwrite"]


def _file(t):
    (t / "out.txt").write_text("precious")
    return ["run", spec(t, "out.txt")]


def _below_file(t):
    (t / "plain").write_text("precious")
    return ["run", spec(t, "plain/r.zarr")]


def _bomb(t):
    lines = ["storage_options:", "  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 9)}]" for k in range(1, 9)]
    (t / "bomb.yaml").write_text("\n".join(lines) + "\nstore: *l8\noutput: r\nmetrics: [x]\n")
    return ["run", "bomb.yaml"]


def _lock_held(t):
    (t / "r.zarr.lock").write_text(json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "since": 0}))
    return ["run", spec(t)]


def _corrupt_results(t):
    results_store(t)
    (t / "r.zarr" / "zarr.json").write_text('{"attributes": {"repscope_res')
    return ["show", "r.zarr"]


def _other_zarr(t):
    import xarray as xr

    xr.Dataset({"v": ("x", np.arange(3.0))}).to_zarr(t / "o.zarr", zarr_format=3,
                                                     consolidated=False)
    return ["show", "o.zarr"]


def _report_on_file(t):
    results_store(t)
    (t / "report.png").write_text("precious")
    return ["report", "r.zarr", "--out", "report.png"]


def _spec_dir(t):
    (t / "specs").mkdir()
    return ["run", "specs"]


TABLE = [
    # --- the output: repscope replaces only what it wrote, refused before any work
    Case("run: output an existing folder (--overwrite)", _folder, 2,
         "output mine is an existing folder that is not a results store"),
    Case("run: output an existing file", _file, 2, "output out.txt is an existing file"),
    Case("run: output the store (--overwrite)",
         lambda t: ["run", spec(t, "acts.zarr"), "--overwrite"], 2,
         "output acts.zarr is the job's activation store"),
    Case("nightly: output the store", lambda t: ["nightly", spec(t, "acts.zarr")], 2,
         "output acts.zarr is the job's activation store"),
    Case("run: output the working folder", lambda t: ["run", spec(t, ".")], 2,
         "output . is the working folder"),
    Case("run: output inside the store", lambda t: ["run", spec(t, "acts.zarr/units/r")], 2,
         "lies inside the activation store"),
    Case("run: output's parent a file", _below_file, 2, "plain is a file, not a folder"),
    Case("run: unsupported URL scheme", lambda t: ["run", spec(t, "ftp://h/r.zarr")], 2,
         "unsupported output URL ftp://h/r.zarr"),
    Case("run: 300-character output name", lambda t: ["run", spec(t, "r" * 300)], 2,
         "bytes; file systems allow 255"),
    Case("run: memory:// output", lambda t: ["run", spec(t, "memory://x/r.zarr")], 2,
         "memory://x/r.zarr: what `repscope run` writes there would vanish when it exits"),
    Case("submit: memory:// output",
         lambda t: ["submit", spec(t, "memory://x/r.zarr"), "--address", "http://127.0.0.1:9"],
         2, "memory://x/r.zarr: the cluster cannot read this process's memory"),
    Case("run: memory:// store", lambda t: ["run", spec(t, store="memory://x/acts.zarr")], 2,
         "memory://x/acts.zarr: it is empty in a new command"),
    Case("ingest: memory:// store", lambda t: ["ingest", "memory://x/s.zarr", "m", "a.npy"], 2,
         "what `repscope ingest` writes there would vanish"),
    Case("run: another run holds the output", _lock_held, 1, "being written by another run"),
    # --- the spec
    Case("run: 400-byte alias bomb", _bomb, 2, "YAML aliases expand this spec to more than"),
    Case("run: memory_per_worker inf",
         lambda t: ["run", spec(t, extra="compute: {memory_per_worker: inf}\n")], 2,
         "compute.memory_per_worker must be a size from 1 KiB to 1 PiB"),
    Case("run: workers 1e23 (an integer)",
         lambda t: ["run", spec(t, extra="compute: {workers: 100000000000000000000000}\n")],
         2, "compute.workers must be an integer from 1 to"),
    Case("run: spec missing", lambda t: ["run", "nope.yaml"], 2, "'nope.yaml' does not exist"),
    Case("run: spec a folder", _spec_dir, 2, "'specs' is not a file"),
    Case("run: no spec (usage)", lambda t: ["run"], 2, "the following arguments are required"),
    # --- reading results
    Case("show: an activation store", lambda t: ["show", "acts.zarr"], 2,
         "acts.zarr is an activation store, not a results store: `repscope inspect acts.zarr`"),
    Case("show: nothing there", lambda t: ["show", "none.zarr"], 2, "no results store at none"),
    Case("show: corrupt zarr.json", _corrupt_results, 2, "r.zarr/zarr.json is not valid JSON"),
    Case("show: another tool's Zarr", _other_zarr, 2, "not a results store written by repscope"),
    Case("report: --out on a file", _report_on_file, 2,
         "report folder report.png is a file, not a folder"),
]


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return int(exc.code)


def run_in_copy(case, tmp_path, store, monkeypatch, capsys):
    """Run a case's command in tmp_path beside a copy of the store: (argv, what tmp_path
    held before, exit code, stdout, stderr, stderr's lines)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(store, tmp_path / "acts.zarr")
    argv = case.argv(tmp_path)
    before = snapshot(tmp_path)
    code = run_main(argv)
    out, err = capsys.readouterr()
    return argv, before, code, out, err, err.strip().splitlines()


@pytest.mark.parametrize("case", TABLE, ids=[c.id for c in TABLE])
def test_bad_input_table(case, tmp_path, store, monkeypatch, capsys):
    argv, before, code, out, err, lines = run_in_copy(case, tmp_path, store, monkeypatch, capsys)
    assert code == case.code, err
    assert len(lines) == 1, err  # refused before any work: nothing else was printed
    assert lines[0].startswith(f"repscope {argv[0]}: error: ")
    assert case.message in lines[0]
    assert "Traceback" not in err + out
    assert snapshot(tmp_path) == before  # nothing written, moved or removed


S3_TABLE = [
    Case("show: partial credentials", lambda e: ["show", "s3://b/r.zarr", *s3_options(e, False)],
         2, "incomplete credentials in the storage options"),
    Case("show: unreachable S3", lambda e: ["show", "s3://b/r.zarr", *s3_options(e)], 1,
         "storage failure at s3://b/r.zarr"),
]


@pytest.mark.parametrize("case", S3_TABLE, ids=[c.id for c in S3_TABLE])
def test_object_store_table(case, capsys):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code = run_main(case.argv(endpoint))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == case.code and len(lines) == 1, err
    assert case.message in lines[0] and "Traceback" not in err
    assert KEY not in err + out and SECRET not in err + out


def test_credentials_inside_a_url_never_print(capsys):
    """The backend repeats the URL's user info in its own words: masked there too."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    code = run_main(["show", f"s3://{KEY}:{SECRET}@bucket/r.zarr",
                     f"--storage-option=client_kwargs.endpoint_url={endpoint}"])
    out, err = capsys.readouterr()
    assert code in (1, 2) and len(err.strip().splitlines()) == 1
    assert err.startswith("repscope show: error: ") and "Traceback" not in err
    assert KEY not in err + out and SECRET not in err + out


def test_an_unreachable_object_store_output_is_refused_before_work():
    from repscope.errors import StorageError
    from repscope.jobs.outputs import check_output_safe

    options = {"key": KEY, "secret": SECRET,
               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"}}
    with pytest.raises(StorageError, match="storage failure at s3://bucket/r.zarr") as info:
        check_output_safe("s3://bucket/r.zarr", None, options)
    assert SECRET not in str(info.value) and KEY not in str(info.value)


def test_an_unexpected_exception_is_one_line_with_the_debug_hint(tmp_path, monkeypatch,
                                                                 capsys):
    def broken(args):
        raise TypeError(f"boom with {SECRET} in it")

    monkeypatch.setattr(repscope.jobs.commands, "cmd_show", broken)
    code = run_main(["show", "r.zarr", f"--storage-option=secret={SECRET}"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip() == ("repscope show: error: unexpected TypeError: boom with *** in it "
                           "(this is a bug in repscope or a dependency; set REPSCOPE_DEBUG=1 "
                           "for the traceback)")
    monkeypatch.setenv("REPSCOPE_DEBUG", "1")
    assert run_main(["show", "r.zarr"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_warnings_reach_the_user_as_one_line_each(monkeypatch, capsys):
    from repscope.cluster.registry import FewRowsWarning

    def noisy(args):
        for _ in range(3):
            warnings.warn("consolidated metadata is\n   not part of the spec,\n  see docs",
                          UserWarning, stacklevel=1)
            warnings.warn("'x' has 20 features but only 12 rows", FewRowsWarning, stacklevel=1)
        warnings.warn("a dependency's deprecation", FutureWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(repscope.jobs.commands, "cmd_show", noisy)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert run_main(["show", "r.zarr"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "repscope show: warning: consolidated metadata is not part of the spec, see docs",
        "repscope show: warning: FewRowsWarning: 'x' has 20 features but only 12 rows",
        "repscope show: warning: FutureWarning: a dependency's deprecation",
    ]


def test_reading_results_prints_no_dependency_noise(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results_store(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert run_main(["show", "r.zarr"]) == 0
    captured = capsys.readouterr()
    assert "linear_cka" in captured.out and captured.err == ""


@pytest.mark.parametrize("errno_, code, text", [
    (13, 2, "out/x: permission denied"), (30, 2, "out/x: read-only file system"),
    (20, 2, "out/x: not a folder"), (28, 1, "out/x: disk full: free some space and rerun"),
    (5, 1, "OSError at out/x: Input/output error"),
])
def test_os_errors_are_sorted_into_user_and_machine(errno_, code, text):
    assert describe_error(OSError(errno_, os.strerror(errno_), "out/x")) == (text, code)


# --- a real full disk and a real read-only file system (a small tmpfs in a user namespace)

def _namespace_script(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux `unshare` to mount a small tmpfs")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"needs user namespaces (`unshare -rm`): {probe.stderr.decode().strip()}")
    script = tmp_path / "script.sh"
    script.write_text(textwrap.dedent(body))
    return subprocess.run(["unshare", "-rm", "sh", str(script)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "REPSCOPE": REPSCOPE})


def test_a_read_only_output_is_refused_before_work(tmp_path, store):
    shutil.copytree(store, tmp_path / "acts.zarr")
    (tmp_path / "ro").mkdir()
    spec(tmp_path, str(tmp_path / "ro" / "r.zarr"), store=str(tmp_path / "acts.zarr"))
    result = _namespace_script(tmp_path, f"""
        mount -t tmpfs -o size=1m none {tmp_path}/ro || exit 99
        mount -o remount,ro {tmp_path}/ro || exit 99
        "$REPSCOPE" run job.yaml
        echo "rc=$?"
    """)
    assert "rc=2" in result.stdout, result.stderr
    assert result.stderr.strip() == (
        f"repscope run: error: output {tmp_path}/ro/r.zarr: cannot write in {tmp_path}/ro "
        "(read-only file system); choose an output you can write")


def test_a_full_disk_during_a_run_is_one_line_and_leaves_nothing_half_written(tmp_path):
    make_store(str(tmp_path / "acts.zarr"), {"a": [30, 20], "b": [25]}, rows=200)
    (tmp_path / "full").mkdir()
    spec(tmp_path, str(tmp_path / "full" / "r.zarr"), store=str(tmp_path / "acts.zarr"),
         extra="compute: {checkpoint_seconds: 0}\n")
    # the disk is full but for 16 KiB: the lock fits, the results store does not
    result = _namespace_script(tmp_path, f"""
        mount -t tmpfs -o size=256k none {tmp_path}/full || exit 99
        {sys.executable} -c "
import os
f = open('{tmp_path}/full/filler', 'wb', buffering=0)
try:
    while True: f.write(b'x' * 4096)
except OSError: pass
f.close()
os.truncate('{tmp_path}/full/filler', os.path.getsize('{tmp_path}/full/filler') - 16384)"
        "$REPSCOPE" run job.yaml
        echo "rc=$?"
        ls -A {tmp_path}/full
    """)
    assert "rc=1" in result.stdout, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"repscope run: error: disk full while writing results {tmp_path}/full/"
                    "r.zarr (No space left on device): free some space and rerun; nothing was "
                    "replaced")
    assert "Traceback" not in result.stderr
    assert result.stdout.split("rc=1", 1)[1].split() == ["filler"]  # no lock, temp or state


# --- inputs from the store's area: the boundary holds (one line, no traceback, nothing
# written) whatever the store's own checks say; naming the unit is the store's part.

def _corrupt_root(t):
    (t / "acts.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_')
    return ["run", spec(t)]


def _corrupt_unit(t):
    (t / "acts.zarr" / "units" / "a" / "layer1" / "zarr.json").write_text("garbage")
    return ["run", spec(t)]


def _rows_not_a_number(t):
    path = t / "acts.zarr" / "rows" / "zarr.json"  # the store's row record (format 2)
    meta = json.loads(path.read_text())
    meta["attributes"]["repscope_rows"]["n_rows"] = "many"
    path.write_text(json.dumps(meta))
    return ["run", spec(t)]


def _long_model_name(t):
    np.save(t / "x.npy", np.ones((10, 2), dtype=np.float32))
    return ["ingest", "new.zarr", "m" * 300, "x.npy", "--layer", "l"]


STORE_TABLE = [Case("run: corrupt store zarr.json", _corrupt_root, 0, ""),
               Case("run: corrupt unit zarr.json", _corrupt_unit, 0, ""),
               Case("run: n_rows not a number", _rows_not_a_number, 0, ""),
               Case("ingest: 300-character model name", _long_model_name, 0, "")]


@pytest.mark.parametrize("case", STORE_TABLE, ids=[c.id for c in STORE_TABLE])
def test_the_boundary_holds_for_damaged_stores(case, tmp_path, store, monkeypatch, capsys):
    argv, before, code, out, err, lines = run_in_copy(case, tmp_path, store, monkeypatch, capsys)
    assert code in (1, 2)
    assert lines[-1].startswith(f"repscope {argv[0]}: error:")  # after progress, if any
    assert sum("error" in line for line in lines) == 1
    assert "Traceback" not in err + out
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("new.zarr")} == before
