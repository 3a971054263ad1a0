"""What a job's workers run: plain functions over a store, testable without a cluster.

A feature-space :class:`TileTask` streams its row range block by block for the units of one
tile (prefetching the next block while the current one multiplies) into one
:class:`~repscope.cluster.accumulate.TileAccumulator` and returns the partial moments; partials
of a tile's row ranges merge exactly (:func:`merge_parts`). A sample-space :class:`GramTask`
computes one unit's centered Gram; :func:`gram_tile_task` the per-pair work of a tile of unit
groups from their Grams. A :class:`KernelTileTask` computes one row-block tile of the kernel
metrics (:func:`kernel_tile_task`), a :class:`SampleTask` reads one unit's sampled rows
(:func:`read_sample`). Where these run (in this process, or as Ray tasks) is
:mod:`repscope.cluster.execute`'s business.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np

from repscope.cluster.accumulate import TileAccumulator, shift_block
from repscope.cluster.gram import GramTile, UnitGram, decided_gram, gram_tile
from repscope.cluster.moments import CrossMoments, merge, merge_all

__all__ = [
    "UnitRef",
    "TileTask",
    "GramTask",
    "Checkpoints",
    "read_group",
    "accumulate_tile",
    "merge_parts",
    "read_unit_gram",
    "gram_tile_task",
    "KernelTileTask",
    "kernel_tile_task",
    "SampleTask",
    "read_sample",
    "blas_threads",
]


@dataclass(frozen=True)
class UnitRef:
    """One unit as a task reads it: (model, layer) and the content version fixed at planning
    (None: whatever the store holds when the task reads)."""

    model: str
    layer: str
    version: str | None = None

    @property
    def label(self) -> str:
        return f"{self.model}/{self.layer}"


@dataclass(frozen=True)
class TileTask:
    """One task: the moments of tile (group a, group b) over rows [start, stop).

    units_a / units_b: the units of each group, in column order; units_b is None for a
    diagonal tile (a == b), whose symmetric product is computed once.
    """

    units_a: tuple[UnitRef, ...]
    widths_a: tuple[int, ...]
    units_b: tuple[UnitRef, ...] | None
    widths_b: tuple[int, ...] | None
    start: int
    stop: int
    block_rows: int
    fourth: bool
    precision: str
    threads: int | None = None  # BLAS threads (and Ray CPUs) of the task; None: 1
    checkpoint_key: str | None = None  # where the task saves its progress (see Checkpoints)
    # Save the finished task's moments too: only worth it when the tile waits for sibling
    # row-range tasks or other tiles; a tile of one task is finished (and saved small) at once.
    save_result: bool = True

    @property
    def rows(self) -> int:
        return self.stop - self.start


def read_group(store, units: tuple[UnitRef, ...], start: int, stop: int,
               out: _Slot | None = None) -> np.ndarray:
    """Rows [start, stop) of several units side by side: ndarray (stop - start, sum widths).

    ``out``, when given, is a :class:`Buffers` slot: the group is assembled in memory reused
    from the previous block, each unit read into one scratch array and copied into its
    columns at once. Memory touched for the first time can cost more than the read itself
    (page faults of a VM: docs/performance.md)."""
    if out is None:
        parts = [store.read(u.model, u.layer, start, stop, version=u.version) for u in units]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    infos = [store.unit_info(u.model, u.layer, version=u.version) for u in units]
    shape = (stop - start, sum(i.features for i in infos))
    dtype = np.result_type(*[i.dtype for i in infos])
    if len(units) == 1:  # read straight into the slot
        u = units[0]
        return store.read(u.model, u.layer, start, stop, version=u.version,
                          out=out.group(shape, dtype))
    group = out.group(shape, dtype)
    column = 0
    for u, info in zip(units, infos, strict=True):
        part = store.read(u.model, u.layer, start, stop, version=u.version,
                          out=out.scratch((stop - start, info.features), info.dtype))
        group[:, column:column + info.features] = part
        column += info.features
    return group


class Buffers:
    """Arrays a task reuses from block to block: per slot, the group's rows (the reader
    fills one slot while the product reads the other); for groups of several units, one
    scratch array for a unit's rows as read (only the reader thread uses it, and copies each
    unit into the slot at once)."""

    def __init__(self) -> None:
        self.arrays: dict = {}

    def _get(self, key, shape: tuple[int, int], dtype) -> np.ndarray:
        a = self.arrays.get(key)
        size = shape[0] * shape[1]
        if a is None or a.dtype != dtype or a.size < size:
            a = self.arrays[key] = np.empty(size, dtype)
        return a[:size].reshape(shape)

    def slot(self, key) -> _Slot:
        return _Slot(self, key)


@dataclass(frozen=True)
class _Slot:
    buffers: Buffers
    key: object

    def group(self, shape: tuple[int, int], dtype) -> np.ndarray:
        """The slot's rows of the group."""
        return self.buffers._get(("group", self.key), shape, dtype)

    def scratch(self, shape: tuple[int, int], dtype) -> np.ndarray:
        """Where one unit of a group is read before its copy into the group: shared by the
        slots (only the reader thread uses it)."""
        return self.buffers._get(("scratch", np.dtype(dtype).str), shape, dtype)


