"""Order statistics of a unit's n(n-1)/2 pair values, exact or from a mergeable histogram.

RBF CKA needs the median of all squared distances and RSA's Spearman comparison the ranks
of every dissimilarity. Up to a size, the values themselves are gathered (exact). Beyond it,
each tile counts its values into a fixed-width :class:`Histogram` over a range found from a
sample of rows (counts add exactly, in any order); order statistics are then interpolated
inside one bin, and the bin widths bound the error (:meth:`Histogram.quantile`,
:meth:`Histogram.rank_error`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Histogram", "histogram", "median_positions", "median_from_sorted"]


@dataclass
class Histogram:
    """Counts of values in ``bins`` equal bins over [lo, hi), plus those below and above.

    counts : ndarray (bins,), int64.
    """

    lo: float
    hi: float
    counts: np.ndarray
    under: int = 0
    over: int = 0

    @property
    def width(self) -> float:
        return (self.hi - self.lo) / self.counts.size

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self.under + self.over

    def add(self, other: Histogram) -> None:
        """Merge another histogram over the same bins, in place."""
        self.counts += other.counts
        self.under += other.under
        self.over += other.over

    def quantile(self, k: int) -> tuple[float, float] | None:
        """The k-th smallest value (0-based) and a bound on its error (the bin's width), or
        None when it lies outside [lo, hi)."""
        if k < self.under or k >= self.total - self.over:
            return None
        k -= self.under
        cum = np.cumsum(self.counts)
        b = int(np.searchsorted(cum, k, side="right"))
        before = int(cum[b - 1]) if b else 0
        fraction = (k - before + 0.5) / int(self.counts[b])
        return self.lo + (b + fraction) * self.width, self.width

    def midranks(self, values: np.ndarray) -> np.ndarray:
        """Estimated 1-based midranks of values among all counted ones: float64.

        Inside a bin the rank is interpolated linearly; below lo (above hi) all values share
        the midrank of the values there."""
        cum = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.float64)
        pos = (values - self.lo) / self.width
        b = np.clip(np.floor(pos), 0, self.counts.size - 1).astype(np.int64)
        ranks = self.under + cum[b] + (pos - b) * self.counts[b] + 0.5
        ranks[values < self.lo] = (self.under + 1) / 2.0
        total = self.total
        ranks[values >= self.hi] = total - self.over + (self.over + 1) / 2.0
        return ranks

    def rank_error(self) -> float:
        """A bound on ||ranks - estimates|| / ||ranks - mean rank|| (relative L2 error of
        the rank vector): each value's rank error is at most its bin's count (half the count
        below lo or above hi)."""
        n = float(self.total)
        err2 = float(np.sum(self.counts.astype(np.float64) ** 3))
        err2 += self.under * (self.under / 2.0) ** 2 + self.over * (self.over / 2.0) ** 2
        spread2 = n * (n * n - 1.0) / 12.0
        return float(np.sqrt(err2 / spread2)) if spread2 > 0 else 0.0


def histogram(values: np.ndarray, lo: float, hi: float, bins: int) -> Histogram:
    """Count values (any shape) into ``bins`` bins over [lo, hi). Cost O(values)."""
    v = np.ravel(values)
    pos = (v - lo) * (bins / (hi - lo))
    inside = (pos >= 0) & (pos < bins)
    counts = np.bincount(pos[inside].astype(np.int64), minlength=bins)[:bins]
    under = int(np.count_nonzero(pos < 0))
    return Histogram(lo, hi, counts.astype(np.int64), under, v.size - under - int(inside.sum()))


def median_positions(n: int) -> list[int | None]:
    """Where the median of an n x n symmetric matrix with a zero diagonal lies among its
    n(n-1)/2 upper values sorted (0-based); None stands for a diagonal zero.

    The full matrix holds n zeros and every upper value twice; ``np.median`` of it is the
    middle one (n^2 odd) or the mean of the middle two. Values are >= 0, so the zeros come
    first.
    """
    total = n * n
    middle = [(total - 1) // 2] if total % 2 else [total // 2 - 1, total // 2]
    return [None if t < n else (t - n) // 2 for t in middle]


def median_from_sorted(n: int, kth) -> float:
    """The median of the full matrix given ``kth(k)``, the k-th smallest upper value."""
    return float(np.mean([0.0 if k is None else kth(k) for k in median_positions(n)]))
