"""Jobs on a real Ray cluster (`ray start --head --block` on loopback, token auth on):
`repscope run --address` as a driver, and submit/status/logs/stop through the Jobs API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from repscope.cluster.compare import compare_arrays
from tests.jobs.conftest import make_store
from tests.raycluster import ray_env

REPSCOPE = str(Path(sys.executable).with_name("repscope"))


def repscope(*args: str, env: dict | None = None, timeout: float = 240):
    return subprocess.run(
        [REPSCOPE, *args], capture_output=True, text=True, timeout=timeout,
        env=env or ray_env(),
    )


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-job")
    _, data = make_store(str(root / "acts.zarr"), {"m1": [7, 5], "m2": [7, 5]}, rows=500)
    spec = root / "job.yaml"
    spec.write_text(
        f"store: {root / 'acts.zarr'}\noutput: {root / 'results.zarr'}\n"
        "metrics: [linear_cka, pwcca]\ncompute: {precision: float64}\n"
    )
    return spec, root / "results.zarr", data


def check_results(output: Path, data) -> None:
    ds = xr.open_zarr(output)
    units = list(data)
    for i, j in [(0, 1), (0, 2), (3, 1)]:
        x, y = data[units[i]].astype(np.float64), data[units[j]].astype(np.float64)
        expected = compare_arrays(x, y, ["linear_cka", "pwcca"])
        assert float(ds["linear_cka"][i, j]) == pytest.approx(expected["linear_cka"], abs=1e-8)
        assert float(ds["pwcca"][i, j]) == pytest.approx(expected["pwcca"], abs=1e-8)


def test_run_as_driver_on_cluster(ray_cluster, job):
    spec, output, data = job
    result = repscope("run", str(spec), "--address", ray_cluster.address, "--json",
                      "--overwrite")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["pairs_total"] == 10 and summary["rows"] == 500
    check_results(output, data)


def test_run_uses_ray_address_variable(ray_cluster, job):
    spec, output, data = job
    env = {**ray_env(), "RAY_ADDRESS": ray_cluster.address}
    result = repscope("run", str(spec), "--json", "--overwrite", env=env)
    assert result.returncode == 0, result.stderr
    check_results(output, data)


def test_submit_wait_status_logs(ray_cluster, job, tmp_path):
    spec, _, data = job
    out = tmp_path / "submitted.zarr"
    submitted = tmp_path / "job.yaml"
    submitted.write_text(spec.read_text().replace(str(spec.parent / "results.zarr"), str(out)))
    result = repscope("submit", str(submitted), "--address", ray_cluster.dashboard, "--wait",
                      "--submission-id", "repscope-test-1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[0] == "repscope-test-1"
    check_results(out, data)

    status = repscope("status", "repscope-test-1", "--address", ray_cluster.dashboard, "--json")
    assert json.loads(status.stdout)["status"] == "SUCCEEDED"
    logs = repscope("logs", "repscope-test-1", "--address", ray_cluster.dashboard)
    assert '"pairs_total": 10' in logs.stdout

    # the same submission id again: idempotent, nothing new submitted
    again = repscope("submit", str(submitted), "--address", ray_cluster.dashboard,
                     "--submission-id", "repscope-test-1")
    assert again.returncode == 0 and again.stdout.strip() == "repscope-test-1"


def test_submit_failing_job_exits_nonzero(ray_cluster, tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"store: {tmp_path / 'missing.zarr'}\noutput: {tmp_path / 'o.zarr'}\n"
                    "metrics: [linear_cka]\n")
    result = repscope("submit", str(spec), "--address", ray_cluster.dashboard, "--wait")
    assert result.returncode == 1
    assert "FAILED" in result.stderr
    assert "missing.zarr" in result.stdout + result.stderr


def test_stop_and_unknown_ids(ray_cluster):
    result = repscope("status", "no-such-job", "--address", ray_cluster.dashboard)
    assert result.returncode == 2 and "no job 'no-such-job'" in result.stderr
    result = repscope("stop", "no-such-job", "--address", ray_cluster.dashboard)
    assert result.returncode == 2


def test_missing_token_mode_gives_actionable_error(ray_cluster, job):
    spec, _, _ = job
    env = {k: v for k, v in ray_env().items() if k != "RAY_AUTH_MODE"}
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    result = repscope("status", "x", "--address", ray_cluster.dashboard, env=env, timeout=60)
    assert result.returncode != 0
    assert "RAY_AUTH_MODE=token" in result.stderr
    assert token not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_bad_address_is_usage_error():
    result = repscope("status", "x", "--address", "localhost:8265", env=dict(os.environ))
    assert result.returncode == 2 and "dashboard URL" in result.stderr


def test_run_without_token_mode_says_what_to_set_in_seconds(ray_cluster, job):
    spec, _, _ = job
    env = {k: v for k, v in ray_env().items() if k != "RAY_AUTH_MODE"}
    t0 = time.perf_counter()
    result = repscope("run", str(spec), "--address", ray_cluster.address, env=env, timeout=120)
    seconds = time.perf_counter() - t0
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "set RAY_AUTH_MODE=token" in lines[0], result.stderr
    assert seconds < 15, f"{seconds:.1f} s to say what is missing"  # Ray alone retries ~20 s


def test_submit_resolves_relative_paths(ray_cluster, job, tmp_path):
    """The README's relative paths: only the spec travels, so they are made absolute (from
    where submit runs) before the job is sent."""
    spec, _, data = job
    store = spec.parent / "acts.zarr"
    local = tmp_path / "job.yaml"
    local.write_text("store: acts.zarr\noutput: out/relative.zarr\n"
                     "metrics: [linear_cka, pwcca]\ncompute: {precision: float64}\n")
    (tmp_path / "acts.zarr").symlink_to(store)
    result = subprocess.run([REPSCOPE, "submit", "job.yaml", "--address", ray_cluster.dashboard,
                             "--wait"], capture_output=True, text=True, timeout=240,
                            env=ray_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    check_results(tmp_path / "out" / "relative.zarr", data)
    local.write_text("store: memory://acts.zarr\noutput: out/m.zarr\nmetrics: [linear_cka]\n")
    result = subprocess.run([REPSCOPE, "submit", "job.yaml", "--address", ray_cluster.dashboard],
                            capture_output=True, text=True, timeout=60, env=ray_env(),
                            cwd=tmp_path)
    assert result.returncode == 2 and "cluster cannot read" in result.stderr
