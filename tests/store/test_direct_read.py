"""Local shard files read directly (store/direct_read.py) give exactly what Zarr gives, and
a damaged shard fails the same way: a StorageError naming the unit and rows."""

from __future__ import annotations

import os

import google_crc32c
import numpy as np
import pytest
import zarr

from repscope.errors import StorageError
from repscope.store import ActivationStore, ingest_array
from repscope.store.direct_read import shard_layout

ROWS, FEATURES, CHUNK_ROWS = 1000, 7, 37


def _store(tmp_path, data: np.ndarray, dtype: str = "float32") -> ActivationStore:
    store = ActivationStore.create(str(tmp_path / "acts.zarr"))
    item = np.dtype(dtype).itemsize
    # 37 rows a chunk, 5 chunks a shard: 6 shards, the last one partial (and its last chunk)
    ingest_array(store, "m", "l", data, dtype=dtype, chunk_bytes=CHUNK_ROWS * FEATURES * item,
                 shard_bytes=5 * CHUNK_ROWS * FEATURES * item)
    return ActivationStore.open(store.url)


def _zarr_rows(store: ActivationStore, start: int, stop: int) -> np.ndarray:
    return np.asarray(store._array("m", "l")[start:stop])


def _shard_file(store: ActivationStore, shard: int):
    layout = store._direct[("m", "l")]
    return layout.directory / layout.shard_key(shard)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_direct_reads_equal_zarr_reads(tmp_path, dtype):
    data = np.random.default_rng(0).standard_normal((ROWS, FEATURES))
    store = _store(tmp_path, data, dtype)
    assert store.read("m", "l", 0, 1).shape == (1, FEATURES)
    layout = store._direct[("m", "l")]
    assert layout is not None and layout.chunk_rows == CHUNK_ROWS
    assert layout.shard_rows == 5 * CHUNK_ROWS
    rng = np.random.default_rng(1)
    edges = [(0, ROWS), (0, 0), (36, 38), (184, 186), (925, ROWS), (999, ROWS)]
    edges += [tuple(sorted(rng.integers(0, ROWS + 1, 2))) for _ in range(40)]
    for start, stop in edges:
        got = store.read("m", "l", int(start), int(stop))
        assert got.dtype == np.dtype(dtype) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, _zarr_rows(store, start, stop))
    np.testing.assert_array_equal(store.read("m", "l"), data.astype(dtype))


def test_unwritten_chunks_and_shards_read_as_fill(tmp_path):
    data = np.random.default_rng(0).standard_normal((ROWS, FEATURES))
    data[CHUNK_ROWS: 2 * CHUNK_ROWS] = 0.0  # a whole chunk of fill values
    store = _store(tmp_path, data)
    store.read("m", "l", 0, 1)
    os.remove(_shard_file(store, 3))  # a shard never written reads as fill, as in Zarr
    expected = data.astype(np.float32)
    expected[3 * 185: 4 * 185] = 0.0
    for start, stop in [(0, ROWS), (30, 80), (500, 800)]:
        got = store.read("m", "l", start, stop)
        np.testing.assert_array_equal(got, _zarr_rows(store, start, stop))
        np.testing.assert_array_equal(got, expected[start:stop])


def test_remote_and_compressed_arrays_read_through_zarr(tmp_path, memory):
    data = np.random.default_rng(0).standard_normal((50, 3))
    remote = memory.create()
    ingest_array(remote, "m", "l", data)
    remote.read("m", "l")
    assert remote._direct[("m", "l")] is None
    compressed = zarr.create_array(str(tmp_path / "z.zarr"), shape=(50, 3), dtype="float32",
                                   chunks=(10, 3), shards=(20, 3))
    assert shard_layout(compressed) is None  # Zarr's default compressor
    plain = zarr.create_array(str(tmp_path / "p.zarr"), shape=(50, 3), dtype="float32",
                              chunks=(10, 3), shards=(20, 3), compressors=None)
    assert shard_layout(plain) is not None
    narrow = zarr.create_array(str(tmp_path / "n.zarr"), shape=(50, 4), dtype="float32",
                               chunks=(10, 2), shards=(20, 4), compressors=None)
    assert shard_layout(narrow) is None  # a row spans two chunks: not one byte range


def _damage(path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "index":
        raw[-10] ^= 0xFF
    elif how == "truncated":
        raw = raw[: len(raw) // 2]
    else:  # a checksummed index whose first chunk points past the data
        n = 5
        index = np.frombuffer(bytes(raw[-(16 * n + 4):-4]), dtype="<u8").copy().reshape(n, 2)
        index[0, 0] = len(raw)
        body = index.tobytes()
        raw[-(16 * n + 4):] = body + google_crc32c.value(body).to_bytes(4, "little")
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["index", "truncated", "offset"])
def test_damaged_shard_is_a_storage_error_naming_the_unit(tmp_path, how):
    data = np.random.default_rng(0).standard_normal((ROWS, FEATURES))
    store = _store(tmp_path, data)
    store.read("m", "l", 0, 1)
    _damage(_shard_file(store, 0), how)
    with pytest.raises(StorageError, match=r"corrupt data in store .*model 'm', layer 'l', "
                                           r"rows 0:100"):
        store.read("m", "l", 0, 100)
    np.testing.assert_array_equal(store.read("m", "l", 185, 300), data[185:300].astype("f4"))
