"""`python -m bench.run [--quick] [--workloads W1,W2] [--out bench-output/bench.json]`.

For each workload: our job end to end on embedded Ray (peak RSS of the whole process tree
sampled), (a) the naive float64 loop on a sample of pairs, scaled to all pairs, (b) the float32
GEMM rate on the job's shapes, measured here, and (c) pytorch-cka where it computes the same
matrix (debiased linear CKA from Grams), optional. Kernel workloads (K1: rbf_cka and
mutual_knn in row-block tiles) run bench/kernels.py instead. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace

import numpy as np

from bench import everyday, kernels, naive
from bench.workloads import FULL, QUICK, build_store


class PeakRSS:
    """Peak memory of a process and all its descendants, sampled every 0.1 s.

    peak: the summed RSS (pages shared by several processes, such as Ray's object store,
    counted once per process that maps them: an overstatement); peak_pss: the summed
    proportional set size (each shared page split among its processes: the tree's real
    footprint), where the system reports it (Linux) and ``pss`` is set, else equal to peak.
    Reading a process's PSS walks its page tables under its memory lock (34 ms for 1.6 GB of
    4 KiB pages here): every 0.1 s that slows the job measured, so timed workloads whose
    memory is not a target sample RSS only (``pss=False``).
    """

    def __init__(self, pid: int | None = None, pss: bool = True):
        import psutil

        self.pss = pss
        self.proc = psutil.Process(pid or os.getpid())
        self.peak = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> tuple[int, int]:
        import psutil

        rss = pss = 0
        try:
            tree = [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:  # a process of the tree ended while it was listed
            return 0, 0
        for p in tree:
            try:
                info = p.memory_full_info() if self.pss else p.memory_info()
            except psutil.Error:
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        return rss, pss

    def _run(self):
        while not self._stop.is_set():
            rss, pss = self._sample()
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def gemm_rate(rows: int, width: int, repeats: int = 3) -> float:
    """(b) float32 syrk flops/s on a (rows, width) block, best of ``repeats``, this process."""
    from scipy.linalg import blas

    z = np.random.default_rng(0).standard_normal((rows, width), dtype=np.float32)
    c = np.zeros((width, width), np.float32, order="F")
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        blas.ssyrk(1.0, z.T, beta=0.0, c=c, trans=0, lower=0, overwrite_c=1)
        best = min(best, time.perf_counter() - t)
    return rows * width * width / best  # 2 flops per MAC, half the matrix


def run_ours(url: str, w, out: str, rows: int | None = None, address: str | None = None,
             pss: bool = False, **compute):
    """Our job end to end in a child process (Python start, imports and Ray start included):
    (summary, plan, matrices, units, seconds, PeakRSS of the child's process tree; its PSS
    only with ``pss``). The plan is the one this machine's resources give (a cluster's may
    split rows differently)."""
    from types import SimpleNamespace

    from repscope.cluster.execute import LocalExecutor
    from repscope.jobs.plan import make_plan, select
    from repscope.jobs.results import open_results
    from repscope.jobs.spec import spec_from_dict
    from repscope.store import ActivationStore

    raw = {"store": url, "metrics": list(w.metrics), "output": out,
           "compute": {k: v for k, v in compute.items() if v is not None}}
    if rows:
        raw["rows"] = {"start": 0, "stop": rows}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.job", json.dumps(raw),
                             *([address] if address else [])], stdout=subprocess.PIPE, text=True)
    with PeakRSS(proc.pid, pss=pss) as rss:
        stdout, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"job for {w.name} failed (exit {proc.returncode})")
    summary = SimpleNamespace(**json.loads(stdout.strip().splitlines()[-1])["summary"])
    spec = spec_from_dict(raw)
    resources = LocalExecutor(spec.compute.workers).resources(spec.compute.memory_per_worker)
    plan = make_plan(spec, select(spec, ActivationStore.open(url)), resources)
    ds = open_results(out)
    matrices = {m: np.asarray(ds[m].values) for m in w.metrics}
    units = list(zip(ds["model_x"].values.tolist(), ds["layer_x"].values.tolist(), strict=True))
    return summary, plan, matrices, units, seconds, rss


def run_naive(url: str, units, metrics, ours, least: int, seconds: float = 20.0):
    """(a) on pairs spread over the matrix, at least ``least`` of them and then more until
    ``seconds`` have passed (a per-pair time over many pairs moves less with the page cache):
    seconds per pair, pairs timed, max |ours - naive|."""
    from repscope.store import ActivationStore

    store = ActivationStore.open(url)
    count = len(units)
    rng = np.random.default_rng(0)
    pairs = [(0, count - 1)] + [tuple(sorted(rng.choice(count, 2, replace=False)))
                                for _ in range(count * count)]
    diff = {m: 0.0 for m in metrics}
    t0 = time.perf_counter()
    timed = 0
    for i, j in pairs:
        if timed >= least and time.perf_counter() - t0 >= seconds:
            break
        values = naive.naive_pair(store, units[i], units[j], metrics)
        for m, v in values.items():
            diff[m] = max(diff[m], abs(v - ours[m][i, j]))
        timed += 1
    return (time.perf_counter() - t0) / timed, timed, diff


def run_peer(url: str, rows: int, ours_debiased: np.ndarray | None):
    """(c) pytorch-cka in a child process: seconds, peak RSS, max |ours - peer|."""
    try:
        import cka  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return {"status": "not installed (pip install '.[bench]')"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "peer.npy")
        proc = subprocess.Popen([sys.executable, "-m", "bench.peer", url, str(rows), path],
                                stdout=subprocess.PIPE, text=True)
        with PeakRSS(proc.pid) as rss:
            out, _ = proc.communicate()
        if proc.returncode:
            return {"status": f"failed (exit {proc.returncode})"}
        result = json.loads(out.strip().splitlines()[-1])
        matrix = np.load(path)
    result.update(status="ok", peak_rss_gib=rss.peak / 2**30, peak_pss_gib=rss.peak_pss / 2**30)
    if ours_debiased is not None:
        result["max_abs_diff_vs_ours"] = float(np.abs(matrix - ours_debiased).max())
    return result


def bench_workload(w, cache: str, outdir: str, quick: bool) -> dict:
    t = time.perf_counter()
    url = build_store(w, cache)
    print(f"[{w.name}] store {url} ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    res = os.path.join(outdir, "results")
    out = os.path.join(res, f"{w.name}.zarr")
    summary, plan, ours, units, seconds, peak = run_ours(url, w, out, pss=True)
    widest = max(sum(plan.widths(g)) for g in range(len(plan.groups)))
    if plan.space == "feature":
        rate = gemm_rate(min(plan.block_rows, 8192), min(widest, 4096))
    else:  # one unit's Gram: n x n output, the unit's width inner
        rate = gemm_rate(max(u.features for u in plan.units), min(plan.n_rows, 8192))
    ideal = summary.gemm_flops / rate
    row = {
        "workload": asdict(w), "space": plan.space, "tiles": len(plan.tiles),
        "tasks": summary.tasks, "block_rows": plan.block_rows,
        "seconds": seconds, "accumulate_seconds": summary.accumulate_seconds,
        "gemm_flops": summary.gemm_flops, "gemm_rate_gflops": rate / 1e9,
        "efficiency_accumulate": ideal / summary.accumulate_seconds,
        "efficiency_end_to_end": ideal / seconds, "peak_rss_gib": peak.peak / 2**30,
        "peak_pss_gib": peak.peak_pss / 2**30,
    }
    if w.name != "W3":
        per_pair, timed, diff = run_naive(url, units, w.metrics, ours, 3 if quick else 2,
                                          seconds=5.0 if quick else 20.0)
        row.update(naive_seconds_per_pair=per_pair, naive_pairs_timed=timed,
                   naive_seconds=per_pair * w.pairs, speedup_vs_naive=per_pair * w.pairs / seconds,
                   max_abs_diff_vs_naive=diff)
    if w.name == "W4":
        # The feature space with the same job, tiled to 2 GiB per worker; its tiles are
        # finished one at a time, so the driver never holds the whole D x D moments.
        s2, p2, m2, _, sec2, peak2 = run_ours(url, w, os.path.join(res, "W4-feature.zarr"),
                                              pss=True, space="feature",
                                              memory_per_worker="2GiB")
        rate2 = gemm_rate(min(p2.block_rows, 8192),
                          min(max(sum(p2.widths(g)) for g in range(len(p2.groups))), 4096))
        row["feature_space"] = {
            "seconds": sec2, "accumulate_seconds": s2.accumulate_seconds,
            "gemm_flops": s2.gemm_flops, "tiles": len(p2.tiles),
            "gemm_rate_gflops": rate2 / 1e9,
            "efficiency_accumulate": s2.gemm_flops / rate2 / s2.accumulate_seconds,
            "peak_rss_gib": peak2.peak / 2**30, "peak_pss_gib": peak2.peak_pss / 2**30,
            "max_abs_diff_vs_sample": {m: float(np.abs(m2[m] - ours[m]).max()) for m in ours},
        }
        row["sample_speedup_vs_feature"] = sec2 / seconds
        row["peer"] = run_peer(url, w.rows, ours.get("linear_cka_debiased"))
    if w.name == "W1":
        # pytorch-cka holds U n x n Grams: compare on the rows it can hold (debiased CKA).
        rows = 4000
        wp = replace(w, metrics=("linear_cka_debiased",))
        s3, p3, m3, _, sec3, peak3 = run_ours(url, wp, os.path.join(res, "W1-peer.zarr"), pss=True,
                                              rows=rows)
        row["peer"] = {"rows": rows, "ours_seconds": sec3, "ours_space": p3.space,
                       "ours_peak_rss_gib": peak3.peak / 2**30,
                       "ours_peak_pss_gib": peak3.peak_pss / 2**30,
                       **run_peer(url, rows, m3["linear_cka_debiased"])}
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (minutes on 2 cores)")
    ap.add_argument("--workloads", default="S1,S2,M,N,F,K1",
                    help="comma-separated: S1,S2,M,N,F (bench/everyday.py, minutes), K1 (kernel "
                    "metrics, bench/kernels.py) and W1,W2,W3,W4 (the large workloads, most of "
                    "an hour)")
    ap.add_argument("--rows", type=int, help="override the rows of W1/W3 (W3 gets 4x)")
    ap.add_argument("--out", default="bench-output/bench.json")
    ap.add_argument("--cache", default="bench-output/cache")
    args = ap.parse_args(argv)
    table = QUICK if args.quick else FULL
    outdir = os.path.dirname(args.out) or "."
    os.makedirs(args.cache, exist_ok=True)
    rows, everyday_rows = [], {}
    for name in (n.strip() for n in args.workloads.split(",")):
        if name in everyday.BENCHES:
            print(f"[{name}] ...", file=sys.stderr)
            everyday_rows[name] = everyday.BENCHES[name](args.cache, outdir, args.quick)
            _write(args.out, rows, everyday_rows)
            continue
        w = table[name]
        if args.rows and w.name in ("W1", "W3"):
            w = replace(w, rows=args.rows * (4 if w.name == "W3" else 1))
        if w.name.startswith("K"):
            rows.append(kernels.bench_kernel(w, args.cache, outdir, args.quick))
        else:
            rows.append(bench_workload(w, args.cache, outdir, args.quick))
        _write(args.out, rows, everyday_rows)
    if rows:
        print_table([r for r in rows if "runs" not in r])
        kernels.print_rows([r for r in rows if "runs" in r])
    if everyday_rows:
        print("targets (issue 17):")
        everyday.print_verdicts(everyday_rows)


def _write(path, rows, everyday_rows=None):
    import platform

    doc = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "numpy": np.__version__}, "workloads": rows,
           "everyday": everyday_rows or {}}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=float)


def print_table(rows):
    if not rows:
        return
    print(f"{'wl':3} {'size':>22} {'space':7} {'ours s':>8} {'naive s':>9} {'speedup':>8} "
          f"{'eff acc':>7} {'eff e2e':>7} {'RSS GiB':>7} {'PSS GiB':>7} {'max diff':>9}")
    for r in rows:
        w = r["workload"]
        size = f"{w['models']}x{w['layers']}x{w['width']} n={w['rows']}"
        diff = max(r.get("max_abs_diff_vs_naive", {0: float('nan')}).values())
        print(f"{w['name']:3} {size:>22} {r['space']:7} {r['seconds']:8.1f} "
              f"{r.get('naive_seconds', float('nan')):9.1f} "
              f"{r.get('speedup_vs_naive', float('nan')):8.1f} "
              f"{r['efficiency_accumulate']:7.2f} {r['efficiency_end_to_end']:7.2f} "
              f"{r['peak_rss_gib']:7.2f} {r.get('peak_pss_gib', float('nan')):7.2f} "
              f"{diff:9.1e}")
        if "feature_space" in r:
            f = r["feature_space"]
            print(f"    feature space: {f['seconds']:.1f} s, RSS {f['peak_rss_gib']:.2f} GiB, "
                  f"PSS {f['peak_pss_gib']:.2f} GiB; "
                  f"sample is {r['sample_speedup_vs_feature']:.1f}x faster")
        if "peer" in r:
            print(f"    pytorch-cka: {json.dumps(r['peer'], default=float)}")


if __name__ == "__main__":
    main()