def blas_threads(threads: int | None):
    """A context limiting (or raising) the BLAS threads of this process; no-op for None."""
    if not threads:
        return nullcontext()
    # threadpoolctl limits the BLAS libraries loaded when the limit is set: load scipy's (the
    # accumulation's products, cluster/blas.py) first, or a new process's first task runs
    # them on every core whatever its limit.
    from scipy.linalg import cython_blas  # noqa: F401
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads, user_api="blas")


@dataclass(frozen=True)
class Checkpoints:
    """Where tasks save their progress and how often.

    state: any object with put_partial(key, moments) and get_partial(key)
    (:class:`repscope.jobs.state.StateStore`). A task saves the moments of the rows it has
    done at least every ``seconds`` and, if its ``save_result`` and it ran that long, when it
    finishes (a crash loses at most ``seconds`` of a task's work either way); a task that
    finds a saved partial continues after its rows (the partial's n), so a rerun after a crash
    or a retried task recomputes only the rest.
    """

    state: object
    seconds: float = 120.0


def accumulate_tile(store, task: TileTask, checkpoints: Checkpoints | None = None) -> CrossMoments:
    """Stream a task's rows block by block and return the tile's moments over them."""
    with blas_threads(task.threads):
        if checkpoints is None or task.checkpoint_key is None:
            return _accumulate(store, task)
        return _accumulate_checkpointed(store, task, checkpoints)


def _accumulate_checkpointed(store, task: TileTask, checkpoints: Checkpoints) -> CrossMoments:
    key = task.checkpoint_key
    saved = checkpoints.state.get_partial(key)
    if saved is not None and saved.n >= task.rows:
        return saved
    done = 0 if saved is None else saved.n
    started = last = time.monotonic()

    def with_saved(moments: CrossMoments) -> CrossMoments:
        return moments if saved is None else merge(saved, moments)

    def on_block(current: Callable[[], CrossMoments]) -> None:
        nonlocal last
        if time.monotonic() - last >= checkpoints.seconds:
            checkpoints.state.put_partial(key, with_saved(current()))
            last = time.monotonic()

    total = with_saved(_accumulate(store, replace(task, start=task.start + done), on_block))
    # Saved only after at least `seconds` of work: checkpoints promise that a crash loses at
    # most that much of a task, and a shorter task costs less to recompute than to write
    # (a 6,144-wide tile's moments are 302 MB: seconds of writing, docs/performance.md).
    if task.save_result and time.monotonic() - started >= checkpoints.seconds:
        checkpoints.state.put_partial(key, total)
    return total


# The first block's read overlaps nothing, every later one the product before it: so the
# first block is small, and just large enough that its product (which has a fixed cost of one
# pass over the tile's accumulator) lasts as long as the next full block's read.
FIRST_BLOCK_ROWS = 2048


def _blocks(task: TileTask) -> Iterator[tuple[int, int]]:
    first = min(task.block_rows, FIRST_BLOCK_ROWS)
    starts = [task.start, *range(task.start + first, task.stop, task.block_rows)]
    for start, stop in zip(starts, [*starts[1:], task.stop], strict=True):
        if start < stop:
            yield start, stop


def _accumulate(
    store, task: TileTask, on_block: Callable[[Callable[[], CrossMoments]], None] | None = None
) -> CrossMoments:
    """The task's rows in blocks; on_block(current) after each block may snapshot progress
    (current() returns the moments of the blocks done so far)."""
    gemm_dtype = np.float32 if task.precision == "float32" else np.float64

    buffers = Buffers()

    def read(k: int):
        block = blocks[k]
        za = read_group(store, task.units_a, *block, out=buffers.slot(("a", k % 2)))
        zb = None if task.units_b is None else read_group(store, task.units_b, *block,
                                                          out=buffers.slot(("b", k % 2)))
        # Shifted here, in the reader thread, while the previous block's product runs. The
        # blocks are fresh arrays read for this task: shifted in place.
        return (shift_block(za, gemm_dtype, "a", overwrite=True),
                None if zb is None else shift_block(zb, gemm_dtype, "b", overwrite=True))

    blocks = list(_blocks(task))
    if not blocks:
        return TileAccumulator(task.widths_a, task.widths_b, fourth=task.fourth,
                               gemm_dtype=gemm_dtype).result()
    # One reader thread: the next block's I/O overlaps this block's GEMM (cluster.blas drops
    # the GIL), and the first block's I/O overlaps allocating the accumulator (seconds for
    # gigabytes of fresh pages in a new worker).
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, 0)
        acc = TileAccumulator(task.widths_a, task.widths_b, fourth=task.fourth,
                              gemm_dtype=gemm_dtype)
        for k in range(len(blocks)):
            za, zb = pending.result()
            if k + 1 < len(blocks):
                pending = pool.submit(read, k + 1)
            acc.update(za, zb)
            if on_block is not None and k + 1 < len(blocks):
                on_block(lambda: acc.result(keep=True))
    return acc.result()


