"""Where a plan's tasks run: in this process, or on Ray (an embedded instance or a cluster).

Both executors run the same plain task functions of :mod:`repscope.cluster.tasks` and offer
the same calls: :meth:`resources` (what the planner may use), :meth:`run_tiles`
(feature space: every tile's row-range tasks, each tile's moments handed over as soon as they
are complete), :meth:`run_grams` (sample space), :meth:`run_kernel_tiles` (one pass of the
kernel metrics' row-block tiles, each tile's partial handed over as it arrives) and
:meth:`read_samples` (sampled rows of units). This module is the only one that imports
Ray: remote functions are defined once per process (:func:`_remotes`), the embedded instance
is started in one function (:func:`_start_embedded`), and errors of our own raised inside a
task come back as themselves.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import SimpleNamespace

from repscope.cluster.gram import GramTile
from repscope.cluster.moments import merge_all
from repscope.cluster.pages import on_plain_pages
from repscope.cluster.tasks import (
    Checkpoints,
    GramTask,
    KernelTileTask,
    SampleTask,
    TileTask,
    accumulate_tile,
    gram_tile_task,
    kernel_tile_task,
    merge_parts,
    read_sample,
    read_unit_gram,
)
from repscope.errors import RepscopeError, StorageError

__all__ = ["Resources", "LocalExecutor", "RayExecutor", "connect", "machine_memory"]

# A task that failed on a transient storage error is run again, up to this many times; input
# and integrity errors are not retried (they would fail again). Lost workers are retried by
# Ray whatever the error.
TASK_RETRIES = 3

Tile = tuple[int, int]
OnTile = Callable[[Tile, object], None]
Progress = Callable[[float], None]


@dataclass(frozen=True)
class Resources:
    """What the machines offer a job: the planner's only view of them.

    workers: CPUs the job's tasks may use in all; node_cpus: CPUs of the largest node (one
    task's BLAS threads run on one node); memory_per_worker: bytes one task may hold;
    driver_cpus: threads the driver finishes pairs with; driver_memory: bytes of statistics
    the driver may hold at once; where: "process", "embedded" or "cluster".
    """

    workers: int
    node_cpus: int
    memory_per_worker: int
    driver_cpus: int
    driver_memory: int
    where: str


def machine_memory() -> int:
    """Physical memory of this machine in bytes (8 GiB when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def local_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _resources(workers: int, node_cpus: int, memory: int, where: str,
               memory_per_worker: int | None) -> Resources:
    # Half of a machine's memory for the job's statistics, shared among its workers.
    per_worker = memory_per_worker or max(256 << 20, memory // (2 * max(1, workers)))
    return Resources(workers=workers, node_cpus=node_cpus, memory_per_worker=per_worker,
                     driver_cpus=local_cpus(), driver_memory=machine_memory() // 2,
                     where=where)


class LocalExecutor:
    """Tasks in this process, one after another, each with every CPU's BLAS threads.

    For jobs too small to pay for starting Ray, and for stores only this process can see
    (memory://). No retries and no fault tolerance beyond checkpoints: a failed task fails
    the job.
    """

    def __init__(self, workers: int | None = None):
        self.cpus = min(workers or local_cpus(), local_cpus())

    def resources(self, memory_per_worker: int | None = None) -> Resources:
        return _resources(self.cpus, self.cpus, machine_memory(), "process", memory_per_worker)

    def run_tiles(self, store, tasks: dict[Tile, list[TileTask]], on_tile: OnTile, *,
                  progress: Progress | None = None, checkpoints: Checkpoints | None = None,
                  keep_parts: bool = False) -> None:
        """Run every tile's tasks; ``on_tile(tile, moments)`` as each tile completes (with
        ``keep_parts``, ``on_tile(tile, [partial per row range])``). Diagonal tiles first."""
        share = 1.0 / max(1, len(tasks))
        for tile in sorted(tasks, key=lambda t: t[0] != t[1]):
            parts = []
            for task in tasks[tile]:
                parts.append(accumulate_tile(store, replace(task, threads=self.cpus),
                                             checkpoints))
                if progress:
                    progress(task.rows * share)
            on_tile(tile, parts if keep_parts else merge_all(parts))

    def run_grams(self, store, tasks: list[GramTask], groups, tiles: dict[Tile, tuple], *,
                  svcca_threshold: float = 0.99, progress: Progress | None = None,
                  tile_threads: int = 1) -> dict[Tile, GramTile]:
        """Sample space: each unit's Gram, then each tile's pairs (see RayExecutor)."""
        grams = []
        for task in tasks:
            grams.append(read_unit_gram(store, replace(task, threads=self.cpus)))
            if progress:
                progress(1)
        out = {}
        for (a, b), tile_metrics in tiles.items():
            members = list(groups[a]) + ([] if a == b else list(groups[b]))
            out[(a, b)] = gram_tile_task(len(groups[a]), a == b, tuple(tile_metrics),
                                         svcca_threshold, self.cpus,
                                         *[grams[i] for i in members])
        return out

    def run_kernel_tiles(self, store, context, tasks: list[KernelTileTask], on_tile, *,
                         progress: Progress | None = None) -> None:
        """One pass of the kernel metrics: ``on_tile(partial)`` for each tile, in order."""
        for task in tasks:
            on_tile(kernel_tile_task(store, context, replace(task, threads=self.cpus)))
            if progress:
                progress(1)

    def read_samples(self, store, tasks: list[SampleTask]) -> list:
        """Each task's sampled rows, in task order."""
        return [read_sample(store, t) for t in tasks]

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Ray, at the edge.


@functools.cache
def _remotes() -> SimpleNamespace:
    """The task functions as Ray remote functions: defined once per process."""
    import ray

    on_storage_errors = dict(max_retries=TASK_RETRIES, retry_exceptions=[StorageError])

    def remote(task, **options):
        # A worker allocates a task's memory without numpy's huge-page advice (cluster/pages.py).
        return ray.remote(**options)(on_plain_pages(task))

    return SimpleNamespace(
        accumulate=remote(accumulate_tile, **on_storage_errors),
        merge=remote(merge_parts, max_retries=TASK_RETRIES),
        gram=remote(read_unit_gram, **on_storage_errors),
        gram_tile=remote(gram_tile_task, max_retries=TASK_RETRIES),
        kernel_tile=remote(kernel_tile_task, **on_storage_errors),
        sample=remote(read_sample, **on_storage_errors),
    )


def connect(address: str | None = None, workers: int | None = None) -> int:
    """Connect to a cluster (``address`` or RAY_ADDRESS) or start an embedded local instance,
    unless this process is connected already. Returns the number of CPUs the cluster offers.

    The embedded instance listens on loopback, has no dashboard and as many CPUs as the
    machine (or ``workers``). A cluster that refuses us for want of a token is reported in
    one line within seconds (Ray itself retries for ~20 s, printing a line a second).
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        common = dict(logging_level="ERROR", log_to_driver=False, configure_logging=True)
        token_mode = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
        try:
            if not address:
                with _quiet_stderr():
                    _start_embedded(workers, common)
            elif token_mode:
                with _quiet_stderr():
                    ray.init(address=address, **common)
            else:
                # Without token mode a token cluster can only refuse: try briefly first.
                try:
                    with _quiet_stderr(), _env(RAY_gcs_server_port_wait_time_s="3"):
                        ray.init(address=address, **common)
                except Exception as exc:
                    if _is_auth_error(exc):
                        raise
                    with _quiet_stderr():
                        ray.init(address=address, **common)
        except Exception as exc:  # ray raises ConnectionError, RuntimeError, its own types
            raise RepscopeError(_connect_message(address, exc)) from None
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


@contextmanager
def _env(**values: str):
    """Environment variables set for the block, restored after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _quiet_stderr():
    """Ray's C++ client writes a warning line per retry straight to file descriptor 2: keep
    them, and write them out only if connecting succeeds (a failure gets our one line)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            raise
        else:
            os.dup2(saved, 2)
            captured.seek(0)
            text = captured.read()
            if text:
                os.write(2, text)
        finally:
            os.close(saved)


def _is_auth_error(exc: BaseException | None) -> bool:
    """Whether ``exc`` or any exception it came from is a refused or missing token."""
    seen = 0
    while exc is not None and seen < 10:
        text = f"{type(exc).__name__} {exc}".lower()
        if "authentication" in text or "authtoken" in text or "auth token" in text:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _start_embedded(workers: int | None, common: dict) -> None:
    """A new single-node instance bound to loopback: the one place that needs Ray's private
    API (tests/reliability/test_loopback.py fails if an upgrade changes what it does).

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
        ray.init(address="local", num_cpus=workers or local_cpus(), include_dashboard=False,
                 _node_ip_address="127.0.0.1", **common)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _connect_message(address: str | None, exc: Exception) -> str:
    where = f"the Ray cluster at {address}" if address else "an embedded local Ray instance"
    if _is_auth_error(exc):
        return (
            f"{where} requires token authentication: set RAY_AUTH_MODE=token and make the "
            "cluster's token available (~/.ray/auth_token, RAY_AUTH_TOKEN or "
            "RAY_AUTH_TOKEN_PATH)"
        )
    first_line = (str(exc).splitlines() or [""])[0]
    return f"cannot start or reach {where}: {type(exc).__name__}: {first_line}"


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


def _tree(refs: list, merge_remote, fan_in: int = 4):
    """Merge partials in a tree of tasks (log depth), returning the root's reference."""
    while len(refs) > 1:
        refs = [
            merge_remote.remote(*refs[i: i + fan_in]) if len(refs[i: i + fan_in]) > 1
            else refs[i]
            for i in range(0, len(refs), fan_in)
        ]
    return refs[0]


class RayExecutor:
    """Tasks on a Ray cluster: ``address`` (or RAY_ADDRESS), else an embedded local instance.

    Connects on first use. :meth:`close` shuts Ray down only if this executor connected it:
    an instance the caller started stays theirs.
    """

    def __init__(self, address: str | None = None, workers: int | None = None):
        self.address = address
        self.workers = workers
        self._owned = False
        self._cpus: int | None = None

    def _connect(self) -> int:
        import ray

        if self._cpus is None:
            self._owned = not ray.is_initialized()
            self._cpus = connect(self.address, self.workers)
        return self._cpus

    def resources(self, memory_per_worker: int | None = None) -> Resources:
        import ray

        cpus = self._connect()
        workers = min(self.workers or cpus, cpus)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        node_cpus = max([int(n["Resources"].get("CPU", 0)) for n in nodes] + [1])
        node_memory = max([int(n["Resources"].get("memory", 0)) for n in nodes] + [0])
        where = "cluster" if (self.address or os.environ.get("RAY_ADDRESS")) else "embedded"
        # A node's memory is shared by its CPUs' tasks: per worker, the largest node's share.
        memory = node_memory * workers // max(1, node_cpus) if node_memory else machine_memory()
        return _resources(workers, node_cpus, memory, where, memory_per_worker)

    def run_tiles(self, store, tasks: dict[Tile, list[TileTask]], on_tile: OnTile, *,
                  progress: Progress | None = None, checkpoints: Checkpoints | None = None,
                  keep_parts: bool = False) -> None:
        """Run every task, merge each tile's partials in a tree of tasks, and hand each tile's
        moments to ``on_tile(tile, moments)`` as soon as they are ready (then drop every
        reference to them, so Ray frees them). With ``keep_parts``: ``on_tile(tile, parts)``
        with the unmerged row-range partials (the bootstrap resamples them). progress(rows)
        as tasks finish, rows spread evenly over the tiles (a full pass reports the job's
        rows). Diagonal tiles are submitted first: their per-unit work comes first."""
        import ray

        self._connect()
        remote = _remotes()
        store_ref = ray.put(store)
        share = 1.0 / max(1, len(tasks))
        parts: dict[Tile, list] = {}
        rows_of = {}
        for tile in sorted(tasks, key=lambda t: t[0] != t[1]):
            parts[tile] = [remote.accumulate.options(num_cpus=t.threads or 1).remote(
                store_ref, t, checkpoints) for t in tasks[tile]]
            rows_of.update({ref: t.rows * share for ref, t in zip(parts[tile], tasks[tile],
                                                                   strict=True)})
        if keep_parts:
            finals = {tile: refs for tile, refs in parts.items()}
        else:
            finals = {tile: _tree(list(refs), remote.merge) for tile, refs in parts.items()}
        waiting = {}  # the reference that completes a tile -> the tile
        for tile, final in finals.items():
            waiting[final[-1] if keep_parts else final] = tile
        pending = set(rows_of) | set(waiting)
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, fetch_local=False)
                for ref in done:
                    pending.discard(ref)
                    if progress and ref in rows_of:
                        progress(rows_of.pop(ref))
                    if ref not in waiting:
                        continue
                    tile = waiting.pop(ref)
                    if keep_parts:
                        ray.wait(parts[tile], num_returns=len(parts[tile]))
                        on_tile(tile, _get(parts[tile]))
                    else:
                        on_tile(tile, _get([ref])[0])
                    for part in parts.pop(tile):  # done, some not yet reported by ray.wait
                        if part in pending and part in rows_of:
                            pending.discard(part)
                            if progress:
                                progress(rows_of[part])
                        rows_of.pop(part, None)
                    del finals[tile]
        except BaseException:
            # A failed job leaves no task behind writing checkpoints (in a long-lived
            # process such as a notebook the instance outlives the job).
            for ref in pending:
                ray.cancel(ref)
            raise

    def run_grams(self, store, tasks: list[GramTask], groups, tiles: dict[Tile, tuple], *,
                  svcca_threshold: float = 0.99, progress: Progress | None = None,
                  tile_threads: int = 1) -> dict[Tile, GramTile]:
        """Sample space: one task per unit computes its Gram (kept in the object store,
        computed once whatever the tiles), then one task per tile of unit groups computes the
        pairs' inner products and, for the metrics ``tiles`` maps the tile to, the basis
        metrics from the units' Grams. progress(1) as each unit's Gram is done.
        tile_threads: BLAS threads (and Ray CPUs) of each tile task."""
        import ray

        self._connect()
        remote = _remotes()
        store_ref = ray.put(store)
        grams = [remote.gram.options(num_cpus=t.threads or 1).remote(store_ref, t)
                 for t in tasks]
        refs = {}
        for (a, b), tile_metrics in tiles.items():
            members = list(groups[a]) + ([] if a == b else list(groups[b]))
            refs[(a, b)] = remote.gram_tile.options(num_cpus=tile_threads).remote(
                len(groups[a]), a == b, tuple(tile_metrics), svcca_threshold, tile_threads,
                *[grams[i] for i in members])
        pending = list(grams)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, fetch_local=False)
            if progress:
                progress(len(done))
        return dict(zip(refs, _get(list(refs.values())), strict=True))

    def run_kernel_tiles(self, store, context, tasks: list[KernelTileTask], on_tile, *,
                         progress: Progress | None = None) -> None:
        """One pass of the kernel metrics: every tile a task (``context`` put in the object
        store once), ``on_tile(partial)`` as each arrives, then its reference dropped."""
        import ray

        self._connect()
        remote = _remotes()
        store_ref, context_ref = ray.put(store), ray.put(context)
        pending = [remote.kernel_tile.options(num_cpus=t.threads or 1).remote(
            store_ref, context_ref, t) for t in tasks]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            on_tile(_get(done)[0])
            if progress:
                progress(1)

    def read_samples(self, store, tasks: list[SampleTask]) -> list:
        """Each task's sampled rows, in task order (one task per unit)."""
        import ray

        self._connect()
        store_ref = ray.put(store)
        return _get([_remotes().sample.remote(store_ref, t) for t in tasks])

    def close(self) -> None:
        import ray

        if self._owned and ray.is_initialized():
            ray.shutdown()
        self._owned, self._cpus = False, None
