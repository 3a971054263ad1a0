"""The jobs users run most (seconds to minutes), as ``make bench`` workloads with targets.

- S1: 2 models x 6 layers x 512, 30,000 rows, linear CKA + PWCCA + Procrustes, end to end:
  efficiency (required GEMM flops at the rate measured here / wall time), speedup over the
  naive loop, and the fixed cost (wall time minus accumulate and finish).
- S2: 4 x 12 x 1,024, 3,000 rows, linear CKA: the sample space against the feature space's
  lower bound (its GEMM flops at the measured rate).
- M: 2 x 6 x 256 at 40,000 and 160,000 rows: peak memory of the process tree, its growth
  with the rows and its size against the job's accumulators.
- N: one job of S1's shape at 60,000 rows on a loopback cluster of 1 node and of 2 nodes of
  1 CPU each (`ray start`, token auth), twice each, alternating: the speedup of the second
  node (best time against best time).
- F: finishing pairs (mean CCA, PWCCA, Procrustes) at widths 256, 512 and 1,024 against the
  previous round's finishing, same moments, same threads (bench/finish.py).
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from bench.workloads import Workload, build_store

S1 = Workload("S1", 2, 6, 512, 30_000, ("linear_cka", "pwcca", "procrustes"), "everyday")
S2 = Workload("S2", 4, 12, 1024, 3_000, ("linear_cka",), "few rows, wide layers")
M = Workload("M", 2, 6, 256, 40_000, ("linear_cka",), "memory flat in rows")
N = Workload("N", 2, 6, 512, 60_000, ("linear_cka", "procrustes"), "more than one node")

TARGETS = {
    "S1 efficiency end to end": 0.5,
    "S1 speedup vs naive": 15.0,
    "S1 fixed seconds (at most)": 2.0,
    "S2 times under the feature-space lower bound": 3.0,
    "M peak ratio at 4x rows (at most)": 1.25,
    "M peak / (1.5 accumulators + 1 GiB) (at most)": 1.0,
    "N speedup on 2 nodes": 1.7,
    "F finishing speedup, smallest of 256/512/1024": 3.0,
}


def _fixed(summary, seconds: float) -> dict:
    """Where the wall time goes besides the statistics and the finishing."""
    inside = summary.seconds - summary.accumulate_seconds - summary.finish_seconds
    return {"fixed_seconds": seconds - summary.accumulate_seconds - summary.finish_seconds,
            "fixed_seconds_inside_job": inside,
            "process_start_seconds": seconds - summary.seconds}


def bench_s1(cache: str, outdir: str, quick: bool) -> dict:
    from bench.run import gemm_rate, run_naive, run_ours

    w = replace(S1, rows=10_000) if quick else S1
    url = build_store(w, cache)
    summary, plan, ours, units, seconds, peak = run_ours(url, w, f"{outdir}/results/S1.zarr")
    rate = gemm_rate(min(plan.tile_block_rows(0, 0), 16384), sum(plan.widths(0)))
    ideal = summary.gemm_flops / rate
    per_pair, timed, diff = run_naive(url, units, w.metrics, ours, 3, seconds=10.0)
    return {"workload": asdict(w), "seconds": seconds, "executor": summary.executor,
            "accumulate_seconds": summary.accumulate_seconds,
            "finish_seconds": summary.finish_seconds, **_fixed(summary, seconds),
            "gemm_rate_gflops": rate / 1e9, "efficiency_end_to_end": ideal / seconds,
            "efficiency_accumulate": ideal / summary.accumulate_seconds,
            "finish_ms_per_pair": 1e3 * summary.finish_seconds / summary.pairs_computed,
            "naive_seconds": per_pair * w.pairs, "naive_pairs_timed": timed,
            "speedup_vs_naive": per_pair * w.pairs / seconds,
            "max_abs_diff_vs_naive": diff, "peak_rss_gib": peak.peak / 2**30}


def bench_s2(cache: str, outdir: str, quick: bool) -> dict:
    from bench.run import gemm_rate, run_ours

    w = replace(S2, layers=4) if quick else S2
    url = build_store(w, cache)
    summary, plan, _, _, seconds, peak = run_ours(url, w, f"{outdir}/results/S2.zarr")
    width = w.units * w.width
    feature_flops = float(w.rows) * width * width  # one symmetric tile: n D^2 (2 per MAC)
    rate = gemm_rate(min(w.rows, 16384), min(width, 8192))
    bound = feature_flops / rate
    return {"workload": asdict(w), "space": plan.space, "tasks": summary.tasks,
            "executor": summary.executor, "seconds": seconds,
            "accumulate_seconds": summary.accumulate_seconds, **_fixed(summary, seconds),
            "feature_lower_bound_seconds": bound, "times_under_feature_bound": bound / seconds,
            "gram_efficiency": summary.gemm_flops / gemm_rate(w.width, min(w.rows, 8192))
            / summary.accumulate_seconds,
            "peak_rss_gib": peak.peak / 2**30}


def bench_m(cache: str, outdir: str, quick: bool) -> dict:
    from bench.run import run_ours

    base = replace(M, rows=10_000) if quick else M
    out = {"workload": asdict(base)}
    peaks = []
    for factor in (1, 4):
        w = replace(base, rows=base.rows * factor)
        url = build_store(w, cache)
        summary, plan, _, _, seconds, peak = run_ours(url, w, f"{outdir}/results/M{factor}.zarr",
                                                      pss=True)
        accumulators = sum(8 * sum(plan.widths(a)) * sum(plan.widths(b)) for a, b in plan.tiles)
        peaks.append(peak.peak_pss)
        out[f"rows_{w.rows}"] = {"seconds": seconds, "peak_pss_gib": peak.peak_pss / 2**30,
                                 "peak_rss_gib": peak.peak / 2**30,
                                 "accumulators_gib": accumulators / 2**30,
                                 "executor": summary.executor}
        out["peak_over_bound"] = max(out.get("peak_over_bound", 0.0),
                                     peak.peak_pss / (1.5 * accumulators + 2**30))
    out["peak_ratio_4x_rows"] = peaks[1] / peaks[0]
    return out


def bench_n(cache: str, outdir: str, quick: bool, repeats: int = 2) -> dict:
    """S1's shape on 1 and 2 loopback nodes of 1 CPU each, driven through --address.

    The two set-ups alternate (1, 2, 1, 2, ...) and the speedup is the ratio of their best
    times: on a VM the cost of memory touched for the first time moves a run by tens of
    percent from minute to minute (docs/performance.md), and alternating exposes both set-ups
    to the same drift. Every run's time is kept."""
    from bench.run import run_ours
    from tests.raycluster import start_cluster, stop_cluster

    w = replace(N, rows=20_000) if quick else N
    url = build_store(w, cache)
    token_dir = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    token = token_dir / "token"
    token.write_text(secrets.token_hex(32))
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    out: dict = {"workload": asdict(w)}
    matrices = {}
    for _ in range(repeats):
        for nodes in (1, 2):
            cluster = start_cluster(token_dir, head_cpus=1)
            try:
                for _ in range(nodes - 1):
                    cluster.add_worker(num_cpus=1)
                _wait_for_cpus(cluster.address, nodes)
                summary, _, ours, _, seconds, _ = run_ours(
                    url, w, f"{outdir}/results/N{nodes}.zarr", address=cluster.address)
                runs = out.setdefault(f"nodes_{nodes}", {"runs": []})["runs"]
                runs.append({"seconds": seconds, "tasks": summary.tasks,
                             "executor": summary.executor,
                             "accumulate_seconds": summary.accumulate_seconds,
                             "finish_seconds": summary.finish_seconds})
                matrices[nodes] = ours
            finally:
                stop_cluster(cluster)
    for nodes in (1, 2):
        out[f"nodes_{nodes}"]["seconds"] = min(r["seconds"] for r in out[f"nodes_{nodes}"]["runs"])
    out["speedup_2_nodes"] = out["nodes_1"]["seconds"] / out["nodes_2"]["seconds"]
    out["max_abs_diff_1_vs_2_nodes"] = max(
        float(np.abs(matrices[1][m] - matrices[2][m]).max()) for m in w.metrics)
    return out


