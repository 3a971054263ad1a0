"""Storage failures end in one clear line naming the URL (and unit), after bounded retries,
with no traceback and no credential in it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.jobs.conftest import make_store
from tests.raycluster import free_port

REPSCOPE = str(Path(sys.executable).with_name("repscope"))
KEY, SECRET = "AKIAPLANTEDFAKEKEY99", "planted-fake-secret-value-123"


def run(*args, timeout=180):
    t0 = time.perf_counter()
    result = subprocess.run([REPSCOPE, *args], capture_output=True, text=True, timeout=timeout)
    return result, time.perf_counter() - t0


def test_unreachable_object_store(tmp_path):
    port = free_port()  # nothing listens there
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "store: s3://bucket/acts.zarr\n"
        f"output: {tmp_path / 'r.zarr'}\n"
        "metrics: [linear_cka]\n"
        "storage_options:\n"
        f"  key: {KEY}\n  secret: {SECRET}\n"
        f"  client_kwargs: {{endpoint_url: 'http://127.0.0.1:{port}'}}\n"
    )
    result, seconds = run("run", str(spec))
    assert result.returncode == 1
    assert "storage failure at s3://bucket/acts.zarr" in result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert KEY not in result.stderr + result.stdout and SECRET not in result.stderr
    assert seconds < 120  # bounded retries, not a hang
    assert not (tmp_path / "r.zarr").exists()


def test_corrupt_chunk_names_store_and_unit(tmp_path):
    store = tmp_path / "acts.zarr"
    make_store(str(store), {"a": [6, 5]}, rows=300)
    # The shard files of the unit's (only) version: units/a/layer2/<version>/c/<shard>/0
    chunk = next(p for p in (store / "units" / "a" / "layer2").rglob("c/*/*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[-40:] = b"\xff" * 40
    chunk.write_bytes(bytes(data))
    spec = tmp_path / "job.yaml"
    spec.write_text(f"store: {store}\noutput: {tmp_path / 'r.zarr'}\nmetrics: [linear_cka]\n")
    result, _ = run("run", str(spec))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("repscope run: error: corrupt data in store")
    assert "model 'a', layer 'layer2'" in last
    assert not (tmp_path / "r.zarr").exists()
