"""`python -m bench.store_read [FOLDER] [--reps 12]`: the cost of checking every chunk.

A 512 MiB unit (174,762 rows x 768 float32, default 4 MiB chunks and 256 MiB shards) is
written once under FOLDER, then read whole from the page cache by store/direct_read.py with
the per-chunk CRC32C check on and off (same file, reads interleaved), and once through
Zarr's own pipeline. Prints min / median / max seconds per read.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

import repscope.store.direct_read as direct_read
from repscope.store import ActivationStore, ingest_array

ROWS, FEATURES = (512 << 20) // (768 * 4), 768


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", nargs="?", default=None)
    parser.add_argument("--reps", type=int, default=12)
    args = parser.parse_args(argv)
    folder = args.folder or tempfile.mkdtemp(prefix="repscope-store-read-")
    store = ActivationStore.create(f"{folder}/unit.zarr")
    if not store.units():
        x = np.random.default_rng(0).standard_normal((ROWS, FEATURES), dtype=np.float32)
        ingest_array(store, "m", "l", x)
        del x
    opened = store._open("m", "l", None)
    layout, check = opened.direct, direct_read._check_crc

    def unchecked() -> np.ndarray:
        direct_read._check_crc = lambda *a: None
        try:
            return direct_read.read_rows(layout, 0, ROWS)
        finally:
            direct_read._check_crc = check

    reads = {"checked (store.read)": lambda: store.read("m", "l"), "unchecked": unchecked}
    times: dict[str, list[float]] = {name: [] for name in reads}
    for rep in range(args.reps):
        for name, read in sorted(reads.items(), reverse=bool(rep % 2)):
            read()  # this file's pages in the cache right before the timed read
            t0 = time.perf_counter()
            read()
            times[name].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    np.asarray(opened.array[:])
    times["through Zarr"] = [time.perf_counter() - t0]
    for name, ts in times.items():
        print(f"{name:22s} min {min(ts):.3f} s  median {statistics.median(ts):.3f} s  "
              f"max {max(ts):.3f} s  ({len(ts)} reads of 512 MiB)")


if __name__ == "__main__":
    main()
