"""An interrupted directory ingest (the process killed midway) is finished by
`repscope ingest --resume`: complete units that match the source are kept, the rest
ingested; a kept unit whose content differs from the source is refused, naming it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from repscope.store import ActivationStore

REPSCOPE = str(Path(sys.executable).with_name("repscope"))
LAYERS = 6


def _layers(folder: Path) -> dict[str, np.ndarray]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    data = {f"layer{i}": rng.standard_normal((2000, 1024)).astype(np.float32)
            for i in range(1, LAYERS + 1)}  # 8 MiB each
    for name, x in data.items():
        np.save(folder / f"{name}.npy", x)
    return data


def _ingest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([REPSCOPE, "ingest", *args], capture_output=True, text=True,
                          timeout=300)


def test_a_killed_directory_ingest_is_resumed(tmp_path):
    data = _layers(tmp_path / "acts")
    store = str(tmp_path / "st.zarr")
    proc = subprocess.Popen([REPSCOPE, "ingest", store, "m", str(tmp_path / "acts")],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:
            if line.startswith("ingesting m/layer3 "):
                os.kill(proc.pid, signal.SIGKILL)  # layers 1 and 2 done, 3 under way
                break
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    done = ActivationStore.open(store).units()
    assert ("m", "layer1") in done and len(done) < LAYERS

    again = _ingest(store, "m", str(tmp_path / "acts"))
    assert again.returncode == 2
    assert "unit already exists" in again.stderr and "--resume" in again.stderr
    assert "(overwrite=True)" not in again.stderr and "resume=True" not in again.stderr

    resumed = _ingest(store, "m", str(tmp_path / "acts"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "keeping m/layer1: already in the store with the same content" in resumed.stderr
    assert "ingesting m/layer6 " in resumed.stderr
    assert len(resumed.stdout.splitlines()) == LAYERS
    st = ActivationStore.open(store)
    assert st.units() == [("m", f"layer{i}") for i in range(1, LAYERS + 1)]
    for name, x in data.items():
        np.testing.assert_array_equal(st.read("m", name), x)

    # A kept unit must match: a changed source file is refused, and nothing is written.
    changed = data["layer2"].copy()
    changed[1234, 5] += 1.0
    np.save(tmp_path / "acts" / "layer2.npy", changed)
    before = {u: st.unit_info(*u).version for u in st.units()}
    refused = _ingest(store, "m", str(tmp_path / "acts"), "--resume")
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("repscope ingest: error: model 'm', layer 'layer2' (file ")
    assert "differs from this source; nothing was written. Pass --overwrite" in last
    st.refresh()
    assert {u: st.unit_info(*u).version for u in st.units()} == before

    both = _ingest(store, "m", str(tmp_path / "acts"), "--resume", "--overwrite")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
