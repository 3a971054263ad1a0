"""The pairwise driver: full (U, U) similarity matrices from per-unit and per-pair work.

:func:`similarity_matrices` prepares each unit once (:mod:`repscope.cluster.caches`) and
finishes each pair (:mod:`repscope.cluster.pairs`) on a few threads, one BLAS thread each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from repscope.cluster.caches import UnitCache, ambiguous_units, prepare_unit
from repscope.cluster.moments import PairMoments, UnitMoments
from repscope.cluster.pairs import canonical_pairs, compare_pair, nuclear_norms, self_pair
from repscope.cluster.rank import AmbiguousRankError
from repscope.cluster.registry import CCA_FAMILY, METRICS, check_metrics
from repscope.errors import InputError

__all__ = ["similarity_matrices"]


def _check_ambiguous(prepared: dict[int, UnitCache], policy: str) -> None:
    bad = ambiguous_units(prepared)
    if bad and policy == "refuse":
        first = prepared[bad[0]]
        raise AmbiguousRankError(
            f"float32 statistics cannot decide the rank of {len(bad)} unit(s): "
            f"{', '.join(repr(prepared[i].name) for i in bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''} ({first.name}: {first.ambiguous}); "
            "recompute them in float64 (compute.ambiguous_rank: recompute, or "
            "compute.precision: float64) or set compute.eig_floor"
        )

def similarity_matrices(
    units: Sequence[UnitMoments | None],
    cross: Callable[[int, int], PairMoments],
    metrics: Iterable[str] | None = None,
    *,
    names: Sequence[str] | None = None,
    precision: str | type | np.dtype = "float32",
    data_dtype: str | type | np.dtype = "float32",
    svcca_threshold: float = 0.99,
    eig_floor: float | None = None,
    ambiguous: str = "refuse",
    pairs: Iterable[tuple[int, int]] | None = None,
    threads: int = 1,
    caches: dict[int, UnitCache] | None = None,
) -> dict[str, np.ndarray]:
    """The pairwise driver: full (U, U) matrices per metric.

    Parameters
    ----------
    units : the U units' moments (None for a unit whose cache is in ``caches``).
    cross : ``cross(i, j)`` for i <= j returns the PairMoments of units i and j (for i == j,
        Cxy = Cxx of the unit).
    metrics : names (None: all).
    names : unit names for messages (default "unit i").
    precision : the products' dtype (the accumulator's gemm_dtype): it sets each unit's
        rank cut (:mod:`repscope.cluster.rank`). data_dtype: the activations' storage dtype.
    eig_floor : an explicit relative rank cut (``compute.eig_floor``), None: derived.
    ambiguous : what to do with a unit whose float32 rank is ambiguous (no clear gap
        between signal and rounding noise): "refuse" raises AmbiguousRankError naming the
        units before any pair is finished; "keep" finishes it, for a caller that then
        recomputes those units in float64 (``ambiguous_units(caches)`` lists them).
    pairs : the (i, j) to compute (either order; default all i <= j); the others are NaN, for
        incremental runs.
    threads : prepare units and compare pairs on this many threads (one BLAS thread each).
    caches : per-unit work already done, by unit index; units prepared here are added to it,
        so a caller finishing a job tile by tile prepares each unit once.

    Returns
    -------
    dict mapping metric name to ndarray of shape (U, U); entry [i, j] is value(unit i, unit j)
    (PWCCA: weighted by unit i's canonical variates).

    Notes
    -----
    U prepares (each O(p^3), only for units in ``pairs``) and one compare per pair.
    """
    metrics = check_metrics(metrics)
    count = len(units)
    names = [f"unit {i}" for i in range(count)] if names is None else list(names)
    if len(names) != count:
        raise InputError(f"{len(names)} names for {count} units")
    if pairs is None:
        todo = [(i, j) for i in range(count) for j in range(i, count)]
    else:
        todo = []
        for i, j in pairs:
            if not (0 <= i < count and 0 <= j < count):
                raise InputError(f"pair ({i}, {j}) out of range for {count} units")
            todo.append((min(i, j), max(i, j)))
        todo = sorted(set(todo))
    if ambiguous not in ("refuse", "keep"):
        raise InputError(f"ambiguous must be 'refuse' or 'keep', got {ambiguous!r}")

    def prepare(i: int) -> UnitCache:
        return prepare_unit(units[i], metrics, precision=precision, data_dtype=data_dtype,
                            svcca_threshold=svcca_threshold, eig_floor=eig_floor,
                            name=names[i])

    whiten = any(METRICS[k].needs_whitening for k in metrics)
    cca_family = any(k in CCA_FAMILY for k in metrics)
    # Float32 statistics: eigendecompositions of Grams instead of SVDs, whose sqrt(eps)
    # floor lies below the statistics' own rounding (cluster/pairs.py).
    exact = np.dtype(precision) == np.float64

    def compare_chunk(chunk: list[tuple[int, int]]) -> list[dict]:
        # The chunk's decompositions are stacked LAPACK calls (canonical_pairs,
        # nuclear_norms): one per shape instead of one per pair.
        moments = [cross(i, j) for i, j in chunk]
        none = [None] * len(chunk)
        nuclear = (nuclear_norms([m.cxy for m in moments], exact) if "procrustes" in metrics
                   else none)
        whitened = ([caches[i].basis.T @ m.cxy @ caches[j].basis
                     for (i, j), m in zip(chunk, moments, strict=True)] if whiten else none)
        cca = canonical_pairs(whitened, "pwcca" in metrics, exact) if cca_family else none
        return [compare_pair(caches[i], caches[j], m, metrics, nuclear=nu, whitened=w, cca=c)
                for (i, j), m, nu, w, c in zip(chunk, moments, nuclear, whitened, cca,
                                               strict=True)]

    caches = {} if caches is None else caches
    needed = sorted({k for pair in todo for k in pair} - set(caches))
    # A unit against itself follows from the definitions (pairs.self_pair): no decomposition.
    others = [pair for pair in todo if pair[0] != pair[1]]
    widest = max((units[i].cxx.shape[0] if units[i] is not None else caches[i].dim
                  for pair in others for i in pair), default=1)
    # Pairs in chunks of up to 64 (and 64 MiB of cross moments), so the decompositions of a
    # chunk are stacked calls (canonical_pairs, nuclear_norms); as many chunks as a multiple
    # of the threads, of equal sizes, so no thread finishes long after the others.
    largest = max(1, min(64, (64 << 20) // (8 * widest * widest)))
    pieces = -(-len(others) // largest)
    pieces = max(1, -(-pieces // threads) * threads)
    size = max(1, -(-len(others) // pieces))
    chunks = [others[k:k + size] for k in range(0, len(others), size)]
    if threads > 1:
        # Many small LAPACK calls: one BLAS thread each, `threads` of them at once, beats one
        # call at a time with threaded BLAS (numpy releases the GIL for stacks and for
        # large matrices, hence the chunks).
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
            prepared = dict(zip(needed, pool.map(prepare, needed), strict=True))
            _check_ambiguous(prepared, ambiguous)
            caches.update(prepared)
            values = [v for part in pool.map(compare_chunk, chunks) for v in part]
    else:
        prepared = {i: prepare(i) for i in needed}
        _check_ambiguous(prepared, ambiguous)
        caches.update(prepared)
        values = [v for chunk in chunks for v in compare_chunk(chunk)]

    selves = [i for i, j in todo if i == j]
    values += [self_pair(caches[i], metrics) for i in selves]
    out = {k: np.full((count, count), np.nan) for k in metrics}
    for (i, j), pair in zip(others + [(i, i) for i in selves], values, strict=True):
        for k, (xy, yx) in pair.items():
            out[k][i, j] = xy
            out[k][j, i] = yx
    return out
