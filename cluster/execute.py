"""Distributed accumulation of a plan's statistics on Ray.

The work itself is plain code (:func:`accumulate_tile`, :func:`merge_parts`), testable without
a cluster; Ray is applied once, at the edge, in :func:`run_tiles`. Each task reads its row
range block by block for the units of one tile, prefetching the next block while the current
one multiplies, and returns its partial moments, so Ray can rebuild a lost partial by running
the task again. Partials of a tile are merged in a tree of tasks (exact, associative merges).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from repscope.cluster.accumulate import TileAccumulator, shift_block
from repscope.cluster.gram import GramTile, UnitGram, gram_tile, unit_gram
from repscope.cluster.moments import CrossMoments, merge, merge_all
from repscope.errors import RepscopeError

# Transient storage errors are retried by Ray; user errors are not (they would fail again).
TASK_RETRIES = 3


@dataclass(frozen=True)
class TileTask:
    """One task: the moments of tile (group a, group b) over rows [start, stop).

    units_a / units_b: (model, layer) of each unit, in column order; units_b is None for a
    diagonal tile (a == b), whose symmetric product is computed once.
    """

    units_a: tuple[tuple[str, str], ...]
    widths_a: tuple[int, ...]
    units_b: tuple[tuple[str, str], ...] | None
    widths_b: tuple[int, ...] | None
    start: int
    stop: int
    block_rows: int
    fourth: bool
    precision: str
    threads: int | None = None  # BLAS threads (and Ray CPUs) of the task; None: 1
    checkpoint_key: str | None = None  # where the task saves its progress (see Checkpoints)
    # Save the finished task's moments too: only worth it when the tile waits for sibling
    # row-range tasks; a tile of one task is finished (and saved small) right away.
    save_result: bool = True

    @property
    def rows(self) -> int:
        return self.stop - self.start


def read_group(store, units, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of several units side by side: ndarray (stop - start, sum widths)."""
    parts = [store.read(model, layer, start, stop) for model, layer in units]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def _blocks(task: TileTask) -> Iterator[tuple[int, int]]:
    for start in range(task.start, task.stop, task.block_rows):
        yield start, min(start + task.block_rows, task.stop)


def blas_threads(threads: int | None):
    """A context limiting (or raising) the BLAS threads of this process; no-op for None."""
    from contextlib import nullcontext

    if not threads:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads, user_api="blas")


@dataclass(frozen=True)
class Checkpoints:
    """Where tasks save their progress and how often.

    state: any object with put_partial(key, moments) and get_partial(key) (jobs.state
    StateStore). A task saves the moments of the rows it has done at least every `seconds`
    and, if its `save_result`, when it finishes; a task that finds a saved partial continues
    after its rows (the partial's n), so a rerun after a crash or a retried task recomputes
    only the rest.
    """

    state: object
    seconds: float = 120.0


def accumulate_tile(store, task: TileTask, checkpoints: Checkpoints | None = None) -> CrossMoments:
    """Stream a task's rows block by block and return the tile's merged moments."""
    with blas_threads(task.threads):
        if checkpoints is None or task.checkpoint_key is None:
            return _accumulate_tile(store, task)
        return _accumulate_checkpointed(store, task, checkpoints)


def _accumulate_checkpointed(store, task: TileTask, checkpoints: Checkpoints) -> CrossMoments:
    key = task.checkpoint_key
    saved = checkpoints.state.get_partial(key)
    if saved is not None and saved.n >= task.rows:
        return saved
    done = 0 if saved is None else saved.n
    last = time.monotonic()

    def with_saved(moments: CrossMoments) -> CrossMoments:
        return moments if saved is None else merge(saved, moments)

    def on_block(current: Callable[[], CrossMoments]) -> None:
        nonlocal last
        if time.monotonic() - last >= checkpoints.seconds:
            checkpoints.state.put_partial(key, with_saved(current()))
            last = time.monotonic()

    total = with_saved(_accumulate_tile(store, replace(task, start=task.start + done), on_block))
    if task.save_result:
        checkpoints.state.put_partial(key, total)
    return total


def _accumulate_tile(
    store, task: TileTask, on_block: Callable[[Callable[[], CrossMoments]], None] | None = None
) -> CrossMoments:
    """The task's rows in blocks; on_block(current) after each block may snapshot progress
    (current() returns the moments of the blocks done so far)."""
    gemm_dtype = np.float32 if task.precision == "float32" else np.float64

    def read(block: tuple[int, int]):
        za = read_group(store, task.units_a, *block)
        zb = None if task.units_b is None else read_group(store, task.units_b, *block)
        # Shifted here, in the reader thread, while the previous block's product runs. The
        # blocks are fresh arrays read for this task: shifted in place.
        return (shift_block(za, gemm_dtype, "a", overwrite=True),
                None if zb is None else shift_block(zb, gemm_dtype, "b", overwrite=True))

    blocks = list(_blocks(task))
    # One reader thread: the next block's I/O overlaps this block's GEMM (cluster.blas drops
    # the GIL), and the first block's I/O overlaps allocating the accumulator (seconds for
    # gigabytes of fresh pages in a new worker).
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, blocks[0])
        acc = TileAccumulator(task.widths_a, task.widths_b, fourth=task.fourth,
                              gemm_dtype=gemm_dtype)
        for k in range(len(blocks)):
            za, zb = pending.result()
            if k + 1 < len(blocks):
                pending = pool.submit(read, blocks[k + 1])
            acc.update(za, zb)
            if on_block is not None and k + 1 < len(blocks):
                on_block(lambda: acc.result(keep=True))
    return acc.result()


