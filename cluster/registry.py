"""The metric registry: every metric's name and what the planner and finalizers need to know.

Names are the interface (specs, results variables, the CLI); :func:`check_metrics` validates
a selection with a hint for misspelt names.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

from repscope.errors import InputError

__all__ = ["Metric", "METRICS", "CCA_FAMILY", "FewRowsWarning", "check_metrics",
           "metric_attributes"]

@dataclass(frozen=True)
class Metric:
    """What the planner and finalizers need to know about one metric.

    Attributes
    ----------
    name : the interface name.
    direction : "similarity" (larger is more alike) or "distance" (0 is identical).
    symmetric : whether value(x, y) == value(y, x).
    needs_fourth : needs the fourth-order moments (``block_moments(..., fourth=True)``).
    needs_whitening : whitens the kept directions of Cxx (the CCA family and SVCCA), so the
        unit's rank decision applies.
    convention : what the value means in one sentence, recorded with every result.
    """

    name: str
    direction: str
    symmetric: bool = True
    needs_fourth: bool = False
    needs_whitening: bool = False
    convention: str = ""


_RANK = ("directions of each unit below its rank cut (rounding noise at the precision of "
         "its statistics, or compute.eig_floor) are dropped")

METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("linear_cka", "similarity",
               convention="||Cxy||_F^2 / (||Cxx||_F ||Cyy||_F) (Kornblith et al. 2019)"),
        Metric("linear_cka_debiased", "similarity", needs_fourth=True,
               convention="unbiased HSIC estimator of linear CKA (Song et al. 2012; "
                          "Kornblith et al. 2019, debiased=True)"),
        Metric("mean_cca", "similarity", needs_whitening=True,
               convention="mean of the canonical correlations over min(p, q) features; "
                          f"{_RANK} and count as correlation 0 (sim_metric mean_cca_corr)"),
        Metric("mean_sq_cca", "similarity", needs_whitening=True,
               convention="mean of the squared canonical correlations over min(p, q) "
                          f"features; {_RANK} and count as 0 (sim_metric mean_sq_cca_corr)"),
        Metric("svcca", "similarity", needs_whitening=True,
               convention="mean canonical correlation of each side's fewest principal "
                          "directions explaining svcca_threshold of the variance, at most "
                          "the unit's rank (Raghu et al. 2017)"),
        Metric("pwcca", "similarity", symmetric=False, needs_whitening=True,
               convention="canonical correlations weighted by x's variates: weights "
                          "sum_j |<h_i, x_j>| over the k = min(rank x, rank y) variates that "
                          "exist, normalised over those k (Morcos et al. 2018); entry [i, j] "
                          "weights by unit i; equals 1 - sim_metric's pwcca_dist for full-rank "
                          "units with p <= q"),
        Metric("procrustes", "distance",
               convention="2 - 2 ||Cxy||_* / sqrt(tr Cxx tr Cyy): squared orthogonal "
                          "Procrustes distance after centering and unit Frobenius scaling "
                          "(Ding et al. 2021), in [0, 2]"),
    )
}

#: Metrics finished from the canonical correlations of whitened moments.
CCA_FAMILY = ("mean_cca", "mean_sq_cca", "pwcca")


def metric_attributes(name: str) -> dict[str, str | bool]:
    """What a results store records beside metric ``name``'s matrix: its direction,
    symmetry, convention, and whether the units' rank decision applies (``rank_cut``)."""
    m = METRICS[check_metrics(name)[0]]
    return {"direction": m.direction, "symmetric": m.symmetric,
            "convention": m.convention, "rank_cut": m.needs_whitening}


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
