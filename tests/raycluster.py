"""A real Ray cluster on loopback for tests: `ray start --head --block`, stopped by pid.

Token authentication is on: the fixture sets RAY_AUTH_MODE=token for the cluster and its
clients, and the token is the test session's own (RAY_AUTH_TOKEN_PATH, set by
tests/conftest.py), never one from the user's HOME. Nothing here uses `ray stop` or kills
by name: other work may share the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayCluster:
    address: str  # GCS address for drivers (HOST:PORT)
    dashboard: str  # http URL of the Jobs API
    head: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)
    log_dir: Path | None = None
    temp_dir: str = ""  # the cluster's own Ray temp dir (sessions, sockets, address file)

    def add_worker(self, num_cpus: int = 1) -> subprocess.Popen:
        """Start one more node (`ray start --address ... --block`); returns its process.

        The node carries one unit of a resource named after it, `worker_<index>`, so that
        tests can tell which nodes the cluster holds alive (all share one IP address)."""
        index = len(self.workers)
        log = open(self.log_dir / f"worker-{index}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [RAY, "start", f"--address={self.address}", "--block",
             "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--disable-usage-stats",
             f"--resources={json.dumps({f'worker_{index}': 1})}",
             f"--temp-dir={self.temp_dir}", *node_ports()],
            stdout=log, stderr=subprocess.STDOUT, env=ray_env(), start_new_session=True,
        )
        self.workers.append(proc)
        return proc


def node_ports() -> list[str]:
    """Free ports for a node's agents: their defaults (52365, 10001, ...) are fixed numbers
    that another Ray on this machine may hold, and an agent that cannot bind leaves the
    node without a Jobs API."""
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
             "object-manager-port")
    return [f"--{name}={free_port()}" for name in names]


def ray_env() -> dict[str, str]:
    """Environment of the cluster's processes: token auth, and this venv's scripts on PATH
    (as in the container image), so a submitted `repscope run` entrypoint is found."""
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "token"
    if "RAY_AUTH_TOKEN_PATH" not in env:
        raise RuntimeError("RAY_AUTH_TOKEN_PATH is not set: tests/conftest.py sets the "
                           "session's own token before any cluster starts")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    return env


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the `ray start --block` process (it stops its node), SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _wait_for_jobs_api(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            JobSubmissionClient(url).list_jobs()
            return
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(1)
    raise RuntimeError(f"Ray Jobs API at {url} did not come up: {last}")


def start_cluster(log_dir: Path, head_cpus: int = 2) -> RayCluster:
    """Start a head node on loopback and wait for its Jobs API; stop it with stop_cluster.

    The cluster gets its own Ray temp dir: with the shared /tmp/ray, a job submitted to it
    finds its cluster's address through /tmp/ray's "current cluster" file, which the newest
    Ray instance on the machine (another test's, another user's) overwrites. Short, under
    /tmp: Unix socket paths inside it must stay under ~107 characters.
    """
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rs-ray-", dir="/tmp")
    os.environ["RAY_AUTH_MODE"] = "token"  # this process is a client too
    log = open(log_dir / "head.log", "w")  # noqa: SIM115
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--num-cpus={head_cpus}",
         f"--ray-client-server-port={free_port()}", "--disable-usage-stats",
         f"--temp-dir={temp_dir}", *node_ports()],
        stdout=log, stderr=subprocess.STDOUT, env=ray_env(), start_new_session=True,
    )
    cluster = RayCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", head,
                         log_dir=log_dir, temp_dir=temp_dir)
    try:
        _wait_for_jobs_api(cluster.dashboard, head)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: RayCluster) -> None:
    for w in cluster.workers:
        stop_process(w)
    stop_process(cluster.head)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A head node on loopback with 2 CPUs; yields RayCluster; stops everything after."""
    cluster = start_cluster(tmp_path_factory.mktemp("ray-logs"))
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
