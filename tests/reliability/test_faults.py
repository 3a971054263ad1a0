"""Faults on a real multi-node Ray cluster on loopback: a head without CPUs and two 1-CPU
worker nodes (`ray start --address ... --block`), each stopped by process id.

A worker node's raylet killed with SIGKILL mid-job, or one worker process killed, costs
retries (and lineage reconstruction of lost partials), not the job: the matrices equal an
undisturbed run to 1e-12.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import xarray as xr

from tests.jobs.conftest import make_store
from tests.raycluster import ray_env, start_cluster, stop_cluster

pytestmark = pytest.mark.slow
REPSCOPE = str(Path(sys.executable).with_name("repscope"))
METRICS = ["linear_cka", "procrustes", "mean_cca"]


def wait_for_workers(cluster, timeout: float = 90) -> None:
    """Until the worker nodes the cluster holds alive are exactly its running `ray start`
    processes: a new node registers seconds after its start, and a node whose raylet was
    killed stays alive in the GCS until it misses its health checks."""
    from ray.util.state import list_nodes

    want = {f"worker_{i}" for i, w in enumerate(cluster.workers) if w.poll() is None}
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = {name for n in list_nodes(address=cluster.dashboard) if n.state == "ALIVE"
                 for name in n.resources_total if name.startswith("worker_")}
        if alive == want:
            return
        time.sleep(0.5)
    raise RuntimeError(f"alive worker nodes {sorted(alive)}, expected {sorted(want)}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory.mktemp("fault-cluster"), head_cpus=0)
    try:
        yield c
    finally:
        stop_cluster(c)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-job")
    make_store(str(root / "acts.zarr"), {"a": [384, 384], "b": [384, 384]}, rows=60000)
    return root


def spec(root: Path, name: str, checkpoint_seconds: float = 120) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(
        f"store: {root / 'acts.zarr'}\noutput: {root / name}.zarr\n"
        f"metrics: {json.dumps(METRICS)}\n"
        "compute: {precision: float64, workers: 2, block_rows: 2048, "
        f"checkpoint_seconds: {checkpoint_seconds}}}\n"
    )
    return path


def start_run(cluster, path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [REPSCOPE, "run", str(path), "--address", cluster.address, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ray_env(),
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("{"), f"last stdout line is not the JSON summary:\n{out}"
    return json.loads(last)


def task_workers(node: subprocess.Popen) -> list[psutil.Process]:
    """Worker processes of a node that are running an accumulate task right now."""
    procs = []
    for p in psutil.Process(node.pid).children(recursive=True):
        try:
            if "accumulate_tile" in " ".join(p.cmdline()):
                procs.append(p)
        except psutil.Error:
            pass
    return procs


def wait_for_task_on(node: subprocess.Popen, timeout: float = 120) -> list[psutil.Process]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = task_workers(node)
        if found:
            return found
        time.sleep(0.05)
    raise RuntimeError("no accumulate task started on the node")


def raylet_of(node: subprocess.Popen) -> psutil.Process:
    for p in psutil.Process(node.pid).children(recursive=True):
        if p.name() == "raylet":
            return p
    raise RuntimeError("no raylet under the node process")


def assert_same(a: Path, b: Path) -> None:
    x, y = xr.open_zarr(a), xr.open_zarr(b)
    for metric in METRICS:
        # A resumed run merges the same rows in another grouping (1e-16 relative in the
        # moments); with float32 statistics Procrustes' nuclear norm comes from eigenvalues
        # of CxyᵀCxy, which turns that into up to 9e-12 (measured); the statistics' own
        # error is 1e-7.
        np.testing.assert_allclose(x[metric].values, y[metric].values, rtol=0, atol=1e-10)


def test_worker_node_raylet_killed_mid_job(cluster, job):
    worker_a = cluster.add_worker(num_cpus=1)
    wait_for_workers(cluster)  # one node at a time: simultaneous starts race for ports
    cluster.add_worker(num_cpus=1)
    wait_for_workers(cluster)
    baseline = finish(start_run(cluster, spec(job, "undisturbed")))

    proc = start_run(cluster, spec(job, "node-killed"))
    wait_for_task_on(worker_a)
    raylet_of(worker_a).send_signal(signal.SIGKILL)
    summary = finish(proc)
    assert worker_a.wait(60) is not None  # that node is gone for good
    assert summary["pairs_total"] == baseline["pairs_total"]
    assert_same(job / "undisturbed.zarr", job / "node-killed.zarr")


def test_worker_process_killed_mid_job(cluster, job):
    node = cluster.add_worker(num_cpus=1)
    wait_for_workers(cluster)  # and the node killed before is known to be dead
    proc = start_run(cluster, spec(job, "worker-killed"))
    for p in wait_for_task_on(node):
        p.send_signal(signal.SIGKILL)
    finish(proc)
    assert_same(job / "undisturbed.zarr", job / "worker-killed.zarr")


def test_driver_killed_then_rerun_resumes(cluster, job):
    if len(cluster.workers) < 2 or all(w.poll() is not None for w in cluster.workers):
        cluster.add_worker(num_cpus=1)
    path = spec(job, "driver-killed", checkpoint_seconds=0.3)
    partials = job / "driver-killed.zarr.state" / "partials"
    proc = start_run(cluster, path)
    deadline = time.time() + 120
    while not list(partials.glob("*.json")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(partials.glob("*.json")), "no checkpoint was written"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not (job / "driver-killed.zarr").exists()

    lock = job / "driver-killed.zarr.lock"  # the killed driver's lock: same host, dead pid
    assert lock.exists()
    summary = finish(start_run(cluster, path))
    assert summary["rows_reused"] + summary["tiles_reused"] > 0
    assert_same(job / "undisturbed.zarr", job / "driver-killed.zarr")
    assert not list(partials.glob("*.npz"))  # removed once the result is written
    assert not lock.exists()
