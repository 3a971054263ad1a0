"""Planning: which units, which column groups and tiles, which row ranges, which tasks.

Two steps, both pure (metadata in, decisions out; no data read, no machine queried):

- :func:`select` checks a spec against a store's metadata: the units (models x layers, in
  matrix order) and the rows. Every name is checked here, before any work or connection.
- :func:`make_plan` splits the work for the :class:`~repscope.cluster.execute.Resources` the
  executor offers. A job's statistics are the centered cross moments of all its units'
  columns. Units are packed into column *groups* small enough that one *tile* (group a x
  group b, a <= b) fits a worker's memory; each tile is accumulated over *row ranges* by
  independent tasks whose partial moments merge exactly. With one group (the common case)
  every row block is read once for all units. ``fresh`` restricts the pairs to those that
  involve a fresh unit (nightly runs): fresh and unchanged units then form separate groups,
  and no tile joins two groups of unchanged units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from repscope.cluster.execute import Resources
from repscope.cluster.gram import BASIS_METRICS, SAMPLE_METRICS, sample_space_flops
from repscope.cluster.registry import METRICS
from repscope.cluster.tasks import GramTask, TileTask, UnitRef
from repscope.errors import InputError, NotFoundError
from repscope.jobs.spec import JobSpec, closest
from repscope.jobs.state import digest
from repscope.store.layout import format_bytes, natural_sorted

# Per tile a task holds the float64 accumulator, the block product and a merge temporary.
_TILE_COPIES = 3
# Rows per GEMM block of a tile. A block costs rows x d_a x d_b multiply-adds and one
# d_a x d_b float64 addition into the accumulator, so the addition's share falls with the
# rows whatever the width: 8,192 rows keep it at about 1% (docs/performance.md); a diagonal
# tile's syrk and its addition both cover one triangle, so the same holds there. More rows
# only cost memory touched for the first time, seconds per GB on a VM. Blocks (and the one
# being read ahead) stay within a quarter of the memory per worker, at least 1,024 rows.
_BLOCK_ROWS = 8192
_MIN_BLOCK_ROWS = 1024
# Sample space: gram_products' float64 slab buffers (cluster.gram._SLAB_BYTES).
_SLAB_BYTES = 128 << 20
_MAX_TASK_THREADS = 16
# All row-range partials of a job together stay under this (memory flat in rows).
_PARTIAL_BYTES = 256 << 20


@dataclass(frozen=True)
class PlannedUnit:
    """One unit of the job: its name, width and the content it was planned on."""

    model: str
    layer: str
    features: int
    fingerprint: str = ""  # content fingerprint at planning (same fingerprint, same data)
    version: str | None = None  # the store's version of the unit, pinned for every read

    @property
    def label(self) -> str:
        return f"{self.model}/{self.layer}"

    @property
    def ref(self) -> UnitRef:
        return UnitRef(self.model, self.layer, self.version)


@dataclass(frozen=True)
class Selection:
    """A spec checked against a store: the units in matrix order and the rows [start, stop).

    row_fingerprint: the store's row set (checkpoint keys and results record it).
    """

    units: tuple[PlannedUnit, ...]
    rows: tuple[int, int]
    row_fingerprint: str

    @property
    def n_rows(self) -> int:
        return self.rows[1] - self.rows[0]


@dataclass(frozen=True)
class Plan:
    """What a job computes and how the work is split.

    units: the job's units in matrix order (models in spec order, layers in store order).
    groups: unit indices of each column group, in unit order within a group.
    tiles: (group a, group b) with a <= b; every pair the job computes (i <= j) lies in
        exactly one of them (see tile_pairs).
    fresh: the units whose pairs are computed (all units, except in nightly runs).
    row_ranges: [start, stop) of each task's rows; together they cover the rows once.
    block_rows: rows per GEMM of an off-diagonal tile (see tile_block_rows).
    """

    units: tuple[PlannedUnit, ...]
    groups: tuple[tuple[int, ...], ...]
    tiles: tuple[tuple[int, int], ...]
    row_ranges: tuple[tuple[int, int], ...]
    block_rows: int
    rows: tuple[int, int]
    workers: int
    memory_per_worker: int
    fourth: bool
    precision: str
    fresh: frozenset[int] = frozenset()
    space: str = "feature"
    threads: int = 1  # BLAS threads per task (Ray CPUs it asks for)
    basis: bool = False  # sample space: per-unit Gram eigenpairs (CCA family, Procrustes)
    tile_threads: int = 1  # sample space: BLAS threads of each tile task
    block_rows_fixed: bool = False  # the spec set block_rows: the same for every tile
    stream_tiles: bool = False  # feature space: finish tiles as they arrive (jobs.finish)
    driver_cpus: int = 1  # threads the driver finishes pairs with

    @property
    def n_rows(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def n_pairs(self) -> int:
        """Pairs (i <= j) the plan computes."""
        return sum(len(self.tile_pairs(t)) for t in self.tiles)

    def tile_pairs(self, tile: tuple[int, int]) -> list[tuple[int, int]]:
        """The pairs (i <= j) of a tile that the job computes: those with a fresh unit (a
        diagonal tile of unchanged units has none; it is there for their own statistics)."""
        a, b = tile
        return sorted({(min(i, j), max(i, j)) for i in self.groups[a] for j in self.groups[b]
                       if i in self.fresh or j in self.fresh})

    def group_of(self, unit: int) -> tuple[int, int]:
        """(group index, position inside the group) of a unit."""
        for g, members in enumerate(self.groups):
            if unit in members:
                return g, members.index(unit)
        raise IndexError(unit)

    def widths(self, group: int) -> tuple[int, ...]:
        return tuple(self.units[u].features for u in self.groups[group])

    def tile_block_rows(self, a: int, b: int) -> int:
        """Rows per GEMM block of tile (a, b): ``block_rows``, fewer where the block and the
        next one would take more than a quarter of the memory per worker. A spec's
        block_rows applies to every tile as it is."""
        if self.block_rows_fixed:
            return self.block_rows
        width = sum(self.widths(a)) + (0 if a == b else sum(self.widths(b)))
        return _block_rows(self.block_rows, self.memory_per_worker, width)

    def gemm_flops(self) -> float:
        """Multiply-add flops (2 per MAC) of the accumulation: symmetric tiles counted half.
        Sample space: the Grams, n^2 d per unit (syrk); the float64 inner products
        (U^2 n^2) and eigendecompositions are not counted."""
        if self.space == "sample":
            used = {i for g in self.groups for i in g}
            return float(self.n_rows) ** 2 * sum(self.units[i].features for i in used)
        total = 0.0
        for a, b in self.tiles:
            da, db = sum(self.widths(a)), sum(self.widths(b))
            total += 2.0 * self.n_rows * da * db * (0.5 if a == b else 1.0)
        return total


# -- selection ------------------------------------------------------------------------------


def _chosen_models(spec: JobSpec, models: list[str], url: str) -> tuple[str, ...]:
    """The job's models: the spec's list, else the layers mapping's keys, else all."""
    if spec.models is not None:
        chosen = spec.models
    elif isinstance(spec.layers, dict):
        chosen = tuple(spec.layers)
    else:
        chosen = tuple(models)
    for m in chosen:
        if m not in models:
            raise NotFoundError(f"model {m!r} is not in store {url}{closest(m, models)}")
    if isinstance(spec.layers, dict):
        for m in spec.layers:
            if m not in chosen:
                raise InputError(f"layers lists model {m!r}, which models does not include")
        for m in chosen:
            if m not in spec.layers:
                raise InputError(
                    f"models lists {m!r} but the layers mapping names no layers for it; add "
                    f"'{m}: [...]' to layers, or use a list of layers for every model"
                )
    return chosen


