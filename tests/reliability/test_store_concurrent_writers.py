"""Several processes writing different units of one store at the same moment (parallel
capture of checkpoints): every unit lands, the store's rows are set exactly once, and first
writers with different rows cannot both win. Real processes, started on a common clock."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from repscope.store import ActivationStore

# Local disk: 6 processes x 3 units. S3 (a moto server in this process, slow per request):
# 3 x 1, for the race that matters there (no lock): the first writers' claim of the rows.
SIZES = {"local": (6, 3), "s3": (3, 1)}

_CHILD = r"""
import json, sys, time
import numpy as np
from repscope.errors import RepscopeError
from repscope.store import ActivationStore, ingest_array

url, options, index, rows, start_at, layers = sys.argv[1], json.loads(sys.argv[2]), \
    int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
store = None
while time.time() < start_at:
    time.sleep(0.001)
results = []
for layer in range(layers):
    x = np.full((rows, 5), index * 10 + layer, np.float32)
    try:
        if store is None:  # the store itself is created concurrently too
            store = ActivationStore.create(url, options or None)
        ingest_array(store, f"m{index}", f"l{layer}", x, row_ids=list(range(rows)),
                     chunk_bytes=5 * 4 * 8, shard_bytes=5 * 4 * 32)
        results.append(["ok", layer])
    except RepscopeError as exc:
        results.append([type(exc).__name__, str(exc)])
print(json.dumps(results))
"""


def _run_writers(target, rows_of) -> list[list]:
    url, options, processes, layers = target
    start_at = time.time() + 6  # after every child has imported repscope
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, url, json.dumps(options or {}), str(i),
             str(rows_of(i)), str(start_at), str(layers)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(processes)
    ]
    outputs = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        outputs.append(json.loads(out))
    return outputs


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path):
    """(url, storage options, processes, units per process)."""
    if request.param == "local":
        return str(tmp_path / "acts.zarr"), None, *SIZES["local"]
    s3 = request.getfixturevalue("s3_server")
    return s3.url(), s3.storage_options, *SIZES["s3"]


def test_parallel_writers_of_different_units_all_land(tmp_path):
    target = (str(tmp_path / "acts.zarr"), None, *SIZES["local"])
    url, options, processes, layers = target
    outputs = _run_writers(target, lambda i: 64)
    assert all(r == ["ok", layer] for out in outputs for layer, r in enumerate(out)), outputs
    store = ActivationStore.open(url, options)
    assert store.units() == [(f"m{i}", f"l{j}") for i in range(processes) for j in range(layers)]
    assert store.n_rows == 64 and list(store.row_ids()) == list(range(64))
    for i in range(processes):
        for j in range(layers):
            assert (store.read(f"m{i}", f"l{j}") == i * 10 + j).all()


def test_first_writers_with_different_rows_cannot_both_win(target):
    url, options, _, layers = target
    outputs = _run_writers(target, lambda i: 40 + i)  # every process its own row count
    store = ActivationStore.open(url, options)
    winners = {i for i, out in enumerate(outputs) if any(r[0] == "ok" for r in out)}
    assert len(winners) == 1, outputs
    (winner,) = winners
    assert store.n_rows == 40 + winner
    assert store.units() == [(f"m{winner}", f"l{j}") for j in range(layers)]
    for i, out in enumerate(outputs):
        if i != winner:
            for kind, message in out:
                assert kind == "InputError", out
                assert f"{40 + i} rows, but the store's units have {40 + winner} rows" in message
    for model, layer in store.units():
        assert store.unit_info(model, layer).rows == store.n_rows
    assert np.array_equal(store.row_ids(), np.arange(40 + winner))
