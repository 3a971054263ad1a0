"""`repscope ingest` and `repscope inspect` through the real entry point (jobs.cli.main)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from repscope.errors import InputError
from repscope.jobs.cli import main
from repscope.store import ActivationStore
from tests.s3server import FAKE_KEY, FAKE_SECRET


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_ingest_and_inspect(tmp_path, capsys):
    np.savez(tmp_path / "acts.npz", layer10=np.ones((6, 3)), layer2=np.zeros((6, 5), np.float16))
    store = tmp_path / "st"
    code, out, err = _run(capsys, "ingest", store, "m1", tmp_path / "acts.npz")
    assert code == 0, err
    assert out.splitlines() == [
        "m1/layer2: 6 x 5 float32 (from float16), 120 B",
        "m1/layer10: 6 x 3 float32 (from float64), 72 B",
    ]
    assert err.count("ingesting m1/") == 2

    np.save(tmp_path / "fc.npy", np.ones((6, 2), np.float32))
    code, out, _ = _run(
        capsys, "ingest", store, "m2", tmp_path / "fc.npy", "--layer", "fc", "--dtype", "float16"
    )
    assert (code, out) == (0, "m2/fc: 6 x 2 float16 (from float32), 24 B\n")

    code, out, _ = _run(capsys, "inspect", store, "--json")
    desc = json.loads(out)
    assert code == 0 and desc["rows"] == 6 and desc["models"] == ["m1", "m2"]
    assert desc["row_fingerprint"] == ActivationStore.open(str(store)).row_fingerprint
    assert [(u["model"], u["layer"], u["dtype"]) for u in desc["units"]] == [
        ("m1", "layer2", "float32"),
        ("m1", "layer10", "float32"),
        ("m2", "fc", "float16"),
    ]

    code, out, _ = _run(capsys, "inspect", store)
    lines = out.splitlines()
    assert code == 0 and lines[0] == f"store {store}"
    assert lines[2].split() == [
        "model",
        "layer",
        "rows",
        "features",
        "dtype",
        "source",
        "size",
        "chunk",
        "shard",
    ]
    assert lines[4].split() == [
        "m1",
        "layer10",
        "6",
        "3",
        "float32",
        "float64",
        "72",
        "B",
        "6",
        "rows",
        "6",
        "rows",
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ingest", "{st}", "m", "{tmp}/missing.npy", "--layer", "l"], "source file not found"),
        (["ingest", "{st}", "m", "{tmp}/a.npy"], "a .npy file holds one layer"),
        (["ingest", "{st}", "../m", "{tmp}/a.npy", "--layer", "l"], "contains a path separator"),
        (["ingest", "{st}", "m", "{tmp}/nan.npy", "--layer", "l"], "NaN at row 1, column 0"),
        (["inspect", "{tmp}/no-store"], "no store at"),
        (["ingest", "ftp://host/x", "m", "{tmp}/a.npy", "--layer", "l"], "unsupported store URL"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys, argv, message):
    np.save(tmp_path / "a.npy", np.ones((3, 2)))
    np.save(tmp_path / "nan.npy", np.array([[1.0], [np.nan]]))
    argv = [a.format(st=tmp_path / "st", tmp=tmp_path) for a in argv]
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert "Traceback" not in err
    # Progress lines ("ingesting ...") may precede the one error line.
    errors = [line for line in err.splitlines() if not line.startswith("ingesting ")]
    assert len(errors) == 1 and errors[0].startswith(f"repscope {argv[0]}: error: ")
    assert message in errors[0]


def test_s3_through_the_cli_never_prints_secrets(s3_server, tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.ones((3, 2)))
    opts = [
        "--storage-option",
        f"key={FAKE_KEY}",
        "--storage-option",
        f"secret={FAKE_SECRET}",
        "--storage-option",
        f"client_kwargs.endpoint_url={s3_server.endpoint_url}",
        "--storage-option",
        "client_kwargs.region_name=us-east-1",
    ]
    url = s3_server.url()
    code, out, err = _run(capsys, "ingest", url, "m", tmp_path / "a.npy", "--layer", "l", *opts)
    assert code == 0, err
    code, out2, err2 = _run(capsys, "inspect", url, "--json", *opts)
    assert code == 0 and json.loads(out2)["units"][0]["rows"] == 3
    # A bucket that does not exist: the backend error is reported, redacted.
    code, out3, err3 = _run(capsys, "inspect", f"s3://no-such-bucket-{FAKE_SECRET}/x", *opts)
    assert code == 2 and "no store at s3://no-such-bucket-***/x" in err3
    for text in (out, err, out2, err2, out3, err3):
        assert FAKE_SECRET not in text and FAKE_KEY not in text


def test_storage_options_on_a_local_path_are_refused_without_echo(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.ones((3, 2)))
    code, _, err = _run(
        capsys,
        "ingest",
        tmp_path / "st",
        "m",
        tmp_path / "a.npy",
        "--layer",
        "l",
        "--storage-option",
        f"secret={FAKE_SECRET}",
    )
    assert code == 2 and "storage options are not used for local store" in err
    assert FAKE_SECRET not in err
    code, _, err = _run(capsys, "inspect", tmp_path, "--storage-option", FAKE_SECRET)
    assert code == 2 and "number 1: expected KEY=VALUE" in err and FAKE_SECRET not in err


def _store_with_units(path) -> str:
    from repscope.store import ingest_array

    st = ActivationStore.create(str(path))
    ingest_array(st, "a", "l1", np.ones((4, 2)))
    ingest_array(st, "a", "l2", np.ones((4, 3)))
    return st.unit_info("a", "l1").version


def _write(path, text: str) -> None:
    path.write_text(text)


def _set_rows_record(store_path, **changes) -> None:
    doc_path = store_path / "rows" / "zarr.json"
    doc = json.loads(doc_path.read_text())
    doc["attributes"]["repscope_rows"].update(changes)
    doc_path.write_text(json.dumps(doc))


def _format1_root(store_path) -> None:
    (store_path).mkdir()
    (store_path / "zarr.json").write_text(json.dumps({
        "zarr_format": 3, "node_type": "group",
        "attributes": {"repscope": {"format": 1, "n_rows": "many", "row_fingerprint": "x"}}}))


@pytest.mark.parametrize(
    "case, command, code, message",
    [
        ("unit-json", "inspect", 1,
         r"store .*, model 'a', layer 'l1': its metadata \(units/a/l1/zarr.json\) is damaged: "
         r"not valid JSON"),
        ("version-json", "inspect", 1,
         r"store .*, model 'a', layer 'l1', version v\S+: its array metadata is damaged"),
        ("root-json", "inspect", 1, r"store .*: its root metadata \(zarr.json\) is damaged"),
        ("root-json", "ingest", 1, r"store .*: its root metadata \(zarr.json\) is damaged"),
        ("rows-count", "inspect", 1,
         r"store .* \(rows/zarr.json\): row metadata is damaged: n_rows is 'many', not a "
         r"row count"),
        ("rows-count", "ingest", 1, r"n_rows is 'many', not a row count"),
        ("format1-count", "inspect", 1,
         r"store .* \(root zarr.json\): row metadata is damaged: n_rows is 'many'"),
        ("long-model", "ingest", 2,
         r"model name 'm{40}'\.\.\. is too long \(300 characters, 300 bytes in UTF-8\); at most "
         r"200 bytes"),
        ("long-layer", "ingest", 2, r"layer name 'l{40}'\.\.\. is too long"),
        ("ftp", "inspect", 2, r"unsupported store URL ftp://host/x: supported are"),
        ("chained", "inspect", 2, r"unsupported store URL simplecache::s3://b/x: chained"),
        ("no-bucket", "inspect", 2, r"store URL s3:// names no bucket"),
        ("memory", "ingest", 2, r"memory://repscope-cli/x: what `repscope ingest` "
                                r"writes there would vanish when it exits"),
        ("memory", "inspect", 2, r"it is empty in a new command"),
        ("file", "ingest", 2, r"is a file, not a store"),
        ("file", "inspect", 2, r"is a file, not a store"),
        ("missing", "inspect", 2, r"no store at .*st; create one with 'repscope ingest'"),
        ("folder", "ingest", 2, r"is a folder that holds other files, not a store"),
    ],
)
def test_damaged_and_odd_stores_are_one_line(tmp_path, capsys, case, command, code, message):
    st = tmp_path / "st"
    np.save(tmp_path / "a.npy", np.ones((4, 2)))
    if case in ("unit-json", "version-json", "root-json", "rows-count"):
        version = _store_with_units(st)
        target = {"unit-json": st / "units" / "a" / "l1" / "zarr.json",
                  "version-json": st / "units" / "a" / "l1" / version / "zarr.json",
                  "root-json": st / "zarr.json"}.get(case)
        if target is not None:
            _write(target, "{not json")
        else:
            _set_rows_record(st, n_rows="many")
    elif case == "format1-count":
        _format1_root(st)
    elif case == "file":
        st.write_text("my notes")
    elif case == "folder":
        st.mkdir()
        (st / "notes.txt").write_text("my notes")
    url = {"ftp": "ftp://host/x", "chained": "simplecache::s3://b/x", "no-bucket": "s3://",
           "memory": "memory://repscope-cli/x"}.get(case, str(st))
    model = "m" * 300 if case == "long-model" else "m"
    layer = "l" * 300 if case == "long-layer" else "x"
    argv = ["inspect", url]
    if command == "ingest":
        argv = ["ingest", url, model, tmp_path / "a.npy", "--layer", layer]
    got, out, err = _run(capsys, *argv)
    errors = [line for line in err.splitlines() if not line.startswith("ingesting ")]
    assert got == code, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"repscope {command}: error: "), err
    assert re.search(message, errors[0]), errors[0]
    assert "m" * 41 not in errors[0] and "l" * 41 not in errors[0]  # long names not echoed whole
    if case == "file":
        assert st.read_text() == "my notes"
    if case == "folder":
        assert sorted(p.name for p in st.iterdir()) == ["notes.txt"]
    if case == "missing":
        assert not st.exists()  # looking did not create it


def test_cli_messages_name_cli_flags_and_python_messages_name_keywords(tmp_path, capsys):
    from repscope.store import ingest_path

    np.save(tmp_path / "a.npy", np.ones((4, 2)))
    st = tmp_path / "st"
    assert _run(capsys, "ingest", st, "m", tmp_path / "a.npy", "--layer", "l")[0] == 0
    code, _, err = _run(capsys, "ingest", st, "m", tmp_path / "a.npy", "--layer", "l")
    assert code == 2 and "pass --overwrite to replace it, or --resume" in err
    assert "overwrite=True" not in err and "resume=True" not in err
    code, _, err = _run(capsys, "ingest", st, "m", tmp_path / "a.npy")
    assert code == 2 and err.strip().endswith("name it with --layer") and "layer=" not in err
    store = ActivationStore.open(str(st))
    with pytest.raises(InputError, match=r"pass overwrite=True to replace it, or resume=True"):
        ingest_path(store, "m", tmp_path / "a.npy", layer="l")
    with pytest.raises(InputError, match=r"unit already exists .*; pass overwrite=True to replace"):
        store.writer("m", "l")