def select(spec: JobSpec, store) -> Selection:
    """The spec's units and rows, checked against the store; unknown names are refused with
    a hint. Reads metadata only (one listing of the store's units)."""
    listed = store.units()
    models = natural_sorted({m for m, _ in listed})
    if not models:
        raise InputError(f"store {store.url} holds no units yet; ingest activations first")
    units = []
    for m in _chosen_models(spec, models, store.url):
        available = [layer for model, layer in listed if model == m]
        if spec.layers is None:
            wanted = available
        elif isinstance(spec.layers, dict):
            wanted = spec.layers[m]
        else:
            wanted = spec.layers
        for layer in wanted:
            if layer not in available:
                raise NotFoundError(
                    f"layer {layer!r} of model {m!r} is not in store {store.url}"
                    f"{closest(layer, available)}"
                )
            info = store.unit_info(m, layer)
            units.append(PlannedUnit(m, layer, info.features, info.fingerprint,
                                     getattr(info, "version", None)))
    return Selection(tuple(units), resolve_rows(spec, store.n_rows or 0),
                     store.row_fingerprint or "")


def resolve_rows(spec: JobSpec, n_rows: int) -> tuple[int, int]:
    start, stop = spec.rows
    stop = n_rows if stop is None else stop
    if stop > n_rows:
        raise InputError(f"rows.stop is {stop} but the store has only {n_rows} rows")
    if stop - start < 3:
        raise InputError(f"rows [{start}, {stop}) hold {stop - start} rows; at least 3 are needed")
    return start, stop


