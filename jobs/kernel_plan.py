"""Planning the kernel metrics (rbf_cka, rsa, mutual_knn): row blocks, tiles and passes.

Pure, like :mod:`repscope.jobs.plan`: the spec, the selection and the executor's resources
in, decisions out. Three regimes, by size:

- exact (n <= compute.exact_rows): every tile (I, J) of row blocks, one pass per stage
  (:mod:`repscope.cluster.kernel_tiles`). The median and RSA's ranks are gathered exactly
  while units x n(n-1)/2 <= compute.exact_entries, else counted into histograms whose ranges
  come from a sample of rows (error bounds in the results' attributes).
- approximate (n > exact_rows): rbf_cka and rsa on a uniform sample of compute.sample_rows
  rows (error bars from four disjoint quarters of it), mutual_knn for that many sampled query
  rows against all rows (exact neighbours, standard error over the query rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from repscope.cluster.execute import Resources
from repscope.cluster.kernel_tiles import KernelSetup, block_bounds, check_setup, tile_pairs
from repscope.cluster.registry import KERNEL_METRICS, metric_options
from repscope.cluster.tasks import KernelTileTask, SampleTask
from repscope.errors import InputError
from repscope.jobs.spec import JobSpec

__all__ = ["KernelPlan", "make_kernel_plan", "kernel_metrics_of"]

# Row blocks: between these many rows; by default as many as a quarter of a worker's memory
# holds for both blocks of every unit (raw, shifted and float64 copies: ~16 bytes a value).
_MIN_BLOCK_ROWS = 256
_MAX_BLOCK_ROWS = 8192
_BYTES_PER_VALUE = 16
_MAX_TASK_THREADS = 16
_SKETCH_ROWS = 2048


def kernel_metrics_of(spec: JobSpec) -> tuple[str, ...]:
    return tuple(m for m in spec.metrics if m in KERNEL_METRICS)


@dataclass(frozen=True)
class KernelPlan:
    """How a job's kernel metrics are computed.

    blocks : absolute [start, stop) of each row block; tiles : (I, J), I <= J.
    sample : absolute row numbers of the row sample (histogram ranges, approximations),
        sorted; empty when none is needed.
    approximate : the rows exceed exact_rows (module docstring).
    """

    setup: KernelSetup
    units: tuple
    rows: tuple[int, int]
    blocks: tuple[tuple[int, int], ...]
    tiles: tuple[tuple[int, int], ...]
    sample: tuple[int, ...]
    approximate: bool
    threads: int
    fresh: frozenset[int]
    exact_rows: int

    @property
    def n_pairs(self) -> int:
        count = len(self.units)
        return sum(1 for i in range(count) for j in range(i, count)
                   if i in self.fresh or j in self.fresh)

    @property
    def passes(self) -> int:
        return 2 if self.setup.sketch_pass and not self.approximate else 1

    def tasks(self) -> list[KernelTileTask]:
        """Exact regime: one task per tile, diagonal tiles first."""
        refs = tuple(u.ref for u in self.units)
        return [KernelTileTask(refs, i, j, self.blocks[i], self.blocks[j], self.rows[0],
                               threads=self.threads if self.threads > 1 else None)
                for i, j in self.tiles]

    def sample_tasks(self) -> list[SampleTask]:
        return [SampleTask(u.ref, self.rows[0], self.rows[1], self.sample) for u in self.units]

    def describe(self) -> str:
        """The plan line(s) for the log."""
        s = self.setup
        n = self.rows[1] - self.rows[0]
        names = ", ".join(s.metrics)
        if self.approximate:
            parts = []
            if "rbf_cka" in s.metrics or "rsa" in s.metrics:
                parts.append(f"{', '.join(m for m in s.metrics if m != 'mutual_knn')} on a "
                             f"{len(self.sample):,}-row sample (error bars from 4 disjoint "
                             "quarters)")
            if "mutual_knn" in s.metrics:
                parts.append(f"mutual_knn for {len(self.sample):,} sampled query rows against "
                             f"all rows in {len(self.blocks)} blocks (standard error over "
                             "the query rows)")
            return (f"kernel plan: {names}: {n:,} rows exceed exact_rows "
                    f"({self.exact_rows:,}): approximate: {'; '.join(parts)}")
        block = self.blocks[0][1] - self.blocks[0][0]
        line = (f"kernel plan: {names}: {n:,} rows in {len(self.blocks)} row block(s) of "
                f"{block:,}, {len(self.tiles)} tile(s) x {self.passes} pass(es), "
                f"{s.precision} products")
        if s.sketch_pass:
            what = " and ".join(w for w, on in (("the median", "rbf_cka" in s.metrics),
                                                ("RSA's ranks", s.spearman)) if on)
            how = ("exact (values gathered)" if s.exact else
                   f"from histograms over ranges of a {len(self.sample):,}-row sample "
                   f"(values beyond compute.exact_entries); error bounds in the results")
            line += f"; {what} {how}"
        return line


def make_kernel_plan(spec: JobSpec, sel, res: Resources, *,
                     fresh: frozenset[int] | None = None) -> KernelPlan:
    """Plan the kernel metrics of a selection. Refuses what the rows cannot support (k >= n)
    before any work."""
    metrics = kernel_metrics_of(spec)
    units, rows = sel.units, sel.rows
    n = rows[1] - rows[0]
    c = spec.compute
    options = {m: metric_options(m, spec.metric_options.get(m)) for m in metrics}
    names = tuple(u.label for u in units)
    approximate = n > c.exact_rows
    entries = len(units) * (n * (n - 1) // 2)
    setup = KernelSetup(metrics, options, n, names, exact=entries <= c.exact_entries,
                        precision=c.precision)
    check_setup(setup)
    if spec.compute.bootstrap:
        raise InputError(f"compute.bootstrap resamples feature-space partials; "
                         f"{', '.join(metrics)} are sample-space metrics: run them without "
                         "a bootstrap")
    width = sum(u.features for u in units)
    if c.tile_rows:
        block = c.tile_rows
    else:
        block = res.memory_per_worker // (4 * 2 * _BYTES_PER_VALUE * width)
        block = int(min(_MAX_BLOCK_ROWS, max(_MIN_BLOCK_ROWS, block)))
        # At least two tiles per worker when the rows allow it, so the workers share a pass.
        while block > _MIN_BLOCK_ROWS and _tile_count(n, block) < 2 * res.workers:
            block //= 2
    blocks = tuple((rows[0] + s, rows[0] + t) for s, t in block_bounds(n, min(block, n)))
    tiles = tile_pairs(len(blocks))
    need_sample = approximate or (setup.sketch_pass and not setup.exact)
    sample: tuple[int, ...] = ()
    if need_sample:
        # Histogram ranges need few rows (their margins absorb the sample's error).
        size = min(n, c.sample_rows if approximate else min(c.sample_rows, _SKETCH_ROWS))
        rng = np.random.default_rng(0)  # the same sample on every run of the job
        sample = tuple(int(r) + rows[0] for r in np.sort(rng.choice(n, size, replace=False)))
    threads = (min(res.workers, res.node_cpus, _MAX_TASK_THREADS)
               if len(tiles) < 2 * res.workers else 1)
    return KernelPlan(setup=setup, units=units, rows=rows, blocks=blocks, tiles=tiles,
                      sample=sample, approximate=approximate, threads=threads,
                      fresh=frozenset(range(len(units)) if fresh is None else fresh),
                      exact_rows=c.exact_rows)


def _tile_count(n: int, block: int) -> int:
    b = math.ceil(n / block)
    return b * (b + 1) // 2
