"""Shared test fixtures.

Fixtures that start real services live in their own modules and are imported here so every
test directory can use them:
- tests/s3server.py: ``s3_server`` (moto in server mode on a free loopback port)
- tests/raycluster.py: ``ray_cluster`` (``ray start --head --block`` on loopback)
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _isolate_from_home() -> Path:
    """Give the test session its own HOME and Ray token, before anything imports Ray.

    Ray's ``ray.init`` writes ``~/.ray/auth_token`` and ``ray start`` with token auth reads
    it; matplotlib caches fonts under ``~/.cache``. Tests never touch the user's HOME: the
    session gets a fresh one, and every Ray instance (embedded or ``ray start``) the token in
    ``RAY_AUTH_TOKEN_PATH`` (token mode on), so nothing depends on what an earlier run left
    behind.
    """
    root = Path(tempfile.mkdtemp(prefix="repscope-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    (root / "home").mkdir()
    token = root / "ray-auth-token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ["HOME"] = str(root / "home")
    # Token mode from the start: Ray reads it once per process (at import), and every
    # instance of the session, embedded or `ray start`, uses this token.
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    for name in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "MPLCONFIGDIR", "XDG_CACHE_HOME",
                 "XDG_CONFIG_HOME"):
        os.environ.pop(name, None)
    return root


SESSION_ROOT = _isolate_from_home()


def reference_dir() -> Path:
    """The reference activations and values: $REPSCOPE_REFERENCE if set, else the shared
    folder beside the checkout (../shared/reference), else the copy in tests/reference
    (for clones that have no shared folder beside them)."""
    if "REPSCOPE_REFERENCE" in os.environ:
        candidates = [Path(os.environ["REPSCOPE_REFERENCE"])]
    else:
        candidates = [REPO.parent / "shared" / "reference", REPO / "tests" / "reference"]
    for path in candidates:
        if (path / "values.json").is_file():
            return path
    raise FileNotFoundError(
        f"reference data not found in {', '.join(map(str, candidates))}; set "
        "REPSCOPE_REFERENCE to the folder that holds values.json"
    )


@pytest.fixture(scope="session")
def reference() -> Path:
    return reference_dir()


@pytest.fixture(scope="session")
def demo_output(tmp_path_factory) -> Path:
    """`make demo`'s output folder (``<repo>/demo-output``, in a folder of its own), made
    once for the session; what it printed is in ``demo-output/printed.txt``."""
    import contextlib
    import io

    from repscope.jobs.demo import main

    out = tmp_path_factory.mktemp("repo") / "demo-output"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--out", str(out)]) == 0
    (out / "printed.txt").write_text(printed.getvalue())
    return out


@pytest.fixture(scope="module")
def embedded_ray():
    """The embedded local Ray instance `repscope run` starts in this process; shut down
    after the module so that later modules start from a clean state."""
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


try:
    from tests.s3server import s3_server  # noqa: F401
except ModuleNotFoundError:
    pass
try:
    from tests.raycluster import ray_cluster  # noqa: F401
except ModuleNotFoundError:
    pass
