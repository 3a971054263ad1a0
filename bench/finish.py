"""F: finishing pairs from their moments (CCA family and Procrustes), milliseconds a pair at
widths 256 to 1,024, against the previous round's finishing in the same run.

The previous round (repscope 0.1, the code issue 17 measured at 91 ms a pair at 512 wide)
whitened with the full ``C^(-1/2)`` (p x p), took the full SVD of ``Wx Cxy Wy`` for PWCCA and
the SVD's values of Cxy for Procrustes, one LAPACK call per pair except the stacked
Procrustes SVDs. It is written out here, as it ran, so both are timed on the same moments
with the same threads; the values must agree.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

METRICS = ("mean_cca", "pwcca", "procrustes")


def _moments(width: int, units: int, rows: int, seed: int = 0):
    from repscope.cluster.accumulate import block_moments
    from repscope.cluster.moments import pair_moments, unit_moments

    rng = np.random.default_rng(seed)
    h = rng.standard_normal((rows, width))
    layers = [np.tanh(h @ rng.standard_normal((width, width)) / np.sqrt(width) * (1 + k / 4))
              .astype(np.float32) for k in range(units)]
    tile = block_moments(np.hstack(layers), widths_a=(width,) * units, gemm_dtype=np.float32)
    return ([unit_moments(tile, k) for k in range(units)],
            lambda i, j: pair_moments(tile, i, j))


def _previous_round(units, cross, pairs, threads: int) -> dict:
    """The 0.1 finishing: full whitening matrices, full SVDs, stacked Procrustes SVDs."""
    from threadpoolctl import threadpool_limits

    def prepare(m):
        evals, evecs = np.linalg.eigh(m.cxx)
        evals, evecs = np.maximum(evals[::-1], 0), evecs[:, ::-1]
        keep = evals > 1e-10 * evals[0]
        inv = np.where(keep, 1 / np.sqrt(np.where(keep, evals, 1)), 0)
        return (evecs * inv) @ evecs.T, (evecs * (evals * inv)) @ evecs.T

    def chunk(part):
        moments = [cross(i, j) for i, j in part]
        nuclear = np.linalg.svd(np.stack([m.cxy for m in moments]), compute_uv=False).sum(1)
        out = []
        for (i, j), m, nu in zip(part, moments, nuclear, strict=True):
            (wx, rx), (wy, _) = caches[i], caches[j]
            u, rho, _ = np.linalg.svd(wx @ m.cxy @ wy, full_matrices=True)
            weights = np.abs(rx @ u).sum(axis=0)
            out.append({"mean_cca": rho.mean(), "pwcca": (weights[:rho.size] / weights.sum())
                        @ rho, "procrustes": 2 - 2 * nu / np.sqrt(
                            np.trace(units[i].cxx) * np.trace(units[j].cxx))})
        return out

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        caches = list(pool.map(prepare, units))
        parts = [pairs[k:k + 16] for k in range(0, len(pairs), 16)]
        values = [v for part in pool.map(chunk, parts) for v in part]
    return {m: np.array([v[m] for v in values]) for m in METRICS}


def bench_finish(widths=(256, 512, 1024), units: int = 12, threads: int = 2,
                 quick: bool = False) -> dict:
    """ms a pair, ours and the previous round's, and their largest difference."""
    from repscope.cluster.matrices import similarity_matrices

    out = {}
    for width in widths[:2] if quick else widths:
        moments, cross = _moments(width, units, rows=4 * width)
        pairs = [(i, j) for i in range(units) for j in range(i + 1, units)]
        t_ours = t_before = float("inf")
        for _ in range(1 if quick else 3):  # alternated, best of each: the machine is shared
            t0 = time.perf_counter()
            ours = similarity_matrices(moments, cross, METRICS, pairs=pairs, threads=threads)
            t_ours = min(t_ours, time.perf_counter() - t0)
            t0 = time.perf_counter()
            before = _previous_round(moments, cross, pairs, threads)
            t_before = min(t_before, time.perf_counter() - t0)
        diff = max(float(np.max(np.abs(np.array([ours[m][i, j] for i, j in pairs])
                                       - before[m]))) for m in METRICS)
        out[width] = {"pairs": len(pairs), "ours_ms_per_pair": 1e3 * t_ours / len(pairs),
                      "previous_ms_per_pair": 1e3 * t_before / len(pairs),
                      "speedup": t_before / t_ours, "max_abs_diff": diff}
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(bench_finish(), indent=1))
