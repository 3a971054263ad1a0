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
    """The shared reference activations: $REPSCOPE_REFERENCE or ../shared/reference."""
    path = Path(os.environ.get("REPSCOPE_REFERENCE", REPO.parent / "shared" / "reference"))
    if not (path / "values.json").is_file():
        raise FileNotFoundError(
            f"reference data not found at {path}; set REPSCOPE_REFERENCE to the folder that "
            "holds values.json"
        )
    return path


@pytest.fixture(scope="session")
def reference() -> Path:
    return reference_dir()


try:
    from tests.s3server import s3_server  # noqa: F401
except ModuleNotFoundError:
    pass
try:
    from tests.raycluster import ray_cluster  # noqa: F401
except ModuleNotFoundError:
    pass
