"""k nearest neighbours per row, merged from tiles, and the mutual k-NN alignment.

Huh et al. (2024)'s ``mutual_knn``: rows L2-normalised, each row's k neighbours are the rows
of largest inner product with it (the row itself excluded), and two representations align by
the mean over rows of ``|N_x(i) & N_y(i)| / k``. A tile gives each of its rows the best k
candidates among the tile's columns; candidates of the same row from different tiles merge
by keeping the best k (:func:`merge_candidates`), so no n x n matrix is ever held. Equal
similarities are ordered arbitrarily, as by the reference's argsort.
"""

from __future__ import annotations

import numpy as np

__all__ = ["top_k", "merge_candidates", "mutual_knn_matrix"]


def top_k(sims: np.ndarray, columns: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row of ``sims`` (r, c) and their column ids.

    columns : (c,) int64, the global row id of each column. Returns (values, ids), each
    (r, k), padded with -inf and -1 when c < k.
    """
    r, c = sims.shape
    if c <= k:
        vals = np.full((r, k), -np.inf)
        ids = np.full((r, k), -1, dtype=np.int64)
        vals[:, :c] = sims
        ids[:, :c] = columns[None, :]
        return vals, ids
    pick = np.argpartition(sims, c - k, axis=1)[:, c - k:]
    return np.take_along_axis(sims, pick, axis=1), columns[pick]


def merge_candidates(vals_a, ids_a, vals_b, ids_b, k: int):
    """Best k of two candidate lists of the same rows: (values, ids), each (r, k)."""
    vals = np.concatenate([vals_a, vals_b], axis=1)
    ids = np.concatenate([ids_a, ids_b], axis=1)
    pick = np.argpartition(vals, vals.shape[1] - k, axis=1)[:, -k:]
    return np.take_along_axis(vals, pick, axis=1), np.take_along_axis(ids, pick, axis=1)


def mutual_knn_matrix(ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(U, U) mutual k-NN alignment from every unit's neighbour ids, ids: (U, n, k), and
    the standard error of each entry as a mean over the n rows (for sampled rows).

    Cost per pair O(n k log k): both lists sorted once, then intersected by a merge."""
    count, n, _ = ids.shape
    ordered = np.sort(ids, axis=2)
    out, se = np.eye(count), np.zeros((count, count))
    for u in range(count):
        for v in range(u + 1, count):
            # |A & B| = 2k - |A | B| for sets of k distinct ids: count the distinct ids of
            # both lists side by side.
            both = np.sort(np.concatenate([ordered[u], ordered[v]], axis=1), axis=1)
            distinct = 1 + np.count_nonzero(np.diff(both, axis=1), axis=1)
            overlap = (2 * k - distinct) / k
            out[u, v] = out[v, u] = float(np.mean(overlap))
            se[u, v] = se[v, u] = float(np.std(overlap, ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    return out, se
