"""Fixtures for store tests: one store URL per backend (local dir, memory://, s3:// on moto)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from repscope.store import ActivationStore


@dataclass
class Backend:
    """A place to create stores: ``url(name)`` plus the storage options it needs."""

    name: str
    base: str
    storage_options: dict | None = None

    def url(self, name: str | None = None) -> str:
        return f"{self.base}/{name or uuid.uuid4().hex[:12]}"

    def create(self, name: str | None = None) -> ActivationStore:
        return ActivationStore.create(self.url(name), self.storage_options)


@pytest.fixture
def local(tmp_path) -> Backend:
    return Backend("local", str(tmp_path))


@pytest.fixture
def memory() -> Backend:
    return Backend("memory", f"memory://repscope-tests/{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["local", "memory", "s3"])
def backend(request, tmp_path) -> Backend:
    """Each test using this runs on local disk, memory:// and S3 (moto server on loopback)."""
    if request.param == "local":
        return Backend("local", str(tmp_path))
    if request.param == "memory":
        return Backend("memory", f"memory://repscope-tests/{uuid.uuid4().hex[:12]}")
    s3 = request.getfixturevalue("s3_server")
    return Backend("s3", f"s3://{s3.bucket}/{uuid.uuid4().hex[:12]}", s3.storage_options)


@pytest.fixture
def store(memory) -> ActivationStore:
    """A fresh empty store in memory://."""
    return memory.create()