# -- splitting the work ---------------------------------------------------------------------


def make_groups(widths: list[int], max_width: int) -> tuple[tuple[int, ...], ...]:
    """Pack consecutive units into as few groups of total width <= max_width as possible,
    balanced so the tiles have similar cost. A unit wider than max_width is a group alone."""
    target = sum(widths) / max(1, math.ceil(sum(widths) / max_width))
    groups: list[list[int]] = [[]]
    width = 0
    for i, w in enumerate(widths):
        # Close the group when this unit would overflow it, or would push it past the
        # balanced target by more than half the unit's own width.
        if groups[-1] and (width + w > max_width or width + w / 2 > target):
            groups.append([])
            width = 0
        groups[-1].append(i)
        width += w
    return tuple(tuple(g) for g in groups)


def _grouped(members: list[int], widths: list[int], max_width: int):
    """make_groups over a subset of the units (given in unit order): groups of unit indices."""
    local = make_groups([widths[i] for i in members], max_width) if members else ()
    return tuple(tuple(members[k] for k in g) for g in local)


def _groups_and_tiles(widths: list[int], fresh: frozenset[int], max_width: int,
                      unit_tiles: bool):
    """Groups of fresh units, then groups of the others; the tiles touching a fresh group,
    and with ``unit_tiles`` the diagonal tiles of the other groups too (for their units' own
    statistics: sample-space self products, bootstrap shards)."""
    fresh_units = [i for i in range(len(widths)) if i in fresh]
    stale = [i for i in range(len(widths)) if i not in fresh]
    fresh_groups = _grouped(fresh_units, widths, max_width)
    groups = fresh_groups + _grouped(stale, widths, max_width)
    n_fresh = len(fresh_groups)
    tiles = [(a, b) for a in range(n_fresh) for b in range(a, len(groups))]
    if unit_tiles:
        tiles += [(g, g) for g in range(n_fresh, len(groups))]
    return groups, tuple(tiles)


def sample_unit_bytes(n: int, width: int, basis: bool) -> int:
    """Memory of one unit's Gram task: its rows read and centered (float32), its Gram, and
    with the basis a float64 copy plus eigh's workspace and eigenvectors."""
    return 8 * n * width + 4 * n * n + (32 * n * n if basis else 0)