def merge_parts(*parts: CrossMoments) -> CrossMoments:
    """The exact merge of a tile's partials over disjoint row ranges."""
    return merge_all(parts)


@dataclass(frozen=True)
class GramTask:
    """Sample space, per-unit work: the centered Gram of one unit over rows [start, stop)."""

    unit: UnitRef
    start: int
    stop: int
    precision: str
    basis: bool  # also the Gram's eigenpairs (CCA family, Procrustes)
    threads: int | None = None
    eig_floor: float | None = None  # compute.eig_floor (None: the precision's cut)
    ambiguous_rank: str = "recompute"  # compute.ambiguous_rank


def read_unit_gram(store, task: GramTask) -> UnitGram:
    """Read one unit's rows and compute its :class:`~repscope.cluster.gram.UnitGram`."""
    dtype = np.float32 if task.precision == "float32" else np.float64
    with blas_threads(task.threads):
        x = read_group(store, (task.unit,), task.start, task.stop)
        return decided_gram(x, dtype=dtype, basis=task.basis, eig_floor=task.eig_floor,
                            ambiguous_rank=task.ambiguous_rank, name=task.unit.label)


def gram_tile_task(n_a: int, diagonal: bool, metrics, svcca_threshold: float,
                   threads: int | None, *grams: UnitGram) -> GramTile:
    """The per-pair work of a tile of unit groups from their Grams: group a's ``n_a`` Grams
    first, then group b's (none for a diagonal tile). The Grams come flat because Ray resolves
    object references only as top-level arguments."""
    a, b = grams[:n_a], None if diagonal else grams[n_a:]
    with blas_threads(threads):
        return gram_tile(a, b, metrics, svcca_threshold=svcca_threshold)


@dataclass(frozen=True)
class KernelTileTask:
    """Kernel metrics, one tile: row blocks I = [start_i, stop_i) and J of every unit (J is
    I for a diagonal tile), absolute store rows; ``first_row`` is the job's first row. A
    ``query`` tile takes block I from the pass's sampled query rows instead: positions
    [start_i, stop_i) of ``context.queries``."""

    units: tuple[UnitRef, ...]
    i: int
    j: int
    block_i: tuple[int, int]
    block_j: tuple[int, int]
    first_row: int
    threads: int | None = None
    query: bool = False

    @property
    def rows(self) -> int:
        """Rows read (both blocks)."""
        own = self.block_i[1] - self.block_i[0]
        return own if self.i == self.j else own + self.block_j[1] - self.block_j[0]


def kernel_tile_task(store, context, task: KernelTileTask):
    """Read a tile's blocks of every unit and return its
    :class:`~repscope.cluster.kernel_tiles.TilePartial` for the pass ``context``."""
    from repscope.cluster.kernel_tiles import kernel_tile

    with blas_threads(task.threads):
        if task.query:
            q0, q1 = task.block_i
            xs_j = [read_group(store, (u,), *task.block_j) for u in task.units]
            return kernel_tile(context, task.i, task.j, [q[q0:q1] for q in context.queries],
                               xs_j, 0, task.block_j[0] - task.first_row,
                               ids_i=context.query_ids[q0:q1])
        xs_i = [read_group(store, (u,), *task.block_i) for u in task.units]
        xs_j = None if task.i == task.j else [read_group(store, (u,), *task.block_j)
                                              for u in task.units]
        return kernel_tile(context, task.i, task.j, xs_i, xs_j,
                           task.block_i[0] - task.first_row, task.block_j[0] - task.first_row)


@dataclass(frozen=True)
class SampleTask:
    """One unit's rows at ``rows`` (sorted absolute row numbers within [start, stop))."""

    unit: UnitRef
    start: int
    stop: int
    rows: tuple[int, ...]


# Rows read at once while picking a sample (the unit is read in pieces of this many rows).
_SAMPLE_READ_ROWS = 65536


def read_sample(store, task: SampleTask) -> np.ndarray:
    """The sampled rows of one unit, (len(rows), d), in the store's dtype."""
    wanted = np.asarray(task.rows, dtype=np.int64)
    parts = []
    for start in range(task.start, task.stop, _SAMPLE_READ_ROWS):
        stop = min(task.stop, start + _SAMPLE_READ_ROWS)
        here = wanted[(wanted >= start) & (wanted < stop)]
        if here.size:
            parts.append(read_group(store, (task.unit,), start, stop)[here - start])
    return np.concatenate(parts)
