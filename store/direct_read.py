"""Rows of a unit read straight from its shards, every chunk's presence and checksum checked.

A unit that repscope writes is uncompressed and sharded along rows, and every inner chunk
spans all features, so rows ``a:b`` of a chunk are one contiguous byte range of its shard.
Reading those ranges into the output array costs one copy, where Zarr's per-chunk pipeline
costs several plus an event loop; on a 2-core machine that CPU comes out of the GEMMs the
reads overlap with (docs/performance.md). Local shards are read with ``preadv`` from their
files (:func:`read_rows`), remote ones with byte-range requests through the zarr store
(:func:`read_rows_remote`). Both check the same things, which Zarr itself does not: a
missing shard or chunk of a dense unit (format 2: every chunk is written) is an error, not
fill values.

The byte layout is the Zarr v3 sharding spec's: the shard holds the inner chunks (format 2:
each followed by the CRC32C of its bytes, little endian) and, at its end, the index (one
little-endian uint64 (offset, nbytes) pair per chunk, all ones for a chunk not written)
followed by its CRC32C. Anything else (compression, big-endian bytes, chunks narrower than
a row) is not recognised here and reads through Zarr.

Errors: :class:`ShardError` (a ValueError) names the shard, its rows and what is wrong; the
caller adds the store and unit. File-system failures stay OSErrors.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

_MISSING = 2**64 - 1
_CRC = 4  # bytes of a CRC32C
_MAX_IOV = 512  # iovecs per preadv (the system limit is 1024)
# Bytes per system call: small enough that a chunk is still in the CPU cache when its
# checksum is computed (docs/store.md has the measurements).
_READ_BYTES = 4 << 20


class ShardError(ValueError):
    """A shard (or one of its chunks) is missing or damaged."""

    def __init__(self, shard: int, rows: tuple[int, int], problem: str,
                 missing: bool = False) -> None:
        super().__init__(f"shard {shard} (rows {rows[0]}:{rows[1]}): {problem}")
        self.shard, self.rows, self.problem, self.missing = shard, rows, problem, missing


@dataclass(frozen=True)
class ShardLayout:
    """Where and how a unit's rows lie in its shards."""

    shard_key: Callable[[int], str]  # shard number -> key relative to the array
    directory: Path | None  # the array's folder for local files, else None
    rows: int
    features: int
    dtype: np.dtype
    shard_rows: int
    chunk_rows: int
    fill_value: Any
    checksums: bool  # every chunk is followed by its CRC32C
    dense: bool  # every chunk must be present (a missing one is an error, not fill)

    @property
    def row_bytes(self) -> int:
        return self.features * self.dtype.itemsize

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def chunk_bytes(self) -> int:
        """Encoded size of one chunk: a whole chunk of rows, plus its checksum."""
        return self.chunk_rows * self.row_bytes + (_CRC if self.checksums else 0)

    @property
    def index_bytes(self) -> int:
        return 16 * self.chunks_per_shard + _CRC

    def shard_rows_of(self, shard: int) -> tuple[int, int]:
        first = shard * self.shard_rows
        return first, min(self.rows, first + self.shard_rows)


def shard_layout(array: Any, *, dense: bool) -> ShardLayout | None:
    """The layout of a zarr array this module can read, else None (read it through Zarr).

    ``dense``: every chunk was written (format 2 units), so a missing one is an error.
    """
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
    from zarr.codecs.sharding import ShardingCodecIndexLocation
    from zarr.storage import LocalStore

    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3 or len(array.shape) != 2:
        return None
    if len(meta.codecs) != 1 or meta.storage_transformers:
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

    inner, index = sharding.codecs, sharding.index_codecs
    checksums = len(inner) == 2 and isinstance(inner[1], Crc32cCodec)
    if not (
        little
        and sharding.index_location == ShardingCodecIndexLocation.end
        and (len(inner) == 1 or checksums) and little_bytes(inner[0])
        and len(index) == 2 and little_bytes(index[0]) and isinstance(index[1], Crc32cCodec)
    ):
        return None
    rows, features = (int(s) for s in array.shape)
    shard_rows, shard_cols = (int(s) for s in array.shards)
    chunk_rows, chunk_cols = (int(s) for s in sharding.chunk_shape)
    if shard_cols != features or chunk_cols != features or shard_rows % chunk_rows:
        return None
    local = isinstance(array.store, LocalStore)
    return ShardLayout(
        shard_key=lambda i, encode=meta.encode_chunk_key: encode((i, 0)),
        directory=Path(array.store.root) / array.path if local else None,
        rows=rows,
        features=features,
        dtype=dtype.newbyteorder("<"),
        shard_rows=shard_rows,
        chunk_rows=chunk_rows,
        fill_value=meta.fill_value,
        checksums=checksums,
        dense=dense,
    )


