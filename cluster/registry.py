"""The metric registry: every metric's name and what the planner and finalizers need to know.

Names are the interface (specs, results variables, the CLI); :func:`check_metrics` validates
a selection with a hint for misspelt names.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

from repscope.errors import InputError

__all__ = ["Metric", "METRICS", "CCA_FAMILY", "FewRowsWarning", "check_metrics"]

@dataclass(frozen=True)
class Metric:
    """What the planner and finalizers need to know about one metric.

    Attributes
    ----------
    name : the interface name.
    direction : "similarity" (larger is more alike) or "distance" (0 is identical).
    symmetric : whether value(x, y) == value(y, x).
    needs_fourth : needs the fourth-order moments (``block_moments(..., fourth=True)``).
    needs_whitening : needs Cxx^(-1/2) (the CCA family): undefined for a zero-variance unit.
    """

    name: str
    direction: str
    symmetric: bool = True
    needs_fourth: bool = False
    needs_whitening: bool = False


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("linear_cka", "similarity"),
        Metric("linear_cka_debiased", "similarity", needs_fourth=True),
        Metric("mean_cca", "similarity", needs_whitening=True),
        Metric("mean_sq_cca", "similarity", needs_whitening=True),
        Metric("svcca", "similarity", needs_whitening=True),
        Metric("pwcca", "similarity", symmetric=False, needs_whitening=True),
        Metric("procrustes", "distance"),
    )
}

#: Metrics finished from the canonical correlations of whitened moments.
CCA_FAMILY = ("mean_cca", "mean_sq_cca", "pwcca")


class FewRowsWarning(UserWarning):
    """A unit has at least as many features as rows: the CCA family is degenerate."""


def check_metrics(names: str | Iterable[str] | None) -> tuple[str, ...]:
    """Validated metric names, in the given order without repeats; None means all metrics.

    Raises
    ------
    InputError
        For an unknown name, suggesting the closest known one; for an empty selection.
    """
    if names is None:
        return tuple(METRICS)
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for name in names:
        if name not in METRICS:
            close = difflib.get_close_matches(str(name), list(METRICS), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InputError(
                f"unknown metric {name!r}{hint} (known: {', '.join(METRICS)})"
            )
        if name not in out:
            out.append(name)
    if not out:
        raise InputError(f"no metric selected (known: {', '.join(METRICS)})")
    return tuple(out)