def merge_parts(*parts: CrossMoments) -> CrossMoments:
    return merge_all(parts)


@dataclass(frozen=True)
class GramTask:
    """Sample space, per-unit work: the centered Gram of one unit over rows [start, stop)."""

    unit: tuple[str, str]
    start: int
    stop: int
    precision: str
    basis: bool  # also the Gram's eigenpairs (CCA family, Procrustes)
    threads: int | None = None


def read_unit_gram(store, task: GramTask) -> UnitGram:
    """Read one unit's rows and compute its :class:`UnitGram`: plain code, no Ray."""
    model, layer = task.unit
    dtype = np.float32 if task.precision == "float32" else np.float64
    with blas_threads(task.threads):
        x = store.read(model, layer, task.start, task.stop)
        return unit_gram(x, dtype=dtype, basis=task.basis, name=f"{model}/{layer}")


def _gram_tile_task(n_a: int, diagonal: bool, metrics, svcca_threshold, threads,
                    *grams) -> GramTile:
    # Ray resolves object references only as top-level arguments: the units come flat.
    a, b = grams[:n_a], None if diagonal else grams[n_a:]
    with blas_threads(threads):
        return gram_tile(a, b, metrics, svcca_threshold=svcca_threshold)


def run_grams(
    store,
    tasks: list[GramTask],
    groups: tuple[tuple[int, ...], ...],
    tiles: tuple[tuple[int, int], ...],
    metrics,
    *,
    svcca_threshold: float = 0.99,
    progress: Callable[[int], None] | None = None,
    tile_threads: int = 1,
) -> dict[tuple[int, int], GramTile]:
    """Sample space on the connected Ray cluster: one task per unit computes its Gram (kept
    in the object store, computed once whatever the tiles), then one task per tile of unit
    groups computes the pairs' inner products and basis metrics from the units' Grams.

    progress(1) is called as each unit's Gram is done. tile_threads: BLAS threads (and Ray
    CPUs) of each tile task.
    """
    import ray

    unit_remote = ray.remote(max_retries=TASK_RETRIES, retry_exceptions=[OSError])(
        read_unit_gram)
    tile_remote = ray.remote(max_retries=TASK_RETRIES)(_gram_tile_task)
    store_ref = ray.put(store)
    grams = [unit_remote.options(num_cpus=t.threads or 1).remote(store_ref, t) for t in tasks]
    refs = {}
    for a, b in tiles:
        members = list(groups[a]) + ([] if a == b else list(groups[b]))
        refs[(a, b)] = tile_remote.options(num_cpus=tile_threads).remote(
            len(groups[a]), a == b, tuple(metrics), svcca_threshold, tile_threads,
            *[grams[i] for i in members])
    pending = list(grams)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, fetch_local=False)
        if progress:
            progress(len(done))
    return dict(zip(refs, _get(list(refs.values())), strict=True))


# ---------------------------------------------------------------------------------------------
# Ray, at the edge.


def connect(address: str | None = None, workers: int | None = None) -> int:
    """Connect to a cluster (address or RAY_ADDRESS) or start an embedded local instance.

    The embedded instance listens on loopback, has no dashboard and as many CPUs as the
    machine (or `workers`). Returns the number of CPUs the cluster offers.
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        common = dict(logging_level="ERROR", log_to_driver=False, configure_logging=True)
        try:
            if address:
                ray.init(address=address, **common)
            else:
                _init_embedded(workers, common)
        except Exception as exc:  # ray raises ConnectionError, RuntimeError, its own types
            raise RepscopeError(_connect_message(address, exc)) from None
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _init_embedded(workers: int | None, common: dict) -> None:
    """A new single-node instance bound to loopback.

    address="local" always starts a new instance: never join a cluster that happens to run
    on this machine. Ray replaces a loopback node address with the machine's interface
    address unless it believes multi-node clusters are off (its flag for macOS and Windows),
    so that flag is lowered while the instance starts: every server of the instance then
    binds 127.0.0.1. It is restored at once, so a later driver in this process can still
    join real clusters.
    """
    import ray
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(
            address="local",
            num_cpus=workers or os.cpu_count(),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            **common,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def largest_node_cpus() -> int:
    """CPUs of the largest live node of the connected cluster: the most one task can use."""
    import ray

    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return max(1, int(max(cpus, default=1)))


def _connect_message(address: str | None, exc: Exception) -> str:
    where = f"the Ray cluster at {address}" if address else "an embedded local Ray instance"
    if "uthentication" in str(exc):
        return (
            f"{where} requires token authentication: set RAY_AUTH_MODE=token and make the "
            "cluster's token available (~/.ray/auth_token or RAY_AUTH_TOKEN)"
        )
    first_line = (str(exc).splitlines() or [""])[0]
    return f"cannot start or reach {where}: {type(exc).__name__}: {first_line}"


def _remote_functions():
    import ray

    accumulate = ray.remote(max_retries=TASK_RETRIES, retry_exceptions=[OSError])(
        accumulate_tile
    )
    merge_remote = ray.remote(max_retries=TASK_RETRIES)(merge_parts)
    return accumulate, merge_remote


def _tree(refs: list, merge_remote, fan_in: int = 4):
    while len(refs) > 1:
        refs = [
            merge_remote.remote(*refs[i : i + fan_in]) if len(refs[i : i + fan_in]) > 1
            else refs[i]
            for i in range(0, len(refs), fan_in)
        ]
    return refs[0]


def _get(refs: list) -> list:
    """ray.get, re-raising our own errors from a task as themselves: one line naming the
    store, unit and rows, without Ray's remote traceback around it."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, RepscopeError):
            raise exc.cause from None
        raise


