"""Kernel-metric workloads of `make bench` (K1): rbf_cka + mutual_knn streamed in row-block
tiles, against the naive in-memory loop that holds one n x n float64 Gram pair at a time.

For each workload: our job end to end in a child process (peak memory of its process tree)
at the workload's rows and at half of them with the same tile size (memory flat in rows), and
the naive loop on a few pairs in a child process of its own, scaled to all pairs; the largest
difference between the two on the pairs timed. `python -m bench.kernels --naive-pair ...` is
that child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

__all__ = ["bench_kernel", "naive_pair"]

K = 10


def naive_pair(x: np.ndarray, y: np.ndarray, threshold: float = 1.0, k: int = K) -> dict:
    """rbf_cka and mutual_knn of one pair the straightforward way: each unit's full n x n
    float64 matrices, the Kornblith recipe (median, exp, centering), argpartition for k-NN."""

    def rbf_centered(a):
        a = a.astype(np.float64)
        sq = np.einsum("ij,ij->i", a, a)
        g = a @ a.T
        g *= -2.0
        g += sq[:, None]
        g += sq[None, :]
        med = np.median(g)
        g *= -1.0 / (2.0 * threshold**2 * med)
        np.exp(g, out=g)
        means = g.mean(axis=0)
        g -= means[None, :]
        g -= means[:, None]
        g += means.mean()
        return g

    kx = rbf_centered(x)
    ky = rbf_centered(y)
    cka = float(np.vdot(kx, ky) / np.sqrt(np.vdot(kx, kx) * np.vdot(ky, ky)))
    del kx, ky

    def neighbours(a):
        a = a.astype(np.float64)
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        s = a @ a.T
        np.fill_diagonal(s, -np.inf)
        return np.sort(np.argpartition(-s, k, axis=1)[:, :k], axis=1)

    nx, ny = neighbours(x), neighbours(y)
    overlap = [len(np.intersect1d(a, b, assume_unique=True)) / k for a, b in zip(nx, ny,
                                                                                 strict=True)]
    return {"rbf_cka": cka, "mutual_knn": float(np.mean(overlap))}


def _naive_child(url: str, rows: int, units: list, pairs: list, out: str) -> None:
    from repscope.store import ActivationStore

    store = ActivationStore.open(url)
    values = []
    t0 = time.perf_counter()
    for i, j in pairs:
        (mi, li), (mj, lj) = units[i], units[j]
        values.append(naive_pair(store.read(mi, li, 0, rows), store.read(mj, lj, 0, rows)))
    seconds = time.perf_counter() - t0
    with open(out, "w") as f:
        json.dump({"seconds": seconds, "values": values}, f)


def _in_child(args: list[str]):
    """Run a child process of this module or bench.job: (stdout, seconds, PeakRSS)."""
    from bench.run import PeakRSS

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, text=True)
    with PeakRSS(proc.pid) as rss:
        stdout, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{args[0]} failed (exit {proc.returncode})")
    return stdout, time.perf_counter() - t0, rss


def bench_kernel(w, cache: str, outdir: str, quick: bool, tile_rows: int = 2048) -> dict:
    """One kernel workload: ours at w.rows and w.rows / 2 (same tiles), naive on 2 pairs."""
    import tempfile

    from bench.workloads import build_store
    from repscope.jobs.results import open_results

    url = build_store(w, cache)
    from dataclasses import asdict

    row = {"workload": {**asdict(w), "units": w.units}, "tile_rows": tile_rows, "runs": []}
    matrices = None
    for rows in (w.rows // 2, w.rows):
        out = os.path.join(outdir, "results", f"{w.name}-{rows}.zarr")
        raw = {"store": url, "metrics": list(w.metrics), "output": out,
               "rows": {"start": 0, "stop": rows},
               "compute": {"tile_rows": tile_rows, "executor": "ray"}}
        stdout, seconds, rss = _in_child(["bench.job", json.dumps(raw)])
        summary = json.loads(stdout.strip().splitlines()[-1])["summary"]
        row["runs"].append({"rows": rows, "seconds": seconds, "tiles": summary["tiles"],
                            "accumulate_seconds": summary["accumulate_seconds"],
                            "peak_rss_gib": rss.peak / 2**30,
                            "peak_pss_gib": rss.peak_pss / 2**30})
        print(f"[{w.name}] ours at {rows:,} rows: {seconds:.0f} s, PSS "
              f"{rss.peak_pss / 2**30:.2f} GiB", file=sys.stderr)
        ds = open_results(out)
        matrices = {m: np.asarray(ds[m].values) for m in w.metrics}
        units = list(zip(ds["model_x"].values.tolist(), ds["layer_x"].values.tolist(),
                         strict=True))
        row["estimates"] = json.loads(ds.attrs.get("estimates", "{}"))
    ours = row["runs"][-1]
    count = len(units)
    pairs = [(0, count - 1), (1, count // 2)][: 1 if quick else 2]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "naive.json")
        _, wall, rss = _in_child(["bench.kernels", "--naive-pair", url, str(w.rows),
                                  json.dumps(units), json.dumps(pairs), path])
        with open(path) as f:
            naive = json.load(f)
    per_pair = naive["seconds"] / len(pairs)
    all_pairs = count * (count - 1) // 2
    diff = {m: max(abs(v[m] - matrices[m][i, j]) for v, (i, j) in zip(naive["values"], pairs,
                                                                       strict=True))
            for m in w.metrics}
    row.update(naive_pairs_timed=len(pairs), naive_seconds_per_pair=per_pair,
               naive_seconds=per_pair * all_pairs, naive_peak_rss_gib=rss.peak / 2**30,
               naive_peak_pss_gib=rss.peak_pss / 2**30,
               speedup_vs_naive=per_pair * all_pairs / ours["seconds"],
               memory_ratio_vs_naive=rss.peak_pss / 2**30 / ours["peak_pss_gib"],
               max_abs_diff_vs_naive=diff,
               memory_growth_half_to_full=ours["peak_pss_gib"] / row["runs"][0]["peak_pss_gib"])
    return row


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        w = r["workload"]
        print(f"{w['name']}: {w['models']}x{w['layers']}x{w['width']}, "
              f"{', '.join(w['metrics'])}, tiles of {r['tile_rows']} rows")
        for run in r["runs"]:
            print(f"    ours {run['rows']:>7,} rows: {run['seconds']:8.1f} s, {run['tiles']} "
                  f"tiles, RSS {run['peak_rss_gib']:.2f} GiB, PSS {run['peak_pss_gib']:.2f} GiB")
        print(f"    naive loop: {r['naive_seconds_per_pair']:.1f} s per pair x "
              f"{r['workload']['units'] * (r['workload']['units'] - 1) // 2} pairs = "
              f"{r['naive_seconds']:.0f} s ({r['naive_pairs_timed']} timed), PSS "
              f"{r['naive_peak_pss_gib']:.2f} GiB; speedup {r['speedup_vs_naive']:.1f}x, "
              f"memory {r['memory_ratio_vs_naive']:.2f}x of ours; max diff "
              f"{json.dumps(r['max_abs_diff_vs_naive'])}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--naive-pair"]:
        url, rows, units, pairs, out = sys.argv[2:7]
        _naive_child(url, int(rows), [tuple(u) for u in json.loads(units)],
                     [tuple(p) for p in json.loads(pairs)], out)