def choose_space(spec: JobSpec, n: int, widths: list[int], memory: int) -> str:
    """"feature" or "sample": the spec's choice, else the cheaper one in flops.

    Feature space costs n D^2 flops for D = sum of widths (symmetric), plus per unit and per
    pair O(d^3) finishing for the CCA family and Procrustes; sample space n^2 D for the Grams
    and U^2 n^2 for their inner products, plus O(n^3) per unit and O(n r^2) per pair for those
    metrics (cluster.gram.sample_space_flops). Sample space needs a unit's Gram task to fit
    the memory per worker, and has no form for PWCCA or the bootstrap (which resamples
    feature-space partials); a spec forcing it there is refused.
    """
    space = spec.compute.space
    if spec.compute.bootstrap:
        if space == "sample":
            raise InputError("compute.bootstrap resamples feature-space partials: use "
                             "space: feature or auto with a bootstrap")
        return "feature"
    bad = [m for m in spec.metrics if m not in SAMPLE_METRICS]
    if space == "sample" and bad:
        raise InputError(
            f"compute.space is 'sample' but {', '.join(bad)} has no sample-space form "
            f"(sample space supports {', '.join(SAMPLE_METRICS)}); use space: feature or auto"
        )
    if space != "auto":
        return space
    if bad:
        return "feature"
    basis = any(m in BASIS_METRICS for m in spec.metrics)
    feature = float(n) * sum(widths) ** 2
    if basis:
        u = len(widths)
        feature += sum(10.0 * float(d) ** 3 for d in widths)
        feature += u * (u + 1) / 2 * 20.0 * float(max(widths)) ** 3
    fits = sample_unit_bytes(n, max(widths), basis) <= memory
    return "sample" if fits and sample_space_flops(n, widths, spec.metrics) < feature / 2 \
        else "feature"