def run_tiles(
    store,
    tasks: dict[tuple[int, int], list[TileTask]],
    progress: Callable[[int], None] | None = None,
    checkpoints: Checkpoints | None = None,
    keep_parts: bool = False,
    on_tile: Callable[[tuple[int, int], CrossMoments], None] | None = None,
) -> dict | None:
    """Run every task on the connected Ray cluster and merge each tile's partials.

    tasks: tile -> its row-range tasks. progress(rows) is called as tasks finish, with the
    rows they covered divided evenly over the tiles (so a full pass reports the job's rows).
    Returns {tile: merged moments}; or with keep_parts, {tile: list of row-range partials}
    unmerged (for the bootstrap, which resamples them); or with on_tile, None: each tile's
    merged moments are handed to on_tile(tile, moments) as soon as they are ready and then
    released, so the driver holds one tile at a time, not the job's. Diagonal tiles are
    submitted first (their units' per-unit work comes first in finalizing).
    """
    import ray

    accumulate, merge_remote = _remote_functions()
    store_ref = ray.put(store)
    n_tiles = len(tasks)
    refs: dict[tuple[int, int], list] = {}
    rows_of = {}
    for tile in sorted(tasks, key=lambda t: t[0] != t[1]):
        ts = tasks[tile]
        refs[tile] = [
            accumulate.options(num_cpus=t.threads or 1).remote(store_ref, t, checkpoints)
            for t in ts
        ]
        rows_of.update({ref: t.rows / n_tiles for ref, t in zip(refs[tile], ts, strict=True)})
    if not keep_parts:
        finals = {tile: _tree(list(rs), merge_remote) for tile, rs in refs.items()}

    streamed = {ref: tile for tile, ref in finals.items()} if on_tile else {}
    pending = set(rows_of) | set(streamed)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, fetch_local=False)
        for r in done:
            pending.discard(r)
            if progress and r in rows_of:
                progress(rows_of.pop(r))
            if r in streamed:
                tile = streamed.pop(r)
                on_tile(tile, _get([r])[0])
                # Drop every reference to the tile's partials, so Ray frees them.
                for part in refs.pop(tile):
                    if part in pending:  # done, but not yet reported by ray.wait
                        pending.discard(part)
                        if progress:
                            progress(rows_of[part])
                    rows_of.pop(part, None)
                del finals[tile]
    if on_tile:
        return None
    if keep_parts:
        return {tile: _get(rs) for tile, rs in refs.items()}
    return dict(zip(finals, _get(list(finals.values())), strict=True))


class Progress:
    """Rows (or other ``unit``s of work) done, rate and ETA on stderr: a live bar on a
    terminal, a line per stage elsewhere."""

    def __init__(self, total_rows: int, label: str = "accumulate", stream=None,
                 unit: str = "rows"):
        self.total = max(1, total_rows)
        self.unit = unit
        self.closed = False
        self.done = 0.0
        self.label = label
        self.stream = stream or sys.stderr
        self.live = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = time.perf_counter()

    def __call__(self, rows: float) -> None:
        # Tasks report fractions of rows (their rows spread over the tiles): round at the end.
        self.done = min(self.total, self.done + rows)
        if not self.live:
            return
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        frac = self.done / self.total
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        eta_s = f"{eta:5.0f}s" if math.isfinite(eta) else "    ?"
        self.stream.write(
            f"\r{self.label} [{bar}] {int(self.done):,}/{self.total:,} {self.unit} "
            f"{rate:,.{0 if rate >= 10 else 2}f} {self.unit}/s ETA {eta_s}"
        )
        self.stream.flush()

    def close(self) -> None:
        """The stage's summary line (once; later calls do nothing)."""
        if self.closed:
            return
        self.closed = True
        elapsed = time.perf_counter() - self.t0
        if self.live:
            self.stream.write("\n")
        self.stream.write(f"{self.label}: {round(self.done):,} {self.unit} in {elapsed:.1f} s\n")
        self.stream.flush()
