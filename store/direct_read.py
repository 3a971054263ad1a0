"""Rows of a unit read straight from its local shard files, when Zarr's pipeline adds nothing.

A unit that repscope writes to local disk is uncompressed and sharded along rows, and every
inner chunk spans all features, so rows ``a:b`` of a chunk are one contiguous byte range of
its shard file. Reading those ranges into the output array costs one copy, where Zarr's
per-chunk pipeline costs several plus an event loop. On a 2-core machine that CPU comes out
of the GEMMs the reads overlap with (docs/performance.md).

The byte layout is the Zarr v3 sharding spec's: the shard file holds the inner chunks and,
at its end, the index (one little-endian uint64 (offset, nbytes) pair per chunk, all ones
for a chunk not written, which reads as the fill value) followed by its CRC32C. The index's
checksum and every range are checked, so a damaged shard fails as it does through Zarr.
Anything else (compression, big-endian bytes, chunks narrower than a row, remote storage)
is not recognised and reads through Zarr.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

_MISSING = 2**64 - 1


@dataclass(frozen=True)
class ShardLayout:
    """Where and how a unit's rows lie in its shard files."""

    directory: Path
    shard_key: Callable[[int], str]  # shard number -> path relative to directory
    features: int
    dtype: np.dtype
    shard_rows: int
    chunk_rows: int
    fill_value: Any

    @property
    def row_bytes(self) -> int:
        return self.features * self.dtype.itemsize

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows


def shard_layout(array: Any) -> ShardLayout | None:
    """The layout of a zarr array this module can read directly, else None."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
    from zarr.codecs.sharding import ShardingCodecIndexLocation
    from zarr.storage import LocalStore

    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3 or not isinstance(array.store, LocalStore):
        return None
    if len(array.shape) != 2 or len(meta.codecs) != 1 or meta.storage_transformers:
        return None
    sharding = meta.codecs[0]
    if not isinstance(sharding, ShardingCodec):
        return None
    dtype = np.dtype(array.dtype)
    little = dtype.itemsize == 1 or dtype.byteorder in "<|" or (
        dtype.byteorder == "=" and np.little_endian)

    def little_bytes(codec: Any) -> bool:
        return isinstance(codec, BytesCodec) and (
            codec.endian is None or codec.endian.value == "little")

    index = sharding.index_codecs
    if not (
        little
        and sharding.index_location == ShardingCodecIndexLocation.end
        and len(sharding.codecs) == 1 and little_bytes(sharding.codecs[0])
        and len(index) == 2 and little_bytes(index[0]) and isinstance(index[1], Crc32cCodec)
    ):
        return None
    features = int(array.shape[1])
    shard_rows, shard_cols = (int(s) for s in array.shards)
    chunk_rows, chunk_cols = (int(s) for s in sharding.chunk_shape)
    if shard_cols != features or chunk_cols != features or shard_rows % chunk_rows:
        return None
    return ShardLayout(
        directory=Path(array.store.root) / array.path,
        shard_key=lambda i, encode=meta.encode_chunk_key: encode((i, 0)),
        features=features,
        dtype=dtype.newbyteorder("<"),
        shard_rows=shard_rows,
        chunk_rows=chunk_rows,
        fill_value=meta.fill_value,
    )


def read_rows(layout: ShardLayout, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) (within the array) as a new (stop - start, features) array.

    Raises ValueError for a damaged shard (checksum, truncation, chunk size), OSError for
    the file system's own failures.
    """
    out = np.empty((stop - start, layout.features), dtype=layout.dtype)
    flat = out.reshape(-1).view(np.uint8)
    rb = layout.row_bytes
    for shard in range(start // layout.shard_rows, -(-stop // layout.shard_rows)):
        first = shard * layout.shard_rows
        lo, hi = max(start, first), min(stop, first + layout.shard_rows)
        path = layout.directory / layout.shard_key(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a shard never written holds the fill value
            out[lo - start: hi - start] = layout.fill_value
            continue
        try:
            for src, dst, size in _ranges(layout, _read_index(fd, layout, path), first, lo, hi):
                if src is None:
                    out[dst - start: dst - start + size] = layout.fill_value
                else:
                    _pread_into(fd, flat[(dst - start) * rb: (dst - start + size) * rb], src,
                                path)
        finally:
            os.close(fd)
    return out


def _read_index(fd: int, layout: ShardLayout, path: Path) -> tuple[np.ndarray, int]:
    """The shard's (chunks, 2) offsets and sizes, checksum verified, and the data's end."""
    n = layout.chunks_per_shard
    size = os.fstat(fd).st_size
    index_bytes = 16 * n + 4
    if size < index_bytes:
        raise ValueError(f"shard {path.name} is {size} bytes, shorter than its index")
    raw = bytearray(index_bytes)
    _pread_into(fd, memoryview(raw), size - index_bytes, path)
    body, stored = bytes(raw[:-4]), bytes(raw[-4:])
    if google_crc32c.value(body).to_bytes(4, "little") != stored:
        raise ValueError(f"shard {path.name}: index checksum mismatch")
    return np.frombuffer(body, dtype="<u8").reshape(n, 2), size - index_bytes


def _ranges(layout: ShardLayout, index: tuple[np.ndarray, int], first: int, lo: int, hi: int):
    """(file offset or None for fill, first row, row count) runs covering rows [lo, hi) of
    the shard starting at row ``first``; chunks that follow each other in the file merge."""
    table, data_end = index
    rb, cr = layout.row_bytes, layout.chunk_rows
    run = None
    for c in range((lo - first) // cr, -(-(hi - first) // cr)):
        c0 = first + c * cr
        a, b = max(lo, c0), min(hi, c0 + cr)
        offset, nbytes = (int(v) for v in table[c])
        if offset == _MISSING and nbytes == _MISSING:
            piece = (None, a, b - a)
        elif nbytes != cr * rb or offset + nbytes > data_end:
            raise ValueError(f"shard chunk {c}: {nbytes} bytes at {offset}, expected "
                             f"{cr * rb} bytes before byte {data_end}")
        else:
            piece = (offset + (a - c0) * rb, a, b - a)
        if run is not None and run[0] is not None and piece[0] is not None \
                and run[0] + run[2] * rb == piece[0]:
            run = (run[0], run[1], run[2] + piece[2])
            continue
        if run is not None:
            yield run
        run = piece
    if run is not None:
        yield run


def _pread_into(fd: int, buffer: memoryview | np.ndarray, offset: int, path: Path) -> None:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise ValueError(f"shard {path.name} ends at byte {offset + done}, "
                             f"{len(view) - done} bytes short")
        done += got