def _wait_for_cpus(address: str, cpus: int, timeout: float = 120) -> None:
    import subprocess

    code = ("import ray, time, sys\nray.init(address=sys.argv[1], logging_level='ERROR')\n"
            "t = time.time()\nwhile ray.cluster_resources().get('CPU', 0) < int(sys.argv[2]):\n"
            "    assert time.time() - t < 120, 'nodes did not join'\n    time.sleep(1)\n")
    subprocess.run([sys.executable, "-c", code, address, str(cpus)], check=True,
                   timeout=timeout)


def bench_f(cache: str, outdir: str, quick: bool) -> dict:
    from bench.finish import bench_finish

    return {"widths": bench_finish(quick=quick)}


BENCHES = {"S1": bench_s1, "S2": bench_s2, "M": bench_m, "N": bench_n, "F": bench_f}


def verdicts(rows: dict) -> list[tuple[str, float, float, bool]]:
    """(target, measured, wanted, met) for the workloads that ran."""
    got = {}
    if "S1" in rows:
        r = rows["S1"]
        got["S1 efficiency end to end"] = r["efficiency_end_to_end"]
        got["S1 speedup vs naive"] = r["speedup_vs_naive"]
        got["S1 fixed seconds (at most)"] = r["fixed_seconds"]
    if "S2" in rows:
        under = rows["S2"]["times_under_feature_bound"]
        got["S2 times under the feature-space lower bound"] = under
    if "M" in rows:
        got["M peak ratio at 4x rows (at most)"] = rows["M"]["peak_ratio_4x_rows"]
        got["M peak / (1.5 accumulators + 1 GiB) (at most)"] = rows["M"]["peak_over_bound"]
    if "N" in rows:
        got["N speedup on 2 nodes"] = rows["N"]["speedup_2_nodes"]
    if "F" in rows:
        got["F finishing speedup, smallest of 256/512/1024"] = min(
            w["speedup"] for w in rows["F"]["widths"].values())
    out = []
    for name, value in got.items():
        wanted = TARGETS[name]
        met = value <= wanted if "at most" in name else value >= wanted
        out.append((name, value, wanted, met))
    return out


def print_verdicts(rows: dict) -> None:
    for name, value, wanted, met in verdicts(rows):
        print(f"  {name:48} {value:8.2f}  target {wanted:5.2f}  {'met' if met else 'MISSED'}")
