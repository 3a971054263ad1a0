"""Principal-component deletion probes (sensitivity), from a unit's moments alone.

Ding, Denain & Steinhardt (2021) test whether a metric is *sensitive*: deleting principal
components of a layer changes what the layer can do, so a good metric should move away from
the original as more components go. Their figure plots metric distance against the fraction
of principal components deleted. Here no second pass over the data is needed.

Deleting a set D of principal directions of X (n x p) maps every row x to P x with the
projection ``P = I - U_D U_D^T`` (U_D: the deleted eigenvectors of Cxx). Because P is linear:

    mean' = P mean,   C'xx = P Cxx P,   C(x, x') = Cxx P

so the deleted unit's moments and its cross moments with the original follow from (n, mean,
Cxx). Every metric is then finished by :func:`repscope.cluster.pairs.compare_pair`, the same code a
job uses: there is no second implementation of any metric.

Two metrics are excluded:

- Debiased CKA needs ``sum_i ||x^_i||^2 ||P x^_i||^2`` and ``sum_i ||P x^_i||^4``, fourth-order
  sums over the rows that depend on the full fourth-moment tensor of X, not on the streamed
  second moments (nor on ``sum_i ||x^_i||^4``). Computing them needs the rows again.
- PWCCA is not well defined here: between X and X P every canonical correlation is exactly 1
  (kept directions) or 0, so the canonical directions are *any* orthonormal basis of the kept
  subspace, and PWCCA's L1 weights ``sum_j |(Cxx Wx u_i)_j|`` change with that arbitrary
  basis. Measured: recomputing from the raw rows, 1e-9 noise moves it by ~1e-2 (0.820 to
  0.831 for 6 of 12 directions deleted). The other CCA metrics only use the correlations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from repscope.cluster.caches import prepare_unit
from repscope.cluster.moments import PairMoments, UnitMoments
from repscope.cluster.pairs import compare_pair
from repscope.cluster.rank import AmbiguousRankError, spectrum
from repscope.cluster.rankstats import as_distance
from repscope.cluster.registry import check_metrics
from repscope.errors import InputError

__all__ = [
    "PROBE_METRICS",
    "ProbePoint",
    "deletion_projection",
    "deleted_moments",
    "deletion_counts",
    "pc_deletion_probe",
]

#: Debiased CKA needs fourth-order sums of the deleted rows (not a function of the moments);
#: PWCCA depends on an arbitrary basis of tied canonical correlations (module docstring).
UNSUPPORTED = ("linear_cka_debiased", "pwcca")


def probe_metrics(metrics: Iterable[str] | None) -> tuple[str, ...]:
    """The requested metrics that PC deletion supports (debiased CKA and PWCCA dropped)."""
    return tuple(k for k in check_metrics(metrics) if k not in UNSUPPORTED)


PROBE_METRICS = probe_metrics(None)


@dataclass(frozen=True)
class ProbePoint:
    """One rung of the ladder: ``k`` directions deleted from the ``end`` ("lowest" or
    "highest" variance), ``fraction = k / p``; ``distance[metric]`` is the metric's distance
    (1 - similarity, or Procrustes as is) between the original and the deleted unit;
    ``variance_kept`` is tr C'xx / tr Cxx."""

    end: str
    k: int
    fraction: float
    variance_kept: float
    distance: dict[str, float]


def deletion_projection(evecs: np.ndarray, deleted: np.ndarray) -> np.ndarray:
    """``P = I - U_D U_D^T``: ndarray of shape (p, p), for evecs (p, p) and column indices D."""
    u = evecs[:, deleted]
    return np.eye(evecs.shape[0]) - u @ u.T


def deleted_moments(m: UnitMoments, p_mat: np.ndarray) -> tuple[UnitMoments, PairMoments]:
    """Moments of the projected unit X P and its cross moments with X.

    Rows x -> P x, so (P symmetric) ``mean' = P mean``, ``C'xx = P Cxx P`` and
    ``C(x, x') = sum_i x^_i (P x^_i)^T = Cxx P``. The result is symmetrised against rounding.
    Fourth-order sums are not available (see the module docstring).
    """
    c_del = p_mat @ m.cxx @ p_mat
    c_del = 0.5 * (c_del + c_del.T)
    return UnitMoments(m.n, p_mat @ m.mean, c_del), PairMoments(m.cxx @ p_mat)


