"""Memory pages: numpy's huge-page advice off while repscope computes, where it can stall.

numpy asks Linux for transparent huge pages on every large array (``madvise(MADV_HUGEPAGE)``).
Where the kernel's THP ``defrag`` setting makes such requests compact memory synchronously
(``madvise``, the default of most distributions, ``defer+madvise`` and ``always``), the first
touch of a fresh array waits for that compaction whenever no huge page is free, which is the
usual state of a machine whose page cache holds the activations just read (numpy issue 31590).
A job allocates its accumulators, row blocks and Grams fresh, so it pays that wait on most of
its memory; docs/performance.md has the measurement. Plain pages cost a steady, much smaller
page fault. A user's ``NUMPY_MADVISE_HUGEPAGE`` is left to decide.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np

__all__ = ["huge_page_advice_stalls", "plain_pages", "on_plain_pages"]

DEFRAG = "/sys/kernel/mm/transparent_hugepage/defrag"
STALLING = frozenset({"always", "madvise", "defer+madvise"})


def huge_page_advice_stalls(defrag: str | None = None) -> bool:
    """Whether numpy's huge-page advice makes page faults compact memory synchronously here:
    the kernel's chosen ``defrag`` mode (the bracketed word) is one that does, and the user has
    not set ``NUMPY_MADVISE_HUGEPAGE``."""
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return False
    try:
        with open(defrag or DEFRAG) as f:
            text = f.read()
    except OSError:  # not Linux, or no THP
        return False
    start, end = text.find("["), text.find("]")
    return 0 <= start < end and text[start + 1:end] in STALLING


@contextlib.contextmanager
def plain_pages() -> Iterator[None]:
    """Within: numpy allocates without huge-page advice where that advice stalls (see the
    module docstring); the previous setting comes back after."""
    # numpy's switch is private; its public form is the environment variable, read only when
    # numpy is imported, which is too late for a process that imported numpy before us.
    setter = getattr(getattr(np, "_core", None), "multiarray", None)
    setter = getattr(setter, "_set_madvise_hugepage", None)
    if setter is None or not huge_page_advice_stalls():
        yield
        return
    before = setter(False)
    try:
        yield
    finally:
        setter(before)


F = TypeVar("F", bound=Callable)


def on_plain_pages(function: F) -> F:
    """``function`` run within :func:`plain_pages`: a plain function wrapping it, which Ray
    can send to workers (a context manager used as a decorator is not picklable)."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        with plain_pages():
            return function(*args, **kwargs)

    return run  # type: ignore[return-value]
