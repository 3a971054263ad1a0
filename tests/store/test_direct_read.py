"""Shards read directly (store/direct_read.py) give exactly what Zarr gives; layouts it does
not know read through Zarr; format-1 arrays (chunks may be absent) read absent chunks as fill."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from repscope.store import ActivationStore, ingest_array
from repscope.store.direct_read import read_rows, shard_layout

ROWS, FEATURES, CHUNK_ROWS = 1000, 7, 37


def _store(tmp_path, data: np.ndarray, dtype: str = "float32") -> ActivationStore:
    store = ActivationStore.create(str(tmp_path / "acts.zarr"))
    item = np.dtype(dtype).itemsize
    # 37 rows a chunk, 5 chunks a shard: 6 shards, the last one partial (and its last chunk)
    ingest_array(store, "m", "l", data, dtype=dtype, chunk_bytes=CHUNK_ROWS * FEATURES * item,
                 shard_bytes=5 * CHUNK_ROWS * FEATURES * item)
    return ActivationStore.open(store.url)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_direct_reads_equal_zarr_reads(tmp_path, dtype):
    data = np.random.default_rng(0).standard_normal((ROWS, FEATURES))
    store = _store(tmp_path, data, dtype)
    opened = store._open("m", "l", None)
    layout = opened.direct
    assert layout is not None and layout.directory is not None
    assert (layout.chunk_rows, layout.shard_rows) == (CHUNK_ROWS, 5 * CHUNK_ROWS)
    assert layout.checksums and layout.dense
    rng = np.random.default_rng(1)
    edges = [(0, ROWS), (0, 0), (36, 38), (37, 74), (184, 186), (925, ROWS), (999, ROWS)]
    edges += [tuple(sorted(rng.integers(0, ROWS + 1, 2))) for _ in range(40)]
    for start, stop in edges:
        got = store.read("m", "l", int(start), int(stop))
        assert got.dtype == np.dtype(dtype) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, np.asarray(opened.array[start:stop]))
    np.testing.assert_array_equal(store.read("m", "l"), data.astype(dtype))


def test_remote_reads_by_byte_range_equal_local_reads(tmp_path, memory):
    data = np.random.default_rng(0).standard_normal((ROWS, FEATURES)).astype(np.float32)
    local = _store(tmp_path, data)
    remote = memory.create()
    ingest_array(remote, "m", "l", data, chunk_bytes=CHUNK_ROWS * FEATURES * 4,
                 shard_bytes=5 * CHUNK_ROWS * FEATURES * 4)
    layout = remote._open("m", "l", None).direct
    assert layout is not None and layout.directory is None  # read by byte ranges
    for start, stop in [(0, ROWS), (0, 1), (36, 38), (185, 370), (500, 999), (999, ROWS)]:
        np.testing.assert_array_equal(remote.read("m", "l", start, stop),
                                      local.read("m", "l", start, stop))


def test_format1_arrays_read_absent_chunks_as_fill(tmp_path):
    # Format 1 wrote no checksums and skipped chunks equal to the fill value.
    arr = zarr.create_array(str(tmp_path / "f1.zarr"), shape=(100, 3), dtype="float32",
                            chunks=(10, 3), shards=(40, 3), compressors=None, fill_value=0.0)
    data = np.random.default_rng(0).standard_normal((100, 3)).astype(np.float32)
    data[10:20] = 0.0  # a chunk of fill values: not written
    data[40:80] = 0.0  # a whole shard of them: no shard file
    arr[:] = data
    layout = shard_layout(arr, dense=False)
    assert layout is not None and not layout.checksums
    for start, stop in [(0, 100), (5, 45), (15, 16), (79, 81)]:
        np.testing.assert_array_equal(read_rows(layout, start, stop), data[start:stop])


def test_layouts_it_does_not_know_read_through_zarr(tmp_path):
    compressed = zarr.create_array(str(tmp_path / "z.zarr"), shape=(50, 3), dtype="float32",
                                   chunks=(10, 3), shards=(20, 3))
    assert shard_layout(compressed, dense=True) is None  # Zarr's default compressor
    narrow = zarr.create_array(str(tmp_path / "n.zarr"), shape=(50, 4), dtype="float32",
                               chunks=(10, 2), shards=(20, 4), compressors=None)
    assert shard_layout(narrow, dense=True) is None  # a row spans two chunks


def test_reads_into_a_reused_array(tmp_path):
    """``out``: the rows land in the caller's array (a task reuses its memory block to block);
    an array of the wrong shape or dtype is refused, not silently reinterpreted."""
    data = np.random.default_rng(3).standard_normal((ROWS, FEATURES))
    store = _store(tmp_path, data)
    out = np.full((100, FEATURES), np.nan, np.float32)
    for start in (0, 150, 900):
        got = store.read("m", "l", start, start + 100, out=out)
        assert got is out
        np.testing.assert_array_equal(out, data[start:start + 100].astype(np.float32))
    with pytest.raises(ValueError, match="out must be a C-contiguous"):
        store.read("m", "l", 0, 50, out=out)
    with pytest.raises(ValueError, match="out must be a C-contiguous"):
        store.read("m", "l", 0, 100, out=out.astype(np.float64))