def _sample_plan(spec: JobSpec, sel: Selection, res: Resources, fresh: frozenset[int],
                 fourth: bool) -> Plan:
    """Sample space: one task per unit (its Gram), then tiles of unit groups (the pairs).

    A tile task maps the Grams of its two groups (and their eigenvectors): groups hold as
    many units as fit half the memory per worker. With basis metrics (per-pair SVDs) there
    are at least two tiles per worker, so the pairs spread over the cluster.
    """
    units, rows, memory, workers = sel.units, sel.rows, res.memory_per_worker, res.workers
    n = rows[1] - rows[0]
    count = len(units)
    basis = any(m in BASIS_METRICS for m in spec.metrics)
    width = max(u.features for u in units)
    if sample_unit_bytes(n, width, basis) > memory:
        raise InputError(
            f"compute.space is 'sample' but one unit's Gram task ({n:,} rows x {width:,} "
            f"features) needs {format_bytes(sample_unit_bytes(n, width, basis))}, more than "
            f"memory_per_worker ({format_bytes(memory)}): use fewer rows or the feature space"
        )
    held = 4 * n * n + (8 * n * min(n, width) if basis else 0)  # one unit in a tile task
    per_group = max(1, (memory - _SLAB_BYTES) // (2 * held))
    n_groups = math.ceil(count / per_group)
    if basis:
        while n_groups < count and n_groups * (n_groups + 1) // 2 < 2 * workers:
            n_groups += 1
    groups, tiles = _groups_and_tiles([1] * count, fresh, math.ceil(count / n_groups), True)
    # Unit tasks: one BLAS thread each when there are units for every worker, else the
    # workers shared among the units (up to one node's CPUs).
    cap = min(res.node_cpus, _MAX_TASK_THREADS)
    threads = max(1, min(workers // count, cap))
    return Plan(units=units, groups=groups, tiles=tiles, row_ranges=(rows,), block_rows=n,
                rows=rows, workers=workers, memory_per_worker=memory, fourth=fourth,
                precision=spec.compute.precision, fresh=fresh, space="sample",
                threads=threads, basis=basis,
                tile_threads=max(1, min(workers // max(1, len(tiles)), cap)),
                driver_cpus=res.driver_cpus)


def make_plan(spec: JobSpec, sel: Selection, res: Resources, *,
              fresh: frozenset[int] | set[int] | None = None,
              known: frozenset[int] | set[int] = frozenset()) -> Plan:
    """Split the work of a selection for the given resources. Pure: runs once per job.

    fresh: units whose pairs are to be computed (None: all of them); pairs of two other
    units are left out (their values come from elsewhere, e.g. a previous nightly run).
    known: other units whose own moments the caller has (loaded from the state); the
    feature space then needs no tile for them.
    """
    units, rows = sel.units, sel.rows
    fresh = frozenset(range(len(units)) if fresh is None else fresh)
    unknown = any(i not in fresh and i not in known for i in range(len(units)))
    if not fresh:
        raise InputError("nothing to compute: no unit is new or changed")
    n = rows[1] - rows[0]
    memory, workers = res.memory_per_worker, res.workers
    widths = [u.features for u in units]
    space = choose_space(spec, n, widths, memory)
    fourth = any(METRICS[m].needs_fourth for m in spec.metrics)
    if space == "sample":
        return _sample_plan(spec, sel, res, fresh, fourth)
    max_width = max(1, int(math.sqrt(memory / (8 * _TILE_COPIES))))
    # Unchanged units keep their diagonal tiles when their moments are not at hand, and for
    # a bootstrap (which resamples every unit's own moments too).
    groups, tiles = _groups_and_tiles(widths, fresh, max_width,
                                      unknown or bool(spec.compute.bootstrap))

    width = [sum(units[i].features for i in g) for g in groups]
    widest_tile = max(width[a] + (0 if a == b else width[b]) for a, b in tiles)
    tile_sizes = [8 * width[a] * width[b] for a, b in tiles]  # float64 moments of each tile
    block_rows = spec.compute.block_rows or _block_rows(_BLOCK_ROWS, memory, widest_tile)
    # Few tiles (fewer than two per worker): tasks of several BLAS threads, up to one node's
    # CPUs. On one machine that is one task per tile with all its cores, tiles one after
    # another: one accumulator in memory, no idle worker at the end (docs/performance.md).
    # On several nodes, tiles are split into row ranges (partials merged exactly) so that
    # every node's CPUs stay busy to the end (_row_splits), while the partials together fit a
    # quarter of the cluster's task memory (at least _PARTIAL_BYTES): whatever the rows, the
    # job's memory is bounded (flat in rows). Many tiles: one single-threaded task per tile.
    tile_bytes = max(tile_sizes)
    if len(tiles) < 2 * workers:
        threads = min(workers, res.node_cpus, _MAX_TASK_THREADS)
        slots = math.ceil(workers / threads)  # tasks the cluster runs at once
        splits = _row_splits(len(tiles), slots)
        splits = max(1, min(splits, n // min(block_rows, _MIN_BLOCK_ROWS)))
        budget = max(_PARTIAL_BYTES, workers * memory // 4)
        while splits > 1 and splits * len(tiles) * tile_bytes > budget:
            splits -= 1
    else:
        threads, splits = 1, 1
    if spec.compute.bootstrap:
        # The bootstrap resamples row shards: one task per shard and tile, all partials
        # kept on the driver.
        splits = spec.compute.bootstrap_shards
        held = splits * len(tiles) * tile_bytes
        if held > res.driver_memory:
            raise InputError(
                f"compute.bootstrap keeps {splits} shards x {len(tiles)} tile partials "
                f"({format_bytes(held)}) on the driver, more than the "
                f"{format_bytes(res.driver_memory)} it may hold: use fewer bootstrap_shards "
                "or fewer or narrower units"
            )
        if n < 2 * splits:
            raise InputError(f"compute.bootstrap_shards ({splits}) needs at least 2 rows "
                             f"per shard; the job has {n} rows")
    edges = [rows[0] + (n * k) // splits for k in range(splits + 1)]
    row_ranges = tuple((edges[k], edges[k + 1]) for k in range(splits))
    # The driver finishes tiles after the accumulation, with every CPU, while the job's
    # moments take under half of the memory it may hold; beyond, it finishes each tile as it
    # arrives and lets it go (that work then competes with the accumulation for CPUs).
    return Plan(
        units=units,
        groups=groups,
        tiles=tiles,
        row_ranges=row_ranges,
        block_rows=block_rows,
        rows=rows,
        workers=workers,
        memory_per_worker=memory,
        fourth=fourth,
        precision=spec.compute.precision,
        fresh=fresh,
        threads=threads,
        stream_tiles=sum(tile_sizes) > res.driver_memory // 2,
        block_rows_fixed=bool(spec.compute.block_rows),
        driver_cpus=res.driver_cpus,
    )


def _row_splits(tiles: int, slots: int) -> int:
    """Row ranges per tile for ``tiles`` tiles of equal work on ``slots`` task slots: the
    fewest that give the shortest run, ``ceil(s tiles / slots) / s`` tile-times for s ranges
    (1 tile on 2 slots: 2; 3 tiles on 2 slots: 2, as 2 waves of 1.5 tiles beat 1 wave of 2).
    Each further range is a whole tile's moments to return, move and merge (302 MB at 6,144
    columns: seconds on the machine of docs/performance.md), so no more than that."""
    candidates = range(1, 2 * math.ceil(slots / tiles) + 1)
    return min(candidates, key=lambda s: (math.ceil(s * tiles / slots) / s, s))


def _block_rows(wanted: int, memory_per_worker: int, width: int) -> int:
    """``wanted`` rows, fewer if a float32 block and the one read ahead would take more than
    a quarter of the memory per worker (at least _MIN_BLOCK_ROWS)."""
    fits = memory_per_worker // (8 * 4 * max(1, width))
    return int(max(_MIN_BLOCK_ROWS, min(wanted, fits)))


# -- tasks ----------------------------------------------------------------------------------


def tile_tasks(plan: Plan, row_fingerprint: str | None = None) -> dict[tuple[int, int],
                                                                        list[TileTask]]:
    """Every tile's tasks, one per row range. With the store's ``row_fingerprint``, each task
    gets a checkpoint key over everything its partial depends on: the store's rows, its units'
    content fingerprints, its row range and how it accumulates."""
    def refs(g: int) -> tuple[UnitRef, ...]:
        return tuple(plan.units[i].ref for i in plan.groups[g])

    def key(a: int, b: int, start: int, stop: int) -> str | None:
        if row_fingerprint is None:
            return None
        members = [plan.units[i] for i in plan.groups[a] + plan.groups[b]]
        return digest(row_fingerprint, [(u.model, u.layer) for u in members],
                      [u.fingerprint for u in members], start, stop,
                      plan.tile_block_rows(a, b), plan.precision, plan.fourth, a == b)

    tasks = {}
    for a, b in plan.tiles:
        tasks[(a, b)] = [
            TileTask(
                units_a=refs(a),
                widths_a=plan.widths(a),
                units_b=None if a == b else refs(b),
                widths_b=None if a == b else plan.widths(b),
                start=start,
                stop=stop,
                block_rows=plan.tile_block_rows(a, b),
                fourth=plan.fourth,
                precision=plan.precision,
                threads=plan.threads if plan.threads > 1 else None,
                checkpoint_key=key(a, b, start, stop),
                # A finished task's moments are saved only if they wait for something: sibling
                # row ranges, or (tiles finished after the accumulation) other tiles. A
                # streamed tile of one task is finished (and saved small) at once.
                save_result=len(plan.row_ranges) > 1 or (not plan.stream_tiles
                                                         and len(plan.tiles) > 1),
            )
            for start, stop in plan.row_ranges
        ]
    return tasks


def gram_tasks(plan: Plan, eig_floor: float | None = None,
               ambiguous_rank: str = "recompute") -> list[GramTask]:
    """Sample space: one task per unit, its Gram over the job's rows (``eig_floor`` and
    ``ambiguous_rank`` as the spec's compute keys)."""
    return [GramTask(u.ref, plan.rows[0], plan.rows[1], plan.precision, plan.basis,
                     threads=plan.threads, eig_floor=eig_floor, ambiguous_rank=ambiguous_rank)
            for u in plan.units]
