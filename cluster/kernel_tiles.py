"""Sample-space kernel metrics streamed in row-block tiles: RBF CKA, RSA, mutual k-NN.

The rows are cut into blocks; a *tile* is a pair of blocks (I, J), I <= J. One tile reads
blocks I and J of every unit once, forms each unit's entries over I x J
(:mod:`repscope.cluster.kernels`) a chunk of rows at a time, and adds its share to every unit
pair (:func:`kernel_tile`), so a task holds a few blocks, never an n x n matrix:

- RBF CKA (Kornblith et al. 2019, ``cka(gram_rbf(x, t), gram_rbf(y, t))``): with
  ``K = exp(-D / (2 t^2 m))``, m the median of all n^2 squared distances (the diagonal's zeros
  included), the centered HSIC is ``S - (2/n) r_K.r_L + (1'K1)(1'L1)/n^2``: a tile adds
  ``S_uv = sum K_u o L_v`` over its entries (twice for I < J, the mirrored block) and the row
  sums ``r`` of its rows. CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).
- RSA (rsatoolbox ``calc_rdm`` + ``compare``): the upper-triangle entries of each unit's RDM
  (``1 - corr(x_i, x_j)``, or ``|x_i - x_j|^2 / d``); Pearson's r of two RDMs from the sums
  of their entries, squares and products; Spearman's is Pearson's of their ranks.
- mutual k-NN (Huh et al. 2024): each tile's best k candidates per row
  (:mod:`repscope.cluster.neighbours`), merged per row.

The median and the ranks are order statistics of all n(n-1)/2 entries: a first pass
(``stage="sketch"``) gathers them (``exact``) or counts them into histograms
(:mod:`repscope.cluster.sketch`) over ranges found on a sample of rows (:func:`sketch_ranges`);
the second (``stage="final"``) uses the median and ranks. :class:`KernelAccumulator` merges a
pass's tiles in any order and finishes the matrices. Everything merged is float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from repscope.cluster.kernels import (
    RowBlock,
    correlations,
    cosines,
    products,
    row_block,
    sq_distances,
)
from repscope.cluster.neighbours import merge_candidates, mutual_knn_matrix, top_k
from repscope.cluster.registry import KERNEL_METRICS, metric_options
from repscope.cluster.sketch import Histogram, histogram, median_positions
from repscope.errors import InputError

__all__ = [
    "KernelSetup",
    "PassContext",
    "TilePartial",
    "KernelAccumulator",
    "kernel_tile",
    "block_bounds",
    "tile_pairs",
    "sketch_ranges",
    "kernel_matrices",
    "kernel_accumulate",
    "check_setup",
    "BINS",
]

#: Bins of each histogram sketch (int64 counts: 512 KiB per unit and statistic).
BINS = 1 << 16
# Bytes of float64 entries (all units together) held per chunk of a tile's rows.
_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class KernelSetup:
    """What the kernel metrics of a job need, fixed at planning.

    metrics : names among KERNEL_METRICS, with ``options[name]`` their parameters.
    n : rows; names : the units' names (messages); exact : gather the order statistics'
    values (else histograms over ``ranges``); precision : GEMM dtype name.
    """

    metrics: tuple[str, ...]
    options: dict
    n: int
    names: tuple[str, ...]
    exact: bool = True
    precision: str = "float64"

    @property
    def units(self) -> int:
        return len(self.names)

    @property
    def entries(self) -> int:
        """Upper-triangle entries per unit, n(n-1)/2."""
        return self.n * (self.n - 1) // 2

    @property
    def spearman(self) -> bool:
        return "rsa" in self.metrics and self.options["rsa"]["compare"] == "spearman"

    @property
    def sketch_pass(self) -> bool:
        """A first pass is needed (the bandwidth's median, or RSA's ranks)."""
        return "rbf_cka" in self.metrics or self.spearman

    @property
    def sketched(self) -> tuple[str, ...]:
        """Statistics whose order statistics the first pass collects."""
        return (("sqdist",) if "rbf_cka" in self.metrics else ()) + (
            ("rdm",) if self.spearman else ())


@dataclass(frozen=True)
class PassContext:
    """What every tile of one pass computes; shared by all its tasks.

    stage : "sketch" (order statistics) or "final" (the metrics' sums).
    ranges : sketch stage without ``exact``: {"sqdist"/"rdm": [(lo, hi) per unit]}.
    bandwidths : final stage, RBF: ``2 t^2 m`` per unit.
    rank_maps : final stage, RSA Spearman from histograms: one Histogram per unit (None when
        the first pass finished RSA from the exact values).
    moments : diagonal tiles also return their block's feature moments (for the job's
        feature-space metrics: the rows are then read once for both).
    queries, query_ids : mutual k-NN for sampled query rows only (approximate regime): per
        unit the query rows (q, d_u), and their row ids; tiles are (query block, block J).
    """

    setup: KernelSetup
    stage: str
    ranges: dict | None = None
    bandwidths: np.ndarray | None = None
    rank_maps: tuple[Histogram, ...] | None = None
    rsa_done: bool = False
    moments: bool = False
    widths: tuple[int, ...] = ()
    fourth: bool = False
    queries: tuple | None = None
    query_ids: np.ndarray | None = None


@dataclass
class TilePartial:
    """A tile's contribution to a pass (absent fields: not computed in this pass).

    values : {"sqdist"/"rdm": ndarray (U, entries)} gathered upper entries (exact sketch).
    hists : {"sqdist"/"rdm": [Histogram per unit]}.
    kl : (U, U) sum of K_u o K_v over the tile's entries, mirrored block included.
    rows_i, rows_j : (U, b) row sums of K over the tile for block I's and J's rows.
    rsa_sum : (U,), rsa_prod : (U, U): sums of the (shifted) RDM entries or ranks, and of
        their products, over the tile's upper entries.
    knn_i, knn_j : (values, ids), each (U, b, k): candidates of block I's and J's rows.
    moments : CrossMoments of block I (diagonal tiles of a pass with ``moments``).
    """

    i: int
    j: int
    values: dict = field(default_factory=dict)
    hists: dict = field(default_factory=dict)
    kl: np.ndarray | None = None
    rows_i: np.ndarray | None = None
    rows_j: np.ndarray | None = None
    rsa_sum: np.ndarray | None = None
    rsa_prod: np.ndarray | None = None
    knn_i: tuple | None = None
    knn_j: tuple | None = None
    moments: object = None


def block_bounds(n: int, block_rows: int) -> tuple[tuple[int, int], ...]:
    """[start, stop) of each row block (0-based within the job's rows)."""
    return tuple((s, min(n, s + block_rows)) for s in range(0, n, block_rows))


def tile_pairs(blocks: int) -> tuple[tuple[int, int], ...]:
    """Every tile (I, J), I <= J, diagonal tiles first."""
    return tuple([(i, i) for i in range(blocks)]
                 + [(i, j) for i in range(blocks) for j in range(i + 1, blocks)])


def _rdm_values(ctx: PassContext, p, bi: RowBlock, bj: RowBlock, rows, u: int) -> np.ndarray:
    """RDM entries over the chunk: 1 - corr, or rsatoolbox's squared distance / d."""
    if ctx.setup.options["rsa"]["rdm"] == "correlation":
        return 1.0 - correlations(p, bi, bj, rows, ctx.setup.names[u])
    return sq_distances(p, bi, bj, rows) / bi.features


def kernel_tile(ctx: PassContext, i: int, j: int, xs_i, xs_j, offset_i: int,
                offset_j: int, ids_i: np.ndarray | None = None) -> TilePartial:
    """One tile's contribution to a pass.

    Parameters
    ----------
    xs_i : per unit, the rows of block I (b_i, d_u); xs_j : those of block J (None for a
        diagonal tile, I == J).
    offset_i, offset_j : the blocks' first row (0-based within the job's rows).
    ids_i : query tiles (mutual k-NN of sampled rows): the row ids of xs_i's rows, which
        may fall inside block J (each is excluded from its own neighbours).

    Notes
    -----
    Per unit one product of b_i x d x b_j (in the setup's precision), the rest float64 and
    O(b_i b_j) per unit, plus (U x entries) x (entries x U) products for the pair sums.
    Memory: the blocks, and per chunk of block I's rows the chunk's float64 entries of all
    units (_CHUNK_BYTES).
    """
    setup = ctx.setup
    dtype = np.float32 if setup.precision == "float32" else np.float64
    metrics, count = setup.metrics, setup.units
    diagonal = xs_j is None
    out = TilePartial(i, j)
    if ctx.moments and diagonal:
        from repscope.cluster.accumulate import block_moments

        out.moments = block_moments(np.hstack(xs_i), widths_a=ctx.widths, fourth=ctx.fourth,
                                    gemm_dtype=dtype)
    blocks_i, blocks_j = [], []
    for u in range(count):
        shift = np.asarray(xs_i[u], dtype=np.float64).mean(axis=0)
        bi = row_block(xs_i[u], shift, dtype)
        blocks_i.append(bi)
        blocks_j.append(bi if diagonal else row_block(xs_j[u], shift, dtype))
    b_i, b_j = blocks_i[0].xc.shape[0], blocks_j[0].xc.shape[0]
    query = ids_i is not None
    ids_i = offset_i + np.arange(b_i) if ids_i is None else np.asarray(ids_i)
    ids_j = offset_j + np.arange(b_j)
    final = ctx.stage == "final"
    rbf = "rbf_cka" in metrics and final
    rsa = "rsa" in metrics and final and not ctx.rsa_done
    knn = "mutual_knn" in metrics and final
    sketch = () if final else setup.sketched
    if rbf:
        out.kl = np.zeros((count, count))
        out.rows_i = np.zeros((count, b_i))
        out.rows_j = None if diagonal else np.zeros((count, b_j))
    if rsa:
        out.rsa_sum = np.zeros(count)
        out.rsa_prod = np.zeros((count, count))
    if knn:
        k = setup.options["mutual_knn"]["k"]
        out.knn_i = (np.full((count, b_i, k), -np.inf), np.full((count, b_i, k), -1))
        if not diagonal and not query:
            out.knn_j = (np.full((count, b_j, k), -np.inf), np.full((count, b_j, k), -1))
    gathered: dict[str, list[list[np.ndarray]]] = {s: [[] for _ in range(count)]
                                                   for s in sketch}
    if sketch and not setup.exact:
        out.hists = {s: [Histogram(lo, hi, np.zeros(BINS, np.int64))
                         for lo, hi in ctx.ranges[s]] for s in sketch}
    n_vectors = int(rbf) + int(rsa)
    chunk = max(1, min(b_i, _CHUNK_BYTES // max(1, 8 * count * b_j * max(1, n_vectors))))
    for r0 in range(0, b_i, chunk):
        rows = slice(r0, min(b_i, r0 + chunk))
        c = rows.stop - rows.start
        # The tile's upper entries (global row < global column) of this chunk.
        upper = None if not diagonal else (ids_j[None, :] > ids_i[rows, None])
        v_kernel = np.empty((count, c * b_j)) if rbf else None
        v_rsa = None
        for u in range(count):
            bi, bj = blocks_i[u], blocks_j[u]
            p = products(bi, bj, rows)
            dist = None
            if rbf or "sqdist" in sketch:
                dist = sq_distances(p, bi, bj, rows)
                if diagonal:  # exact zeros, as |x_i - x_i|^2 (the product rounds)
                    dist[np.arange(c), np.arange(rows.start, rows.stop)] = 0.0
            if "sqdist" in sketch:
                _sketch(out, gathered, "sqdist", u, dist if upper is None else dist[upper],
                        setup.exact)
            if "rdm" in sketch or rsa:
                rdm = _rdm_values(ctx, p, bi, bj, rows, u)
                rdm = rdm.ravel() if upper is None else rdm[upper]
                if "rdm" in sketch:
                    _sketch(out, gathered, "rdm", u, rdm, setup.exact)
                if rsa:
                    if v_rsa is None:
                        v_rsa = np.empty((count, rdm.size))
                    v_rsa[u] = _rsa_entries(ctx, u, rdm)
            if rbf:
                kern = np.exp(dist * (-1.0 / ctx.bandwidths[u]))
                v_kernel[u] = kern.ravel()
                out.rows_i[u, rows] += kern.sum(axis=1)
                if not diagonal:
                    out.rows_j[u] += kern.sum(axis=0)
            if knn:
                cos = cosines(p, bi, bj, rows)
                if diagonal:
                    cos[np.arange(c), np.arange(rows.start, rows.stop)] = -np.inf
                elif query:
                    cos[ids_i[rows, None] == ids_j[None, :]] = -np.inf
                vals, ids = top_k(cos, ids_j, k)
                out.knn_i[0][u, rows], out.knn_i[1][u, rows] = vals, ids
                if out.knn_j is not None:
                    cv, ci = top_k(cos.T, ids_i[rows], k)
                    out.knn_j[0][u], out.knn_j[1][u] = merge_candidates(
                        out.knn_j[0][u], out.knn_j[1][u], cv, ci, k)
        if rbf:
            out.kl += (1.0 if diagonal else 2.0) * (v_kernel @ v_kernel.T)
        if rsa and v_rsa is not None:
            out.rsa_sum += v_rsa.sum(axis=1)
            out.rsa_prod += v_rsa @ v_rsa.T
    if setup.exact:
        out.values = {s: np.stack([np.concatenate(parts) if parts else np.empty(0)
                                   for parts in gathered[s]]) for s in sketch}
    return out


def _sketch(out: TilePartial, gathered, stat: str, u: int, values: np.ndarray,
            exact: bool) -> None:
    if exact:
        gathered[stat][u].append(np.ravel(values))
    else:
        h = out.hists[stat][u]
        h.add(histogram(values, h.lo, h.hi, h.counts.size))


def _rsa_entries(ctx: PassContext, u: int, rdm: np.ndarray) -> np.ndarray:
    """What RSA correlates, shifted by a constant near its mean (fewer digits cancel)."""
    setup = ctx.setup
    if setup.spearman:
        return ctx.rank_maps[u].midranks(rdm) - (setup.entries + 1) / 2.0
    return rdm - 1.0 if setup.options["rsa"]["rdm"] == "correlation" else rdm


# -- merging and finishing ----------------------------------------------------------------------


class KernelAccumulator:
    """Merges the tiles of each pass (any order) and finishes the kernel metrics.

    Use: ``context()`` gives the pass to run; ``add(partial)`` for each of its tiles;
    ``finish_pass()`` closes it; repeat while ``context()`` is not None; then ``result()``.
    ``notes`` records, per metric, how its order statistics were found and their error
    bounds (the results' attributes).
    """

    def __init__(self, setup: KernelSetup, blocks, *, ranges: dict | None = None,
                 moments: bool = False, widths: tuple[int, ...] = (), fourth: bool = False,
                 query_blocks=None):
        if not setup.exact and setup.sketch_pass and ranges is None:
            raise ValueError("histogram sketches need their ranges (sketch_ranges)")
        self.setup, self.blocks = setup, tuple(blocks)
        # Query tiles: block I of a partial is a block of the query rows.
        self.query_blocks = None if query_blocks is None else tuple(query_blocks)
        self.ranges = ranges
        count, n = setup.units, setup.n
        self.stage = "sketch" if setup.sketch_pass else "final"
        self._moments = dict(moments=moments, widths=tuple(widths), fourth=fourth)
        self.moment_parts: list = []
        self.bandwidths = None
        self.rank_maps = None
        self.rsa_done = False
        self.notes: dict[str, dict] = {}
        self.matrices: dict[str, np.ndarray] = {}
        self._values: dict[str, list[np.ndarray]] = {s: [] for s in setup.sketched}
        self._hists: dict[str, list[Histogram]] = {}
        self.kl = np.zeros((count, count))
        self.rows = np.zeros((count, n))
        self.rsa_sum, self.rsa_prod = np.zeros(count), np.zeros((count, count))
        self.knn = None
        if "mutual_knn" in setup.metrics:
            k = setup.options["mutual_knn"]["k"]
            rows = n if query_blocks is None else self.query_blocks[-1][1]
            self.knn = (np.full((count, rows, k), -np.inf), np.full((count, rows, k), -1))

    def context(self) -> PassContext | None:
        """The pass to run next (None: done)."""
        if self.stage == "done":
            return None
        first = self.stage == "sketch" or not self.setup.sketch_pass
        return PassContext(self.setup, self.stage, ranges=self.ranges,
                           bandwidths=self.bandwidths, rank_maps=self.rank_maps,
                           rsa_done=self.rsa_done,
                           **(self._moments if first else {"moments": False}))

    def add(self, part: TilePartial) -> None:
        if part.moments is not None:
            self.moment_parts.append(part.moments)
        if self.stage == "sketch":
            for stat, values in part.values.items():
                self._values[stat].append(values)
            for stat, hists in part.hists.items():
                if stat not in self._hists:  # our own copy (Ray's arrays are read-only)
                    self._hists[stat] = [Histogram(h.lo, h.hi, h.counts.copy(), h.under,
                                                   h.over) for h in hists]
                else:
                    for mine, h in zip(self._hists[stat], hists, strict=True):
                        mine.add(h)
            return
        (t0, t1) = self.blocks[part.j]
        (s0, s1) = (self.blocks if self.query_blocks is None else self.query_blocks)[part.i]
        if part.kl is not None:
            self.kl += part.kl
            self.rows[:, s0:s1] += part.rows_i
            if part.rows_j is not None:
                self.rows[:, t0:t1] += part.rows_j
        if part.rsa_sum is not None:
            self.rsa_sum += part.rsa_sum
            self.rsa_prod += part.rsa_prod
        if part.knn_i is not None:
            self._merge_knn(s0, s1, part.knn_i)
            if part.knn_j is not None:
                self._merge_knn(t0, t1, part.knn_j)

    def _merge_knn(self, start: int, stop: int, cand) -> None:
        k = self.setup.options["mutual_knn"]["k"]
        vals, ids = self.knn
        for u in range(self.setup.units):
            vals[u, start:stop], ids[u, start:stop] = merge_candidates(
                vals[u, start:stop], ids[u, start:stop], cand[0][u], cand[1][u], k)

    def finish_pass(self) -> None:
        if self.stage == "sketch":
            self._finish_sketch()
            self.stage = "final"
        else:
            self._finish_final()
            self.stage = "done"

    def _finish_sketch(self) -> None:
        setup = self.setup
        count = setup.units
        if "rbf_cka" in setup.metrics:
            threshold = setup.options["rbf_cka"]["threshold"]
            medians, bounds = np.empty(count), np.zeros(count)
            if setup.exact:
                values = np.concatenate(self._values.pop("sqdist"), axis=1)
                for u in range(count):
                    medians[u] = _exact_median(setup.n, values[u])
                del values
                self.notes["rbf_cka"] = {"median": "exact"}
            else:
                missed = []
                for u, h in enumerate(self._hists["sqdist"]):
                    medians[u], bounds[u], ok = _histogram_median(setup.n, h)
                    if not ok:
                        missed.append(setup.names[u])
                self.notes["rbf_cka"] = {
                    "median": "histogram", "bins": BINS,
                    "median_relative_error_bound": float(np.max(bounds / medians)),
                }
                if missed:
                    self.notes["rbf_cka"]["window_missed"] = missed
            if not np.all(medians > 0):
                bad = setup.names[int(np.argmin(medians))]
                raise InputError(f"unit {bad!r}: the median squared distance between rows is "
                                 "0 (most rows identical): rbf_cka's bandwidth is undefined")
            self.medians = medians
            self.bandwidths = 2.0 * threshold**2 * medians
        if setup.spearman:
            if setup.exact:
                values = np.concatenate(self._values.pop("rdm"), axis=1)
                self.matrices["rsa"] = _spearman_exact(values)
                self.rsa_done = True
                self.notes["rsa"] = {"ranks": "exact"}
            else:
                self.rank_maps = tuple(self._hists["rdm"])
                beta = np.array([h.rank_error() for h in self.rank_maps])
                self.notes["rsa"] = {
                    "ranks": "histogram", "bins": BINS,
                    "rank_relative_error_bound": float(beta.max()),
                    # First order: corr(a + e, b + f) moves by at most 2(|e|/|a| + |f|/|b|).
                    "value_error_bound": float(min(2.0, 4.0 * beta.max())),
                }
        self._values.clear()

    def _finish_final(self) -> None:
        setup = self.setup
        n = float(setup.n)
        if "rbf_cka" in setup.metrics:
            t = self.rows.sum(axis=1)
            hsic = self.kl - (2.0 / n) * (self.rows @ self.rows.T) + np.outer(t, t) / n**2
            norm = np.sqrt(np.clip(np.diag(hsic), 0.0, None))
            self.matrices["rbf_cka"] = hsic / np.outer(norm, norm)
        if "rsa" in setup.metrics and not self.rsa_done:
            m = float(setup.entries)
            cov = self.rsa_prod - np.outer(self.rsa_sum, self.rsa_sum) / m
            sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
            if not np.all(sd > 0):
                bad = setup.names[int(np.argmin(sd))]
                raise InputError(f"unit {bad!r}: all its RDM entries are equal; rsa undefined")
            self.matrices["rsa"] = cov / np.outer(sd, sd)
            self.notes.setdefault("rsa", {"ranks": "none (pearson)"})
        if self.knn is not None:
            k = setup.options["mutual_knn"]["k"]
            self.matrices["mutual_knn"], self.knn_se = mutual_knn_matrix(self.knn[1], k)
            self.notes["mutual_knn"] = {"neighbours": "exact"}

    def result(self) -> dict[str, np.ndarray]:
        if self.stage != "done":
            raise RuntimeError("result() before the last pass finished")
        return {m: self.matrices[m] for m in self.setup.metrics}


def _exact_median(n: int, values: np.ndarray) -> float:
    """np.median of the full n x n matrix from its upper values (module sketch)."""
    positions = [k for k in median_positions(n) if k is not None]
    part = np.partition(values, positions) if positions else values
    return float(np.mean([0.0 if k is None else part[k] for k in median_positions(n)]))


def _histogram_median(n: int, h: Histogram) -> tuple[float, float, bool]:
    """(median, error bound, found in the window). Outside the window the nearest window
    edge is returned with the distance to 0 or to twice the edge as its bound."""
    picks, bound, ok = [], 0.0, True
    for k in median_positions(n):
        if k is None:
            picks.append(0.0)
            continue
        q = h.quantile(k)
        if q is None:
            ok = False
            edge = h.lo if k < h.under else h.hi
            picks.append(edge)
            bound = max(bound, edge)
        else:
            picks.append(q[0])
            bound = max(bound, q[1])
    return float(np.mean(picks)), bound, ok


def _spearman_exact(values: np.ndarray) -> np.ndarray:
    """Spearman correlations of the rows of (U, entries): Pearson's of average ranks."""
    from scipy.stats import rankdata

    count, m = values.shape
    ranks = np.empty_like(values)
    for u in range(count):
        ranks[u] = rankdata(values[u]) - (m + 1) / 2.0
    cov = ranks @ ranks.T
    sd = np.sqrt(np.diag(cov))
    return cov / np.outer(sd, sd)


# -- ranges of the histograms, from a sample of rows ---------------------------------------------


def sketch_ranges(setup: KernelSetup, samples) -> dict:
    """Histogram ranges per unit from ``samples`` (per unit, s sampled rows (s, d)).

    sqdist: a window around the sample's estimate of the median, wide enough that the true
    median falls inside (8 standard errors of the sample's quantile, at least 1% of the
    distribution each side); rdm: the sample's whole range with a 5% margin.
    """
    s = samples[0].shape[0]
    target = np.mean([k for k in median_positions(setup.n) if k is not None]
                     or [0]) / max(1, setup.entries)
    out: dict[str, list] = {stat: [] for stat in setup.sketched}
    for u, x in enumerate(samples):  # one unit at a time: s(s-1)/2 values each
        one = replace(setup, n=s, exact=True, precision="float64",
                      names=(setup.names[u],))
        part = kernel_tile(PassContext(one, "sketch"), 0, 0, [x], None, 0, 0)
        if "sqdist" in part.values:
            out["sqdist"].append(_median_window(part.values["sqdist"][0], s, target))
        if "rdm" in part.values:
            v = part.values["rdm"][0]
            lo, hi = float(v.min()), float(v.max())
            pad = 0.05 * (hi - lo) + 1e-12 * max(1.0, abs(hi))
            lo, hi = max(lo - pad, 0.0), hi + pad
            if setup.options["rsa"]["rdm"] == "correlation":
                hi = min(hi, 2.0 + 1e-9)
            out["rdm"].append((lo, hi))
    return out


def _median_window(values: np.ndarray, s: int, target: float) -> tuple[float, float]:
    """[lo, hi) of upper values holding the full matrix's median with high probability.

    values : the sample's upper values in row-major order (i < j); target : the median's
    quantile among all upper values. The quantile's standard error counts both the number
    of pairs and the dependence through shared rows (the U-statistic's first projection).
    """
    m = np.quantile(values, target)
    iu = np.triu_indices(s, 1)
    hit = (values <= m).astype(np.float64)
    below = np.bincount(iu[0], hit, minlength=s) + np.bincount(iu[1], hit, minlength=s)
    per_row = below / max(1, s - 1)
    se = 2.0 * np.sqrt(per_row.var() / s) + 1.0 / np.sqrt(values.size)
    delta = max(8.0 * se, 0.01)
    lo = float(np.quantile(values, max(0.0, target - delta)))
    hi = float(np.quantile(values, min(1.0, target + delta)))
    if target - delta <= 0:
        lo = 0.0
    if target + delta >= 1:
        hi = 2.0 * hi
    span = hi - lo
    return max(0.0, lo - 0.01 * span), hi + 0.01 * span + 1e-300


# -- in memory -----------------------------------------------------------------------------------


def kernel_matrices(xs, metrics, options: dict | None = None, *, block_rows: int = 4096,
                    precision: str = "float64", names=None, exact_entries: int = 1 << 25,
                    sample_rows: int = 2048) -> dict[str, np.ndarray]:
    """(U, U) matrices of kernel metrics of in-memory units on the same rows, through the
    same tiles as a job (:func:`kernel_accumulate`)."""
    return kernel_accumulate(xs, metrics, options, block_rows=block_rows, precision=precision,
                             names=names, exact_entries=exact_entries,
                             sample_rows=sample_rows).result()


def kernel_accumulate(xs, metrics, options: dict | None = None, *, block_rows: int = 4096,
                      precision: str = "float64", names=None, exact_entries: int = 1 << 25,
                      sample_rows: int = 2048) -> KernelAccumulator:
    """Every pass of the kernel metrics of in-memory units, tile by tile, in this process.

    xs : per unit an array (n, d_u), the same rows. options : {metric: {parameter: value}}
    (defaults otherwise). Order statistics are exact while U n(n-1)/2 <= exact_entries
    (memory: those float64 values), else from histograms over ranges of a seeded sample of
    ``sample_rows`` rows. Returns the finished accumulator (``result()``, ``notes``).
    """
    xs = [np.asarray(x) for x in xs]
    n = xs[0].shape[0]
    if any(x.shape[0] != n for x in xs):
        raise InputError("every unit must have the same rows")
    metrics = tuple(m for m in metrics if m in KERNEL_METRICS)
    opts = {m: metric_options(m, (options or {}).get(m)) for m in metrics}
    names = tuple(names or [f"unit {u}" for u in range(len(xs))])
    exact = len(xs) * (n * (n - 1) // 2) <= exact_entries
    setup = KernelSetup(metrics, opts, n, names, exact=exact, precision=precision)
    check_setup(setup)
    ranges = None
    if setup.sketch_pass and not exact:
        pick = np.sort(np.random.default_rng(0).choice(n, min(n, sample_rows), replace=False))
        ranges = sketch_ranges(setup, [x[pick] for x in xs])
    blocks = block_bounds(n, block_rows)
    acc = KernelAccumulator(setup, blocks, ranges=ranges)
    while (ctx := acc.context()) is not None:
        for i, j in tile_pairs(len(blocks)):
            (s0, s1), (t0, t1) = blocks[i], blocks[j]
            acc.add(kernel_tile(ctx, i, j, [x[s0:s1] for x in xs],
                                None if i == j else [x[t0:t1] for x in xs], s0, t0))
        acc.finish_pass()
    return acc


def check_setup(setup: KernelSetup) -> None:
    """Refuse parameters the rows cannot support (before any work)."""
    if "mutual_knn" in setup.metrics:
        k = setup.options["mutual_knn"]["k"]
        if k >= setup.n:
            raise InputError(f"mutual_knn k={k} needs more than {k} rows; the job has "
                             f"{setup.n}")
    if setup.n < 3:
        raise InputError(f"kernel metrics need at least 3 rows, got {setup.n}")
