"""The metric registry: every metric's name and what the planner and finalizers need to know.

Names are the interface (specs, results variables, the CLI); :func:`check_metrics` validates
a selection with a hint for misspelt names, :func:`metric_options` a metric's parameters.

Families (how a metric is computed):

- ``moments``: finished from feature-space moments by :mod:`repscope.cluster.pairs`;
- ``shape``: from the same moments, by :mod:`repscope.cluster.shape`;
- ``kernel``: from n x n kernels or dissimilarities over the rows, streamed in row-block
  tiles (:mod:`repscope.cluster.kernel_tiles`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

from repscope.errors import InputError

__all__ = ["Metric", "METRICS", "MOMENT_METRICS", "KERNEL_METRICS", "SHAPE_METRICS",
           "CCA_FAMILY", "FewRowsWarning", "check_metrics", "metric_options",
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
    family : "moments", "shape" or "kernel" (module docstring).
    options : the metric's parameters and their defaults, as a spec's ``metric_options``
        sets them (checked by :func:`metric_options`).
    convention : what the value means in one sentence, recorded with every result.
    """

    name: str
    direction: str
    symmetric: bool = True
    needs_fourth: bool = False
    needs_whitening: bool = False
    family: str = "moments"
    options: tuple[tuple[str, object], ...] = ()
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
        Metric("shape_angular", "distance", family="shape", options=(("alpha", 0.5),),
               convention="arccos(||Xw'Yw||_* / (||Xw||_F ||Yw||_F)) of partially whitened, "
                          "centered units (netrep LinearMetric, score_method='angular'), in "
                          "[0, pi/2]"),
        Metric("rbf_cka", "similarity", family="kernel", options=(("threshold", 1.0),),
               convention="CKA of centered RBF Grams, bandwidth^2 = threshold^2 x the median "
                          "squared distance between rows (Kornblith et al. 2019, gram_rbf)"),
        Metric("rsa", "similarity", family="kernel",
               options=(("rdm", "correlation"), ("compare", "spearman")),
               convention="rank (spearman) or pearson correlation of the units' RDM upper "
                          "triangles (rsatoolbox calc_rdm, compare)"),
        Metric("mutual_knn", "similarity", family="kernel", options=(("k", 10),),
               convention="mean over rows of |N_x(i) & N_y(i)| / k, neighbours by cosine with "
                          "the row itself excluded (Huh et al. 2024)"),
    )
}

#: The metrics of each family, in registry order.
MOMENT_METRICS = tuple(m for m, v in METRICS.items() if v.family == "moments")
SHAPE_METRICS = tuple(m for m, v in METRICS.items() if v.family == "shape")
KERNEL_METRICS = tuple(m for m, v in METRICS.items() if v.family == "kernel")

# Choices of the string options; numbers are checked by _check_number.
_CHOICES = {("rsa", "rdm"): ("correlation", "euclidean"),
            ("rsa", "compare"): ("spearman", "pearson")}

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
    """Validated metric names, in the given order without repeats.

    None means the moment metrics (:data:`MOMENT_METRICS`, the default of the feature-space
    functions such as ``compare_arrays``); every family's names are accepted.

    Raises
    ------
    InputError
        For an unknown name, suggesting the closest known one; for an empty selection.
    """
    if names is None:
        return MOMENT_METRICS
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for name in names:
        if name not in METRICS:
            close = difflib.get_close_matches(str(name), list(METRICS), n=1, cutoff=0.5)
            # A short name inside a longer one ("knn" for "mutual_knn") is a near miss too.
            close = close or [m for m in METRICS if str(name).lower() in m][:1]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InputError(
                f"unknown metric {name!r}{hint} (known: {', '.join(METRICS)})"
            )
        if name not in out:
            out.append(name)
    if not out:
        raise InputError(f"no metric selected (known: {', '.join(METRICS)})")
    return tuple(out)


def _check_number(metric: str, key: str, value) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{metric}.{key} must be a number, got {value!r}")
    if key == "k":
        if not isinstance(value, int) or value < 1:
            raise InputError(f"mutual_knn.k must be an integer >= 1, got {value!r}")
        return int(value)
    if key == "alpha" and not 0.0 <= value <= 1.0:
        raise InputError(f"shape_angular.alpha must be in [0, 1], got {value!r}")
    if key == "threshold" and not value > 0:
        raise InputError(f"rbf_cka.threshold must be > 0, got {value!r}")
    return float(value)


def metric_options(metric: str, given: dict | None = None) -> dict:
    """A metric's parameters: its defaults updated with ``given``, checked.

    Raises
    ------
    InputError
        For a parameter the metric does not have (with the closest name), a value of the
        wrong type or out of range.
    """
    defaults = dict(METRICS[metric].options)
    out = dict(defaults)
    for key, value in (given or {}).items():
        if key not in defaults:
            close = difflib.get_close_matches(str(key), list(defaults), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(defaults) or "none"
            raise InputError(f"{metric} has no parameter {key!r}{hint} (parameters: {known})")
        choices = _CHOICES.get((metric, key))
        if choices is not None:
            if value not in choices:
                raise InputError(f"{metric}.{key} must be one of {', '.join(choices)}, "
                                 f"got {value!r}")
            out[key] = value
        else:
            out[key] = _check_number(metric, key, value)
    return out