# -- what to read -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """Rows [row, row + count) of the output, from chunk ``chunk`` of a shard.

    ``offset`` is the chunk's byte offset in the shard (None: not written, fill value);
    ``skip`` the rows of the chunk before ``row``; ``whole`` True when the piece is the full
    chunk, so it can be read straight into the output.
    """

    chunk: int
    offset: int | None
    row: int
    count: int
    skip: int
    whole: bool


def _parse_index(layout: ShardLayout, shard: int, raw: bytes) -> np.ndarray:
    """The shard's (chunks, 2) offsets and sizes from its last bytes, checksum verified."""
    rows = layout.shard_rows_of(shard)
    if len(raw) < layout.index_bytes:
        raise ShardError(shard, rows, f"{len(raw)} bytes, shorter than its index (truncated)")
    body, stored = raw[:-_CRC], raw[-_CRC:]
    if google_crc32c.value(body).to_bytes(4, "little") != stored:
        raise ShardError(shard, rows, "index checksum mismatch (damaged or truncated)")
    return np.frombuffer(body, dtype="<u8").reshape(layout.chunks_per_shard, 2)


def _pieces(layout: ShardLayout, shard: int, table: np.ndarray, data_end: int, lo: int,
            hi: int) -> Iterator[_Piece]:
    """The pieces covering rows [lo, hi) of ``shard``, each chunk's index entry checked."""
    first = shard * layout.shard_rows
    cr = layout.chunk_rows
    for c in range((lo - first) // cr, -(-(hi - first) // cr)):
        c0 = first + c * cr
        a, b = max(lo, c0), min(hi, c0 + cr)
        offset, nbytes = (int(v) for v in table[c])
        chunk_rows = (c0, min(layout.rows, c0 + cr))
        if offset == _MISSING and nbytes == _MISSING:
            if layout.dense:
                raise ShardError(shard, layout.shard_rows_of(shard),
                                 f"chunk {c} (rows {chunk_rows[0]}:{chunk_rows[1]}) is missing",
                                 missing=True)
            yield _Piece(c, None, a, b - a, a - c0, False)
            continue
        if nbytes != layout.chunk_bytes or offset + nbytes > data_end:
            raise ShardError(
                shard, layout.shard_rows_of(shard),
                f"chunk {c} (rows {chunk_rows[0]}:{chunk_rows[1]}): {nbytes} bytes at "
                f"{offset}, expected {layout.chunk_bytes} bytes before byte {data_end}")
        yield _Piece(c, offset, a, b - a, a - c0, a == c0 and b - a == cr)


def _check_crc(layout: ShardLayout, shard: int, piece: _Piece, data: np.ndarray,
               stored: bytes) -> None:
    view = data.view()
    view.setflags(write=False)  # google_crc32c takes read-only buffers only
    if google_crc32c.value(view).to_bytes(4, "little") != bytes(stored):
        c0 = shard * layout.shard_rows + piece.chunk * layout.chunk_rows
        raise ShardError(
            shard, layout.shard_rows_of(shard),
            f"chunk {piece.chunk} (rows {c0}:{min(layout.rows, c0 + layout.chunk_rows)}) "
            "checksum mismatch (damaged data)")


def _shards(layout: ShardLayout, start: int, stop: int) -> range:
    return range(start // layout.shard_rows, -(-stop // layout.shard_rows))


# -- local files ------------------------------------------------------------------------


def read_rows(layout: ShardLayout, start: int, stop: int,
              out: np.ndarray | None = None) -> np.ndarray:
    """Rows [start, stop) of a local unit as a (stop - start, features) array: a new one, or
    ``out`` (C-contiguous, that shape and the unit's dtype) filled and returned.

    Raises :class:`ShardError` for a missing or damaged shard or chunk, OSError for the file
    system's own failures.
    """
    shape = (stop - start, layout.features)
    if out is None:
        out = np.empty(shape, dtype=layout.dtype)
    elif out.shape != shape or out.dtype != layout.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {shape} {layout.dtype} array, got "
                         f"{out.shape} {out.dtype}")
    flat = out.reshape(-1).view(np.uint8)
    rb = layout.row_bytes
    for shard in _shards(layout, start, stop):
        first, end = layout.shard_rows_of(shard)
        lo, hi = max(start, first), min(stop, end)
        path = layout.directory / layout.shard_key(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if layout.dense:
                raise ShardError(shard, (first, end), "shard file is missing",
                                 missing=True) from None
            out[lo - start: hi - start] = layout.fill_value
            continue
        try:
            size = os.fstat(fd).st_size
            raw = _pread(fd, min(size, layout.index_bytes), max(0, size - layout.index_bytes),
                         shard, layout)
            table = _parse_index(layout, shard, raw)
            pieces = list(_pieces(layout, shard, table, size - layout.index_bytes, lo, hi))
            _read_local(fd, layout, shard, pieces, out, flat, start, rb)
        finally:
            os.close(fd)
    return out


def _read_local(fd: int, layout: ShardLayout, shard: int, pieces: list[_Piece], out: np.ndarray,
                flat: np.ndarray, start: int, rb: int) -> None:
    """Read ``pieces`` of one shard: runs of adjacent chunks in one ``preadv`` each."""
    i = 0
    while i < len(pieces):
        p = pieces[i]
        if p.offset is None:
            out[p.row - start: p.row - start + p.count] = layout.fill_value
            i += 1
        elif not layout.checksums:
            # No checksums: the rows wanted are one byte range, whatever the chunk bounds.
            j, length = i + 1, p.count * rb
            while (j < len(pieces) and pieces[j].offset is not None and length < _READ_BYTES
                   and pieces[j].offset == p.offset + p.skip * rb + length - pieces[j].skip * rb):
                length += pieces[j].count * rb
                j += 1
            dst = flat[(p.row - start) * rb: (p.row - start) * rb + length]
            _preadv(fd, [dst], p.offset + p.skip * rb, shard, layout)
            i = j
        elif not p.whole:
            # Part of a chunk: the checksum covers the whole chunk, so read it all.
            chunk = np.empty(layout.chunk_bytes, dtype=np.uint8)
            _preadv(fd, [chunk], p.offset, shard, layout)
            data = chunk[:-_CRC]
            _check_crc(layout, shard, p, data, chunk[-_CRC:].tobytes())
            flat[(p.row - start) * rb: (p.row - start + p.count) * rb] = \
                data[p.skip * rb: (p.skip + p.count) * rb]
            i += 1
        else:
            # Whole chunks that follow each other in the file: scatter each chunk's rows into
            # the output and its checksum into a small buffer, in one system call.
            j = i + 1
            while (j < len(pieces) and j - i < _MAX_IOV // 2 and pieces[j].whole
                   and (j - i + 1) * layout.chunk_bytes <= _READ_BYTES
                   and pieces[j].offset == pieces[j - 1].offset + layout.chunk_bytes):
                j += 1
            crcs = np.empty((j - i, _CRC), dtype=np.uint8)
            buffers = []
            for k in range(i, j):
                q = pieces[k]
                buffers += [flat[(q.row - start) * rb: (q.row - start + q.count) * rb],
                            crcs[k - i]]
            _preadv(fd, buffers, p.offset, shard, layout)
            for k in range(i, j):
                q = pieces[k]
                data = flat[(q.row - start) * rb: (q.row - start + q.count) * rb]
                _check_crc(layout, shard, q, data, crcs[k - i].tobytes())
            i = j


def _pread(fd: int, size: int, offset: int, shard: int, layout: ShardLayout) -> bytes:
    buf = np.empty(size, dtype=np.uint8)
    _preadv(fd, [buf], offset, shard, layout)
    return buf.tobytes()


def _preadv(fd: int, buffers: list[np.ndarray], offset: int, shard: int,
            layout: ShardLayout) -> None:
    """Fill ``buffers`` from ``offset`` on; a file that ends early is a ShardError."""
    views = [memoryview(b).cast("B") for b in buffers if b.size]
    total = sum(len(v) for v in views)
    done = 0
    while done < total:
        got = os.preadv(fd, views, offset + done)
        if got == 0:
            raise ShardError(shard, layout.shard_rows_of(shard),
                             f"file ends at byte {offset + done}, {total - done} bytes short "
                             "(truncated)")
        done += got
        while views and got >= len(views[0]):
            got -= len(views[0])
            views.pop(0)
        if got:
            views[0] = views[0][got:]


# -- remote objects ---------------------------------------------------------------------


def read_rows_remote(layout: ShardLayout, zstore: Any, array_path: str, start: int,
                     stop: int, concurrency: int = 16) -> np.ndarray:
    """Rows [start, stop) of a unit in any zarr store, by byte-range requests.

    One request for each shard's index, then one per chunk, at most ``concurrency`` at a
    time. Raises :class:`ShardError` as :func:`read_rows` does; backend failures propagate.
    """
    from zarr.core.sync import sync

    return sync(_read_remote(layout, zstore, array_path, start, stop, concurrency))


async def _read_remote(layout: ShardLayout, zstore: Any, array_path: str, start: int,
                       stop: int, concurrency: int) -> np.ndarray:
    from zarr.abc.store import RangeByteRequest, SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype

    proto = default_buffer_prototype()
    out = np.empty((stop - start, layout.features), dtype=layout.dtype)
    flat = out.reshape(-1).view(np.uint8)
    rb = layout.row_bytes
    gate = asyncio.Semaphore(concurrency)

    def key(shard: int) -> str:
        return f"{array_path}/{layout.shard_key(shard)}"

    async def index(shard: int) -> list[_Piece] | None:
        async with gate:
            raw = await zstore.get(key(shard), proto, SuffixByteRequest(layout.index_bytes))
        if raw is None:
            return None
        first, end = layout.shard_rows_of(shard)
        table = _parse_index(layout, shard, raw.to_bytes())
        # The object's size is not known without another request: a chunk past its end
        # comes back short, which chunk() reports as truncation.
        return list(_pieces(layout, shard, table, _MISSING, max(start, first), min(stop, end)))

    async def chunk(shard: int, p: _Piece) -> None:
        dst = flat[(p.row - start) * rb: (p.row - start + p.count) * rb]
        if p.offset is None:
            out[p.row - start: p.row - start + p.count] = layout.fill_value
            return
        async with gate:
            buf = await zstore.get(key(shard), proto,
                                   RangeByteRequest(p.offset, p.offset + layout.chunk_bytes))
        if buf is None:
            raise ShardError(shard, layout.shard_rows_of(shard), "shard object is missing",
                             missing=True)
        data = buf.as_numpy_array().view(np.uint8).reshape(-1)
        if data.size != layout.chunk_bytes:
            raise ShardError(shard, layout.shard_rows_of(shard),
                             f"chunk {p.chunk}: {data.size} bytes read, expected "
                             f"{layout.chunk_bytes} (truncated)")
        if layout.checksums:
            _check_crc(layout, shard, p, data[:-_CRC], data[-_CRC:].tobytes())
        dst[:] = data[p.skip * rb: (p.skip + p.count) * rb]

    shards = list(_shards(layout, start, stop))
    found = await asyncio.gather(*(index(s) for s in shards))
    pieces = []
    for shard, entry in zip(shards, found, strict=True):
        first, end = layout.shard_rows_of(shard)
        if entry is None:
            if layout.dense:
                raise ShardError(shard, (first, end), "shard object is missing", missing=True)
            out[max(start, first) - start: min(stop, end) - start] = layout.fill_value
            continue
        pieces += [(shard, p) for p in entry]
    await asyncio.gather(*(chunk(shard, p) for shard, p in pieces))
    return out
