"""tests/reference is a copy of ../shared/reference for clones without the shared folder:
it must not drift from the original."""

from __future__ import annotations

import pytest

from tests.conftest import REPO

SHARED = REPO.parent / "shared" / "reference"


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/reference beside this clone")
def test_vendored_reference_equals_shared():
    copy = REPO / "tests" / "reference"
    names = sorted(p.name for p in SHARED.iterdir())
    assert names == sorted(p.name for p in copy.iterdir())
    for name in names:
        assert (SHARED / name).read_bytes() == (copy / name).read_bytes(), name
