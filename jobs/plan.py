"""Planning: which units, which column groups and tiles, which row ranges.

A job's statistics are the centered cross moments of all its units' columns. Units are packed
into column *groups* (consecutive in unit order) small enough that one *tile* (group a x
group b, a <= b) fits a worker's memory; each tile is accumulated over *row ranges* by
independent tasks whose partial moments merge exactly. With one group (the common case) every
row shard is read once for all units.

Everything here is pure: it looks at store metadata, never at data.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from repscope.errors import InputError, NotFoundError
from repscope.jobs.spec import JobSpec, closest
from repscope.store.layout import format_bytes, natural_sorted

# Per tile a task holds the float64 accumulator, the block product and a merge temporary.
_TILE_COPIES = 3
# float32 input rows per GEMM block of a tile (the group read once on a diagonal tile, both
# groups otherwise): large blocks keep the GEMMs at BLAS peak and make the per-block
# d_a x d_b accumulator addition small next to them (W2's first 20,000 rows: 2,184-row
# blocks 38.3 s, 4,369 36.6 s, 8,192 35.0 s of accumulation).
_BLOCK_BYTES = 512 << 20
_MIN_BLOCK_ROWS = 2048
# Sample space: gram_products' float64 slab buffers (cluster.gram._SLAB_BYTES).
_SLAB_BYTES = 128 << 20
_MAX_BLOCK_ROWS = 65536
_MAX_TASK_THREADS = 16
_PARTIAL_BYTES = 256 << 20


@dataclass(frozen=True)
class PlannedUnit:
    model: str
    layer: str
    features: int

    @property
    def label(self) -> str:
        return f"{self.model}/{self.layer}"


@dataclass(frozen=True)
class Plan:
    """What a job computes and how the work is split.

    units: the job's units in matrix order (models in spec order, layers in store order).
    groups: unit indices of each column group, consecutive and in unit order.
    tiles: (group a, group b) with a <= b; every unit pair (i <= j) lies in exactly one.
    row_ranges: [start, stop) of each task's rows; together they cover rows once.
    block_rows: rows per GEMM inside a task of the widest tile (see tile_block_rows).
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
    space: str = "feature"
    threads: int = 1  # BLAS threads per task (Ray CPUs it asks for)
    basis: bool = False  # sample space: per-unit Gram eigenpairs (CCA family, Procrustes)
    tile_threads: int = 1  # sample space: BLAS threads of each tile task
    block_bytes: int = 0  # feature space: input bytes per block (0: block_rows everywhere)
    stream_tiles: bool = False  # feature space: finish tiles as they arrive (jobs.run)

    @property
    def n_rows(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def n_pairs(self) -> int:
        u = len(self.units)
        return u * (u + 1) // 2

    def group_of(self, unit: int) -> tuple[int, int]:
        """(group index, position inside the group) of a unit."""
        for g, members in enumerate(self.groups):
            if unit in members:
                return g, members.index(unit)
        raise IndexError(unit)

    def widths(self, group: int) -> tuple[int, ...]:
        return tuple(self.units[u].features for u in self.groups[group])

    def tile_block_rows(self, a: int, b: int) -> int:
        """Rows per GEMM block of tile (a, b): the same bytes per block for every tile, so a
        diagonal tile (one group read) takes blocks of twice the rows of an off-diagonal one
        of the same groups' width. A spec's block_rows applies to every tile."""
        if not self.block_bytes:
            return self.block_rows
        width = sum(self.widths(a)) + (0 if a == b else sum(self.widths(b)))
        return _block_rows(self.block_bytes, width)

    def gemm_flops(self) -> float:
        """Multiply-add flops (2 per MAC) of the accumulation: symmetric tiles counted half.
        Sample space: the Grams, n^2 d per unit (syrk); the float64 inner products
        (U^2 n^2) and eigendecompositions are not counted."""
        if self.space == "sample":
            return float(self.n_rows) ** 2 * sum(u.features for u in self.units)
        total = 0.0
        for a, b in self.tiles:
            da, db = sum(self.widths(a)), sum(self.widths(b))
            total += 2.0 * self.n_rows * da * db * (0.5 if a == b else 1.0)
        return total


def select_units(spec: JobSpec, store) -> tuple[PlannedUnit, ...]:
    """The spec's units, checked against the store; unknown names are refused with a hint."""
    listed = store.units()  # one listing (it reads every unit's metadata)
    models = natural_sorted({m for m, _ in listed})
    if not models:
        raise InputError(f"store {store.url} holds no units yet; ingest activations first")
    chosen = spec.models if spec.models is not None else tuple(models)
    for m in chosen:
        if m not in models:
            raise NotFoundError(f"model {m!r} is not in store {store.url}{closest(m, models)}")
    if isinstance(spec.layers, dict):
        for m in spec.layers:
            if m not in chosen:
                raise InputError(f"layers lists model {m!r}, which the job does not include")
    units = []
    for m in chosen:
        available = [layer for model, layer in listed if model == m]
        if spec.layers is None:
            wanted = available
        elif isinstance(spec.layers, dict):
            wanted = spec.layers.get(m, available)
        else:
            wanted = spec.layers
        for layer in wanted:
            if layer not in available:
                raise NotFoundError(
                    f"layer {layer!r} of model {m!r} is not in store {store.url}"
                    f"{closest(layer, available)}"
                )
            units.append(PlannedUnit(m, layer, store.unit_info(m, layer).features))
    return tuple(units)


def resolve_rows(spec: JobSpec, n_rows: int) -> tuple[int, int]:
    start, stop = spec.rows
    stop = n_rows if stop is None else stop
    if stop > n_rows:
        raise InputError(f"rows.stop is {stop} but the store has only {n_rows} rows")
    if stop - start < 3:
        raise InputError(f"rows [{start}, {stop}) hold {stop - start} rows; at least 3 are needed")
    return start, stop


def default_memory_per_worker(workers: int) -> int:
    """Half of this machine's memory shared among the workers."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return max(256 << 20, total // (2 * max(1, workers)))


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
    from repscope.cluster.gram import BASIS_METRICS, SAMPLE_METRICS, sample_space_flops

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


def _sample_plan(spec: JobSpec, units, rows, memory: int, workers: int,
                 node_cpus: int | None, fourth: bool) -> Plan:
    """Sample space: one task per unit (its Gram), then tiles of unit groups (the pairs).

    A tile task maps the Grams of its two groups (and their eigenvectors): groups hold as
    many units as fit half the memory per worker. With basis metrics (per-pair SVDs) there
    are at least two tiles per worker, so the pairs spread over the cluster.
    """
    from repscope.cluster.gram import BASIS_METRICS

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
    groups = make_groups([1] * count, math.ceil(count / n_groups))
    tiles = tuple((a, b) for a in range(len(groups)) for b in range(a, len(groups)))
    # Unit tasks: one BLAS thread each when there are units for every worker, else the
    # workers shared among the units (up to one node's CPUs).
    cap = min(node_cpus or workers, _MAX_TASK_THREADS)
    threads = max(1, min(workers // count, cap))
    return Plan(units=units, groups=groups, tiles=tiles, row_ranges=(rows,), block_rows=n,
                rows=rows, workers=workers, memory_per_worker=memory, fourth=fourth,
                precision=spec.compute.precision, space="sample", threads=threads,
                basis=basis, tile_threads=max(1, min(workers // len(tiles), cap)))


def make_plan(spec: JobSpec, store, *, workers: int, node_cpus: int | None = None) -> Plan:
    """Check the spec against the store and split the work. Reads metadata only.

    workers: CPUs of the whole cluster the job may use; node_cpus: CPUs of its largest node
    (a task's BLAS threads run on one node; default: workers, as on one machine)."""
    from repscope.cluster.registry import METRICS

    units = select_units(spec, store)
    n_rows = store.n_rows or 0
    rows = resolve_rows(spec, n_rows)
    n = rows[1] - rows[0]
    memory = spec.compute.memory_per_worker or default_memory_per_worker(workers)
    widths = [u.features for u in units]
    space = choose_space(spec, n, widths, memory)
    fourth = any(METRICS[m].needs_fourth for m in spec.metrics)
    if space == "sample":
        return _sample_plan(spec, units, rows, memory, workers, node_cpus, fourth)
    max_width = max(1, int(math.sqrt(memory / (8 * _TILE_COPIES))))
    groups = make_groups(widths, max_width)
    tiles = tuple((a, b) for a in range(len(groups)) for b in range(a, len(groups)))

    width = [sum(units[i].features for i in g) for g in groups]
    widest_tile = max(width[a] + (0 if a == b else width[b]) for a, b in tiles)
    tile_sizes = [8 * width[a] * width[b] for a, b in tiles]  # float64 moments of each tile
    # A block and the next one (prefetched) in at most half the memory per worker.
    block_bytes = min(_BLOCK_BYTES, memory // 4)
    block_rows = spec.compute.block_rows or _block_rows(block_bytes, widest_tile)
    # Few tiles (fewer than two per worker): tasks of several BLAS threads (up to one
    # machine's worth). On 2 cores that is one task per tile with both cores, tiles one after
    # another: one accumulator in memory, no idle worker at the end (faster than a task per
    # CPU, docs/performance.md). Tiles are split into row ranges (partials merged exactly)
    # only while all the partials together stay under _PARTIAL_BYTES: whatever the rows, the
    # job's memory is bounded (flat in rows). Many tiles: one single-threaded task per tile.
    tile_bytes = max(tile_sizes)
    if len(tiles) < 2 * workers:
        threads = min(workers, node_cpus or workers, _MAX_TASK_THREADS)
        splits = max(1, min(math.ceil(2 * workers / len(tiles)), math.ceil(n / block_rows)))
        if splits * len(tiles) * tile_bytes > _PARTIAL_BYTES:
            splits = 1
    else:
        threads, splits = 1, 1
    if spec.compute.bootstrap:
        # The bootstrap resamples row shards: one task per shard and tile, all partials
        # kept on the driver.
        splits = spec.compute.bootstrap_shards
        held = splits * len(tiles) * tile_bytes
        if held > default_memory_per_worker(1):
            raise InputError(
                f"compute.bootstrap keeps {splits} shards x {len(tiles)} tile partials "
                f"({held / 2**30:.1f} GiB) on the driver, more than half this machine's "
                "memory: use fewer bootstrap_shards or fewer or narrower units"
            )
        if n < 2 * splits:
            raise InputError(f"compute.bootstrap_shards ({splits}) needs at least 2 rows "
                             f"per shard; the job has {n} rows")
    edges = [rows[0] + (n * k) // splits for k in range(splits + 1)]
    row_ranges = tuple((edges[k], edges[k + 1]) for k in range(splits))
    # The driver finishes tiles after the accumulation, with every CPU, while the job's
    # moments take under a quarter of its memory; beyond, it finishes each tile as it
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
        threads=threads,
        stream_tiles=sum(tile_sizes) > default_memory_per_worker(1) // 2,
        block_bytes=0 if spec.compute.block_rows else block_bytes,
    )


def _block_rows(block_bytes: int, width: int) -> int:
    return int(min(_MAX_BLOCK_ROWS, max(_MIN_BLOCK_ROWS, block_bytes // (4 * width))))
