"""Inputs larger than the memory budget stream shard by shard (dask arrays, memmaps)."""

from __future__ import annotations

import tracemalloc

import numpy as np

from repscope.store import ingest_array, ingest_path

MiB = 1 << 20


def _peak_during(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_dask_array_streams_with_bounded_memory(tmp_path):
    import dask
    import dask.array as da

    from repscope.store import ActivationStore

    # 64 MiB of float64 in 1 MiB dask chunks, never computed whole.
    rows, features = 32 * 1024, 256
    x = da.random.default_rng(0).standard_normal((rows, features), chunks=(512, features))
    store = ActivationStore.create(str(tmp_path / "st"))
    # Synchronous scheduler: the cores are shared with other work, one thread keeps it steady.
    with dask.config.set(scheduler="synchronous"):
        peak = _peak_during(
            lambda: ingest_array(store, "m", "big", x, chunk_bytes=256 * 1024, shard_bytes=MiB)
        )
    assert x.nbytes == 64 * MiB
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB while ingesting a 64 MiB dask array"
    info = store.unit_info("m", "big")
    assert (info.rows, info.chunk_rows, info.shard_rows) == (rows, 256, 1024)
    np.testing.assert_array_equal(
        store.read("m", "big", 1000, 1100), x[1000:1100].compute().astype(np.float32)
    )


def test_npy_file_is_memory_mapped(tmp_path):
    from repscope.store import ActivationStore

    rows, features = 16 * 1024, 512  # 32 MiB of float32
    path = tmp_path / "layer7.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, features))
    mm[:] = np.arange(rows, dtype=np.float32)[:, None]
    mm.flush()
    del mm
    store = ActivationStore.create(str(tmp_path / "st"))
    peak = _peak_during(
        lambda: ingest_path(store, "m", tmp_path, chunk_bytes=512 * 1024, shard_bytes=2 * MiB)
    )
    assert peak < 10 * MiB, f"peak {peak / MiB:.1f} MiB while ingesting a 32 MiB .npy"
    assert store.units() == [("m", "layer7")]
    np.testing.assert_array_equal(
        store.read("m", "layer7", rows - 3)[:, 0], [rows - 3, rows - 2, rows - 1]
    )
