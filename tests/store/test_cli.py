"""`repscope ingest` and `repscope inspect` through the real entry point (jobs.cli.main)."""

from __future__ import annotations

import json

import numpy as np
import pytest

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
