"""Shared test fixtures.

Fixtures that start real services live in their own modules and are imported here so every
test directory can use them:
- tests/s3server.py: ``s3_server`` (moto in server mode on a free loopback port)
- tests/raycluster.py: ``ray_cluster`` (``ray start --head --block`` on loopback)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
