"""Hand jobs to a Ray cluster through the Ray Jobs API (ray.job_submission).

The spec travels as the job's working directory (one small file), and the entrypoint is
`repscope run spec.yaml --json` on the cluster, so a submitted job is exactly a local run
executed there. Clusters started by `ray start` on Ray 2.59+ use token authentication:
clients need RAY_AUTH_MODE=token and the cluster's token (~/.ray/auth_token or
RAY_AUTH_TOKEN); the token is never printed.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from repscope.errors import InputError, NotFoundError, RepscopeError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_SUBMIT_TRIES = 15
_SUBMISSION_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def client(address: str):
    """A JobSubmissionClient for an http(s) dashboard address, with errors users can act on."""
    from ray.job_submission import JobSubmissionClient

    if not re.match(r"^https?://[^/\s]+", address or ""):
        raise InputError(
            f"--address must be the cluster's dashboard URL such as http://HOST:8265, "
            f"got {address!r}"
        )
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ray raises bare Exceptions/ConnectionErrors here
        raise RepscopeError(_connection_message(address, exc)) from None


def _connection_message(address: str, exc: Exception) -> str:
    text = str(exc)
    if "uthentication" in text:
        return (
            f"the Ray cluster at {address} requires token authentication: set "
            "RAY_AUTH_MODE=token and make its token available (~/.ray/auth_token or "
            "RAY_AUTH_TOKEN)"
        )
    return f"cannot reach the Ray Jobs API at {address}: {type(exc).__name__}"


def submit(
    spec_path: str | Path,
    address: str,
    *,
    submission_id: str | None = None,
    overwrite: bool = False,
    nightly: bool = False,
) -> str:
    """Submit `repscope run` (or `repscope nightly`) of a job spec, or `repscope capture` of a
    capture spec (one that lists checkpoints); returns the submission id.

    An explicit submission_id makes submission idempotent: if a job with that id exists
    already, its id is returned and nothing new is submitted (safe for schedulers).
    """
    from repscope.jobs.capture_spec import is_capture_spec
    from repscope.jobs.spec import load_spec

    spec_path = Path(spec_path)
    capture = is_capture_spec(spec_path)
    if capture and nightly:
        raise InputError(f"{spec_path} is a capture spec: --nightly applies to job specs")
    # Refuse a bad spec here, not on the cluster.
    text = None if capture else cluster_spec_text(spec_path, load_spec(spec_path))
    if submission_id is not None and not _SUBMISSION_ID.match(submission_id):
        raise InputError(f"submission id {submission_id!r} may hold only letters, digits, _ . -")
    c = client(address)
    if submission_id is not None:
        try:
            c.get_job_info(submission_id)
            return submission_id
        except RuntimeError:
            pass  # no such job yet
    workdir = Path(tempfile.mkdtemp(prefix="repscope-submit-"))
    try:
        if capture:
            from repscope.jobs.capture import prepare_submission

            entrypoint = prepare_submission(spec_path, workdir, overwrite=overwrite)
        else:
            (workdir / "spec.yaml").write_text(text)
            command = "nightly" if nightly else "run"
            entrypoint = (f"repscope {command} spec.yaml --json"
                          + (" --overwrite" if overwrite else ""))
        # A freshly started head answers "No available agent" for a few seconds: retry
        # that (bounded); anything else is reported at once.
        for attempt in range(_SUBMIT_TRIES):
            try:
                return c.submit_job(
                    entrypoint=entrypoint,
                    submission_id=submission_id,
                    runtime_env={"working_dir": str(workdir)},
                    metadata={"tool": "repscope", "spec": spec_path.name},
                )
            except RuntimeError as exc:
                if "No available agent" not in str(exc) or attempt + 1 == _SUBMIT_TRIES:
                    raise RepscopeError(
                        f"the Ray Jobs API at {address} refused the job: {exc}"
                    ) from None
                time.sleep(2)
        raise AssertionError("unreachable")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def cluster_spec_text(spec_path: Path, spec) -> str:
    """The spec as the cluster's driver will read it: relative local paths (store, output)
    made absolute, since only the spec travels and the driver runs in another folder;
    memory:// refused, since the cluster cannot see this process's memory."""
    import yaml

    from repscope.store.urls import local_path, scheme_of

    raw = yaml.safe_load(spec_path.read_text())
    for key in ("store", "output"):
        url = getattr(spec, key)
        if scheme_of(url) == "memory":
            raise InputError(f"{spec_path}: {key} {url!r} is in this process's memory, which "
                             "the cluster cannot read; use a path the cluster shares or an "
                             "object store (s3://, gs://)")
        if scheme_of(url) == "file" and not local_path(url).is_absolute():
            # Relative to where the command runs, as for `repscope run`.
            raw[key] = str(local_path(url).absolute())
    return yaml.safe_dump(raw, sort_keys=False)


def _known(c, submission_id: str):
    try:
        return c.get_job_info(submission_id)
    except RuntimeError:
        raise NotFoundError(f"no job {submission_id!r} on this cluster") from None


def status(address: str, submission_id: str) -> dict:
    info = _known(client(address), submission_id)
    return {
        "submission_id": submission_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message or "",
        "entrypoint": info.entrypoint,
    }


def logs(address: str, submission_id: str) -> str:
    c = client(address)
    _known(c, submission_id)
    return c.get_job_logs(submission_id)


def stop(address: str, submission_id: str) -> bool:
    c = client(address)
    _known(c, submission_id)
    return bool(c.stop_job(submission_id))


def wait(address: str, submission_id: str, *, out: TextIO | None = None, poll: float = 1.0) -> str:
    """Follow a job's logs until it ends; returns its final status."""
    out = out or sys.stdout
    c = client(address)
    _known(c, submission_id)

    async def follow():
        async for chunk in c.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(follow())
    except Exception:  # log streaming is best effort; status below is authoritative
        pass
    while True:
        state = status(address, submission_id)["status"]
        if state in TERMINAL:
            return state
        time.sleep(poll)
