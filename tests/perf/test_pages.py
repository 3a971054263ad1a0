"""numpy's huge-page advice is off while repscope computes where the kernel would stall on it
(cluster/pages.py), and back as it was after; the user's own setting wins."""

from __future__ import annotations

import numpy as np
import pytest

from repscope.cluster import pages

setter = np._core.multiarray._set_madvise_hugepage


@pytest.mark.parametrize("text, stalls", [
    ("always defer defer+madvise [madvise] never\n", True),
    ("always defer [defer+madvise] madvise never\n", True),
    ("[always] defer defer+madvise madvise never\n", True),
    ("always [defer] defer+madvise madvise never\n", False),
    ("always defer defer+madvise madvise [never]\n", False),
    ("", False),
])
def test_which_defrag_modes_stall(tmp_path, monkeypatch, text, stalls):
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    (tmp_path / "defrag").write_text(text)
    assert pages.huge_page_advice_stalls(str(tmp_path / "defrag")) is stalls


def test_no_thp_and_the_users_setting_mean_leave_it(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    assert pages.huge_page_advice_stalls(str(tmp_path / "missing")) is False
    (tmp_path / "defrag").write_text("[madvise] never\n")
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    assert pages.huge_page_advice_stalls(str(tmp_path / "defrag")) is False


def _advice_now() -> bool:
    before = setter(True)
    setter(before)
    return before


@pytest.mark.parametrize("stalls", [True, False])
def test_plain_pages_switches_the_advice_off_and_back(monkeypatch, stalls):
    monkeypatch.setattr(pages, "huge_page_advice_stalls", lambda: stalls)
    previous = setter(True)
    try:
        with pages.plain_pages():
            assert _advice_now() is (not stalls)
        assert _advice_now() is True

        @pages.on_plain_pages
        def inside(x):
            return x, _advice_now()

        assert inside(3) == (3, not stalls)
        assert inside.__name__ == "inside"
    finally:
        setter(previous)


def test_a_wrapped_task_can_be_sent_to_ray_workers():
    """Ray pickles task functions with cloudpickle: the wrapper must survive it."""
    from ray import cloudpickle

    from repscope.cluster.tasks import accumulate_tile

    wrapped = cloudpickle.loads(cloudpickle.dumps(pages.on_plain_pages(accumulate_tile)))
    assert wrapped.__wrapped__ is accumulate_tile