def deletion_counts(p: int, fractions: Sequence[float]) -> list[int]:
    """Directions deleted for each fraction: ``round(f p)``, capped at p - 1 (deleting all of
    them leaves a zero-variance unit, where every metric is 0/0). Sorted, without repeats."""
    out = set()
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise InputError(f"PC deletion fractions must be in [0, 1], got {f}")
        out.add(min(int(round(f * p)), p - 1))
    return sorted(out)


def pc_deletion_probe(
    m: UnitMoments,
    fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
    metrics: Iterable[str] | None = None,
    *,
    ends: Sequence[str] = ("lowest", "highest"),
    svcca_threshold: float = 0.99,
    precision: str | type | np.dtype = "float32",
    data_dtype: str | type | np.dtype = "float32",
    eig_floor: float | None = None,
    name: str = "unit",
) -> list[ProbePoint]:
    """Distance between a unit and itself with k principal directions deleted, for a ladder.

    Parameters
    ----------
    m : the unit's moments (n rows, p features).
    fractions : fractions of the p directions to delete (k = round(f p), at most p - 1).
    metrics : names (None: all but debiased CKA and PWCCA; naming either is an InputError).
    ends : "lowest" deletes the k smallest-variance directions, "highest" the k largest.
    precision, data_dtype, eig_floor : the rank decision's inputs, as
        :func:`~repscope.cluster.caches.prepare_unit`'s. Every deleted unit keeps the
        original's absolute cut: its moments carry the original's rounding noise, whose
        size is set by the original's largest eigenvalue, not by what deletion leaves.
    name : the unit's name for messages.

    Raises
    ------
    AmbiguousRankError
        Float32 moments whose rank is ambiguous (recompute the unit's moments in float64).

    Returns
    -------
    list of ProbePoint, ``ends`` major, k ascending.

    Notes
    -----
    At the highest end k stops at rank - 1 (deleting every direction above the rank cut
    leaves rounding noise, where every metric is 0/0).
    One eigh of Cxx, then per rung a few p x p products, one :func:`prepare_unit` of the
    deleted unit (an O(p^3) eigh when a CCA-family metric is asked) and one compare: O(p^3)
    per rung, independent of n. Directions of equal variance are deleted in eigh's order.
    The deleted unit is rank deficient: the rank cut drops its deleted directions, which
    therefore count as canonical correlations 0 (CCA family).
    """
    requested = check_metrics(metrics)
    bad = [k for k in requested if k in UNSUPPORTED]
    if metrics is not None and bad:
        raise InputError(
            f"{', '.join(bad)} cannot be probed by PC deletion (debiased CKA needs fourth-order "
            "sums of the deleted rows, PWCCA is basis-dependent there; docs/grounding.md); "
            "drop it from the probe metrics"
        )
    metrics = probe_metrics(requested)
    for end in ends:
        if end not in ("lowest", "highest"):
            raise InputError(f"PC deletion end must be 'lowest' or 'highest', got {end!r}")
    p = m.cxx.shape[0]
    evals, evecs = spectrum(m.cxx)  # descending
    evals = np.maximum(evals, 0.0)
    total = float(evals.sum())
    original = prepare_unit(m, metrics, svcca_threshold=svcca_threshold, precision=precision,
                            data_dtype=data_dtype, eig_floor=eig_floor, name=name)
    if original.ambiguous is not None and original.precision == "float32":
        raise AmbiguousRankError(
            f"unit {name!r}: float32 moments cannot decide its rank ({original.ambiguous}); "
            "recompute its moments in float64 for the PC-deletion probe")
    # Beyond the rank only rounding noise is left: the highest end stops one short of it.
    last = p - 1 if original.rank is None else original.rank - 1
    out = []
    for end in ends:
        counts = deletion_counts(p, fractions)
        if end == "highest":
            counts = sorted({min(k, last) for k in counts})
        for k in counts:
            # Descending order: the k highest are the first k, the k lowest the last k.
            deleted = np.arange(k) if end == "highest" else np.arange(p - k, p)
            unit, cross = deleted_moments(m, deletion_projection(evecs, deleted))
            cache = prepare_unit(unit, metrics, svcca_threshold=svcca_threshold,
                                 precision=precision, data_dtype=data_dtype,
                                 cut=original.cut, name=f"{name} minus {k} {end} PCs")
            values = compare_pair(original, cache, cross, metrics)
            kept = float(np.delete(evals, deleted).sum()) / total
            out.append(ProbePoint(end, k, k / p, kept,
                                  {key: as_distance(key, xy) for key, (xy, _) in values.items()}))
    return out
