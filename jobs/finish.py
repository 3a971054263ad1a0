"""Finishing a job: similarity matrices from the statistics the tasks return.

Feature space: :class:`TileFinalizer` takes tiles of moments as they arrive. A diagonal tile
(a, a) gives its units' moments (their per-unit work is done once) and its pairs; an
off-diagonal tile (a, b) gives its pairs once both groups' units are known, and is held until
then. Units whose pairs with the fresh units are wanted but whose own tile is not computed
(the unchanged units of a nightly run) come in as moments loaded from the state. Sample
space: :func:`finalize_sample` assembles the tiles' Gram statistics. The bootstrap's
replicates (:func:`bootstrap_bounds`) are finished by the same finalizer.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from repscope.cluster.bootstrap import bootstrap
from repscope.cluster.caches import UnitCache
from repscope.cluster.gram import gram_similarity_matrices
from repscope.cluster.matrices import similarity_matrices
from repscope.cluster.moments import (
    CrossMoments,
    PairMoments,
    UnitMoments,
    pair_moments,
    unit_moments,
)
from repscope.cluster.registry import SHAPE_METRICS, metric_options
from repscope.cluster.shape import ShapeCache, prepare_shape, shape_angular
from repscope.jobs.plan import Plan

__all__ = ["TileValues", "TileFinalizer", "finalize_sample", "bootstrap_bounds",
           "BOOTSTRAP_LEVEL"]

Tile = tuple[int, int]
BOOTSTRAP_LEVEL = 0.9


@dataclass(frozen=True)
class TileValues:
    """A finished tile's matrix entries, saved so that a rerun after a crash reuses them.

    ab : ndarray (metrics, k_a, k_b), value(unit of group a, unit of group b); ba : ndarray
    (metrics, k_b, k_a), the other direction (they differ for PWCCA only).
    """

    metrics: tuple[str, ...]
    ab: np.ndarray
    ba: np.ndarray


class TileFinalizer:
    """Similarity matrices finished tile by tile as tiles arrive, so the driver never holds
    all of a job's moments (a wide job's tiles together can exceed any one machine).

    Parameters
    ----------
    plan : the job's plan; entries of pairs outside its tiles stay NaN.
    metrics : metric names.
    svcca_threshold : fraction of variance SVCCA keeps.
    known : moments of units whose diagonal tile is not computed (nightly's unchanged units).
    on_unit : ``on_unit(i, moments)`` as a unit's moments arrive from its diagonal tile.
    on_done : ``on_done(tile)`` once a tile's entries are all in.
    precision : the products' dtype (``plan.precision``): it sets each unit's rank cut.
    eig_floor : ``compute.eig_floor`` (None: the cut follows from the precision).
    caches, shape_caches : per-unit work already done (a float64 recomputation of some units
        keeps the others' decisions); those units need no moments.

    A unit whose float32 rank is ambiguous is finished all the same and listed by
    :meth:`ambiguous`: the pipeline recomputes it in float64 or refuses the job.

    Per-unit eigendecompositions and per-pair SVDs run on ``plan.driver_cpus`` threads, one
    BLAS thread each (:func:`repscope.cluster.matrices.similarity_matrices`). The shape
    metric (options from ``metric_options``) is finished from the same moments by
    :mod:`repscope.cluster.shape`.
    """

    def __init__(self, plan: Plan, metrics, *, svcca_threshold: float,
                 known: dict[int, UnitMoments] | None = None,
                 on_unit: Callable[[int, UnitMoments], None] | None = None,
                 on_done: Callable[[Tile], None] | None = None,
                 metric_options: dict | None = None, eig_floor: float | None = None,
                 caches: dict[int, UnitCache] | None = None,
                 shape_caches: dict[int, ShapeCache] | None = None):
        self.plan, self.metrics = plan, tuple(metrics)
        self.precision, self.eig_floor = plan.precision, eig_floor
        self.moment_metrics = tuple(m for m in self.metrics if m not in SHAPE_METRICS)
        self.shape_options = {m: (metric_options or {}).get(m) for m in self.metrics
                              if m in SHAPE_METRICS}
        self.shape_caches: dict[int, ShapeCache] = dict(shape_caches or {})
        self.svcca_threshold = svcca_threshold
        self.on_unit, self.on_done = on_unit, on_done
        self.names = [u.label for u in plan.units]
        self.moments: dict[int, UnitMoments] = dict(known or {})
        self.caches: dict[int, UnitCache] = dict(caches or {})
        self.held: dict[Tile, CrossMoments] = {}
        count = len(plan.units)
        self.out = {m: np.full((count, count), np.nan) for m in self.metrics}
        self.seconds = 0.0  # spent finishing pairs
        self.done: set[Tile] = set()  # tiles whose entries are all in
        self.restored = 0  # of which restored from an earlier run

    def _ready(self, tile: Tile) -> bool:
        return all(i in self.caches or i in self.moments or i in self.shape_caches
                   for g in tile for i in self.plan.groups[g])

    def ambiguous(self) -> list[int]:
        """Units whose float32 statistics cannot decide their rank (rank.py), ascending."""
        bad = {i for i, c in self.caches.items() if c.ambiguous and c.precision == "float32"}
        bad |= {i for i, c in self.shape_caches.items()
                if c.ambiguous and c.precision == "float32"}
        return sorted(bad)

    def ranks(self) -> dict[int, int]:
        """Each prepared unit's effective rank (the units a whitening metric prepared)."""
        out = {i: c.rank for i, c in self.shape_caches.items() if c.rank is not None}
        out.update({i: c.rank for i, c in self.caches.items() if c.rank is not None})
        return out

    def add(self, tile: Tile, moments: CrossMoments) -> None:
        """One tile's merged moments (any order of arrival)."""
        t0 = time.perf_counter()
        self._add(tile, moments)
        self.seconds += time.perf_counter() - t0

    def _add(self, tile: Tile, moments: CrossMoments) -> None:
        a, b = tile
        if a == b:
            for pos, i in enumerate(self.plan.groups[a]):
                self.moments[i] = unit_moments(moments, pos)
                if self.on_unit:
                    self.on_unit(i, self.moments[i])
            self._pairs(tile, moments)
            for waiting in [t for t in self.held if self._ready(t)]:
                self._pairs(waiting, self.held.pop(waiting))
        elif self._ready(tile):
            self._pairs(tile, moments)
        else:
            self.held[tile] = moments

    def add_all(self, tiles: dict[Tile, CrossMoments]) -> None:
        """Every tile of a finished accumulation, diagonal tiles first (none is held). Each
        is popped from ``tiles`` once finished, so its moments are released as we go."""
        for tile in sorted(tiles, key=lambda t: t[0] != t[1]):
            self.add(tile, tiles.pop(tile))

    def restore(self, tile: Tile, values: TileValues, caches: dict[int, UnitCache]) -> None:
        """A tile finished by an earlier run: its entries, and a diagonal tile's caches."""
        ga, gb = (list(self.plan.groups[g]) for g in tile)
        for k, m in enumerate(values.metrics):
            self.out[m][np.ix_(ga, gb)] = values.ab[k]
            self.out[m][np.ix_(gb, ga)] = values.ba[k]
        self.caches.update(caches)
        self.done.add(tile)
        self.restored += 1

    def tile_values(self, tile: Tile) -> TileValues:
        ga, gb = (list(self.plan.groups[g]) for g in tile)
        return TileValues(self.metrics,
                          np.stack([self.out[m][np.ix_(ga, gb)] for m in self.metrics]),
                          np.stack([self.out[m][np.ix_(gb, ga)] for m in self.metrics]))

    def _pairs(self, tile: Tile, moments: CrossMoments) -> None:
        pairs = self.plan.tile_pairs(tile)
        if not pairs:  # a tile of unchanged units, there for their moments only
            self._finished(tile)
            return
        ga, gb = (self.plan.groups[g] for g in tile)
        pos_a = {i: k for k, i in enumerate(ga)}
        pos_b = {j: k for k, j in enumerate(gb)}

        def cross(i: int, j: int) -> PairMoments:
            # Groups need not follow unit order (nightly: fresh groups first): orient the pair.
            if i in pos_a and j in pos_b:
                return pair_moments(moments, pos_a[i], pos_b[j])
            return pair_moments(moments, pos_a[j], pos_b[i]).swapped()

        units = [None if i in self.caches else self.moments.get(i)
                 for i in range(len(self.plan.units))]
        mats = {}
        if self.moment_metrics:
            mats = similarity_matrices(
                units, cross, self.moment_metrics,
                names=self.names, svcca_threshold=self.svcca_threshold,
                precision=self.precision, eig_floor=self.eig_floor, ambiguous="keep",
                pairs=pairs, threads=self.plan.driver_cpus, caches=self.caches)
        for m in self.shape_options:
            mats[m] = self._shape(m, pairs, cross)
        for m, v in mats.items():
            filled = ~np.isnan(v)
            self.out[m][filled] = v[filled]
        self._finished(tile)

    def _shape(self, metric: str, pairs, cross) -> np.ndarray:
        """The shape metric of the tile's pairs (symmetric), units prepared once."""
        alpha = metric_options(metric, self.shape_options[metric])["alpha"]
        out = np.full((len(self.plan.units),) * 2, np.nan)
        for i, j in pairs:
            for k in (i, j):
                if k not in self.shape_caches:
                    self.shape_caches[k] = prepare_shape(
                        self.moments[k], alpha, precision=self.precision,
                        eig_floor=self.eig_floor, name=self.names[k])
            out[i, j] = out[j, i] = shape_angular(self.shape_caches[i], self.shape_caches[j],
                                                  cross(i, j).cxy)
        return out

    def _finished(self, tile: Tile) -> None:
        self.done.add(tile)
        if self.on_done:
            self.on_done(tile)

    def result(self) -> dict[str, np.ndarray]:
        if self.held:
            raise RuntimeError(f"tiles {sorted(self.held)} arrived without their diagonal tiles")
        return self.out


def finalize_sample(plan: Plan, tiles: dict, metrics) -> dict[str, np.ndarray]:
    """(U, U) matrices from the tiles' Gram statistics and per-pair values (cluster.gram).

    Pairs outside the plan's tiles stay NaN. A unit's self products come from its diagonal
    tile (computed for every group, see the plan)."""
    count = len(plan.units)
    kl, dd = np.full((count, count), np.nan), np.full((count, count), np.nan)
    trace = np.full(count, np.nan)
    values = {m: np.full((count, count), np.nan) for m in metrics}
    for (a, b), t in tiles.items():
        ga, gb = plan.groups[a], plan.groups[b]
        for p, i in enumerate(ga):
            trace[i] = t.trace_a[p]
            for q, j in enumerate(gb):
                kl[i, j] = kl[j, i] = t.kl_off[p, q]
                dd[i, j] = dd[j, i] = t.dd[p, q]
                for m, v in t.values.items():
                    if np.isfinite(v[p, q]):
                        values[m][i, j] = values[m][j, i] = v[p, q]  # symmetric metrics
    wanted = np.full((count, count), False)
    for tile in plan.tiles:
        for i, j in plan.tile_pairs(tile):
            wanted[i, j] = wanted[j, i] = True
    values.update(gram_similarity_matrices(plan.n_rows, kl, dd, trace, metrics,
                                           names=[u.label for u in plan.units],
                                           computed=wanted))
    for m in values:
        values[m][~wanted] = np.nan
    return values


def bootstrap_bounds(plan: Plan, parts: dict[Tile, list[CrossMoments]], metrics,
                     replicates: int, *, svcca_threshold: float,
                     metric_options: dict | None = None,
                     eig_floor: float | None = None) -> dict:
    """Percentile bounds of every entry of the plan's pairs from a bootstrap over the row
    shards (cluster.bootstrap; seed 0, so a rerun gives the same bounds):
    {metric: (lower, upper)} at :data:`BOOTSTRAP_LEVEL`."""
    metrics = list(metrics)
    shards = [[parts[tile][s] for tile in plan.tiles] for s in range(len(plan.row_ranges))]

    def statistic(tiles: list) -> np.ndarray:
        fin = TileFinalizer(plan, metrics, svcca_threshold=svcca_threshold,
                            metric_options=metric_options, eig_floor=eig_floor)
        fin.add_all(dict(zip(plan.tiles, tiles, strict=True)))
        mats = fin.result()
        return np.stack([mats[m] for m in metrics])

    with warnings.catch_warnings():
        # Pairs a nightly run reuses are NaN in every replicate: their bounds come from the
        # previous result.
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        result = bootstrap(shards, statistic, replicates, level=BOOTSTRAP_LEVEL,
                           rng=np.random.default_rng(0))
    return {m: (result.lower[k], result.upper[k]) for k, m in enumerate(metrics)}
