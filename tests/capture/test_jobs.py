"""Many checkpoints: one Ray task each (embedded default and a `ray start` cluster), a failed
checkpoint that loses nothing else, reruns that skip what is complete, a killed driver, a job
on the captured store, and the capture spec submitted through the Ray Jobs API."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import psutil
import xarray as xr

from repscope.jobs.capture import prepare_submission
from repscope.jobs.capture_spec import load_capture_spec
from repscope.jobs.cli import main
from repscope.store import ActivationStore
from tests.capture.conftest import LINES, direct_hidden_states


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def threads_of(summary: dict) -> dict[str, int]:
    return {c["model"]: c["threads"] for c in summary["captured"]}


def assert_hidden_states(store: ActivationStore, model: str, folder, threads: int,
                         lines=LINES) -> None:
    for unit, expected in direct_hidden_states(folder, lines, 32, threads=threads).items():
        np.testing.assert_array_equal(store.read(model, unit), expected)


def test_checkpoints_as_ray_tasks_a_failure_a_rerun_and_a_job(
        embedded_ray, checkpoints, probes, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["seed1"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # the config is fine, the weights are not
    store_url = tmp_path / "acts.zarr"
    args = ["capture", str(store_url), "--hf", f"bert-a={checkpoints['seed0']}",
            "--hf", f"bert-b={checkpoints['seed1']}", "--hf", f"broken={broken}",
            "--text", str(probes), "--json"]
    assert main(args) == 1
    out = capsys.readouterr()
    summary = last_json(out.out)
    assert sorted(c["model"] for c in summary["captured"]) == ["bert-a", "bert-b"]
    assert list(summary["failed"]) == ["broken"]
    assert "broken: failed: model 'broken' (checkpoint" in out.err
    assert out.err.strip().splitlines()[-1].startswith(
        "repscope capture: error: 1 of 3 checkpoints failed (first: broken: ")
    store = ActivationStore.open(str(store_url))
    assert store.models() == ["bert-a", "bert-b"]
    threads = threads_of(summary)
    assert_hidden_states(store, "bert-a", checkpoints["seed0"], threads["bert-a"])
    assert_hidden_states(store, "bert-b", checkpoints["seed1"], threads["bert-b"])
    fingerprints = {u: store.unit_info(*u).fingerprint for u in store.units()}

    # The repaired checkpoint is the only work of the rerun.
    shutil.copyfile(checkpoints["seed1"] / "model.safetensors", weights)
    assert main(args) == 0
    summary = last_json(capsys.readouterr().out)
    assert [c["model"] for c in summary["captured"]] == ["broken"]
    assert sorted(summary["skipped"]) == ["bert-a", "bert-b"]
    store.refresh()
    assert {u: store.unit_info(*u).fingerprint for u in store.units() if u[0] != "broken"} \
        == fingerprints
    assert_hidden_states(store, "broken", checkpoints["seed1"], threads_of(summary)["broken"])

    # The two seeds (and the copy of seed 1) align: a job compares them.
    spec = tmp_path / "job.yaml"
    spec.write_text(f"store: {store_url}\noutput: {tmp_path / 'results.zarr'}\n"
                    "metrics: [linear_cka]\ncompute: {precision: float64}\n")
    assert main(["run", str(spec), "--json"]) == 0
    capsys.readouterr()
    cka = xr.open_zarr(tmp_path / "results.zarr")["linear_cka"].values
    assert cka.shape == (9, 9)
    # broken is a copy of bert-b: its units equal bert-b's, CKA 1 across the two models.
    np.testing.assert_allclose(np.diag(cka[3:6, 6:9]), 1.0, atol=1e-9)
    assert np.all(np.diag(cka[0:3, 3:6]) < 1 - 1e-3)  # different seeds differ


def test_submitted_capture_killed_then_resubmitted_completes(ray_cluster, checkpoints,
                                                             probes, tmp_path):
    """A capture spec through the Ray Jobs API. The first submission's driver is stopped
    (SIGTERM, as a scheduler or a node drain would) once one checkpoint is complete and the
    other's task is loading its weights; the resubmitted spec keeps the complete checkpoint
    and captures the other."""
    from ray.job_submission import JobSubmissionClient

    second = shutil.copytree(checkpoints["bert3"], tmp_path / "second")
    store_url = tmp_path / "acts.zarr"
    spec = tmp_path / "capture.yaml"
    spec.write_text(f"store: {store_url}\ncheckpoints:\n  first: {checkpoints['seed0']}\n"
                    f"  second: {second}\ntext: {probes.name}\n")
    assert load_capture_spec(spec).text == str(probes)  # relative to the spec's folder
    client = JobSubmissionClient(ray_cluster.dashboard)

    def submit() -> str:
        workdir = tmp_path / f"submission-{time.monotonic_ns()}"
        workdir.mkdir()
        entrypoint = prepare_submission(spec, workdir)
        assert entrypoint == "repscope capture --spec capture.yaml --json"
        return client.submit_job(entrypoint=entrypoint,
                                 runtime_env={"working_dir": str(workdir)})

    job = submit()
    deadline = time.time() + 300
    _wait(lambda: (store_url / "zarr.json").exists(), client, job, deadline)
    # Planning is done (the store is created after it): the second checkpoint's weights
    # become a pipe, so its task, which runs after the first on this 2-CPU cluster (two
    # CPUs each), blocks when it opens them until the driver is gone.
    weights = second / "model.safetensors"
    weights.rename(tmp_path / "weights")
    os.mkfifo(weights)
    _wait(lambda: ActivationStore.open(str(store_url)).models(), client, job, deadline)
    client.stop_job(job)
    _wait(lambda: _status(client, job) in TERMINAL, client, None, deadline)
    _wait_for_tasks_to_end(ray_cluster)
    weights.unlink()
    (tmp_path / "weights").rename(weights)
    assert _status(client, job) == "STOPPED"
    store = ActivationStore.open(str(store_url))
    assert store.models() == ["first"] and len(store.layers("first")) == 3

    # The resubmission through `repscope submit`, which recognises a capture spec.
    assert main(["submit", str(spec), "--address", ray_cluster.dashboard, "--wait",
                 "--submission-id", "capture-again"]) == 0
    logs = client.get_job_logs("capture-again")
    summary = last_json(logs)
    assert summary["skipped"] == ["first"]
    assert [c["model"] for c in summary["captured"]] == ["second"]
    store.refresh()
    assert store.models() == ["first", "second"]
    assert_hidden_states(store, "second", second, threads_of(summary)["second"])


def _wait(condition, client, job, deadline: float) -> None:
    """Poll ``condition`` until it holds; fail at the deadline or when ``job`` has ended."""
    while not condition():
        if job is not None and _status(client, job) in TERMINAL:
            raise AssertionError(f"the job ended first: {client.get_job_logs(job)}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _status(client, job: str) -> str:
    status = client.get_job_status(job)
    return str(getattr(status, "value", status))


def _wait_for_tasks_to_end(cluster, timeout: float = 60) -> None:
    """Ray ends a dead driver's tasks: wait until no worker of the cluster runs one."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        running = [p for p in psutil.Process(cluster.head.pid).children(recursive=True)
                   if _title(p).startswith("ray::capture_checkpoint")]
        if not running:
            return
        time.sleep(0.5)
    raise AssertionError("the stopped driver's capture task is still running")


def _title(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""
