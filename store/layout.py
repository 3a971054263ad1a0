"""The on-disk layout of a store: paths, attribute names, chunk and shard sizing, fingerprints.

Everything another program needs to write a store without our code is here and in
docs/store.md (format 2):

- the root is a Zarr v3 group with attribute ``repscope`` = ``{"format": 2}``;
- ``rows/`` is a group whose attribute ``repscope_rows`` records the rows every unit shares
  (count, fingerprint, digests of ids and token layout), with arrays ``rows/ids``,
  ``rows/example`` and ``rows/mask``;
- unit ``(model, layer)`` is the group ``units/<model>/<layer>``; its attribute
  ``repscope_unit`` names the current *version*, an immutable array
  ``units/<model>/<layer>/<version>`` of shape (rows, features), chunked along rows only,
  sharded, every chunk written and checksummed (CRC32C). A new ingest writes a new version
  and switches the name; readers resolve a version once and read only it.

Format 1 (read only): units were the arrays ``units/<model>/<layer>`` themselves, rows were
recorded in the root attribute.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np

FORMAT = 2  # what this version writes
READ_FORMATS = (1, 2)  # what it reads
ROOT_ATTR = "repscope"
ROWS_ATTR = "repscope_rows"
UNIT_ATTR = "repscope_unit"
UNITS = "units"
ROWS = "rows"
ROW_IDS = "rows/ids"
ROW_EXAMPLE = "rows/example"
ROW_MASK = "rows/mask"
# Model and layer names become folder and object names: file systems allow 255 bytes per
# name, and a margin keeps room for the temporary names writers use.
MAX_NAME_BYTES = 200
# A version replaced by a new ingest stays readable this long, so that jobs that pinned it
# (they resolve every unit once, at planning) normally finish; see docs/store.md.
SUPERSEDED_GRACE_S = 24 * 3600
# Fingerprint schemes (not the store format: fingerprints of format-1 units stay valid).
_HASH_VERSION = 1

STORAGE_DTYPES = ("float32", "float16")
DEFAULT_CHUNK_BYTES = 4 << 20
DEFAULT_SHARD_BYTES = 256 << 20


def unit_path(model: str, layer: str) -> str:
    """Path of a unit inside the store: its group (format 2) or its array (format 1)."""
    return f"{UNITS}/{model}/{layer}"


def version_path(model: str, layer: str, version: str) -> str:
    """Path of one version's array (format 2)."""
    return f"{UNITS}/{model}/{layer}/{version}"


_VERSION_NAME = re.compile(r"v\d{8}T\d{6}Z-[0-9a-f]{8}")


def is_version(name: str) -> bool:
    """True for names that :func:`new_version` makes (only those are ever removed)."""
    return _VERSION_NAME.fullmatch(name) is not None


def new_version(now: float) -> str:
    """A fresh version name: UTC time of creation (sortable) and random bits (unique)."""
    import secrets
    import time

    return time.strftime("v%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + secrets.token_hex(4)


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: ``layer2 < layer10``, ``m2 < m10``."""
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p), p) if p.isdigit() else (1, p.lower(), p) for p in parts)


def natural_sorted(names) -> list[str]:
    return sorted(names, key=natural_key)


def chunk_rows_for(features: int, itemsize: int, chunk_bytes: int, rows: int | None) -> int:
    """Rows per chunk: as many full-width rows as fit in ``chunk_bytes`` (at least one).

    When the row count is known and smaller, the chunk is the whole array: a chunk larger
    than the array would be padded with fill values in memory when a shard is encoded.
    """
    chunk_rows = max(1, chunk_bytes // max(1, features * itemsize))
    if rows is not None:
        chunk_rows = min(chunk_rows, max(1, rows))
    return chunk_rows


def shard_rows_for(
    features: int, itemsize: int, chunk_rows: int, shard_bytes: int, rows: int | None
) -> int:
    """Rows per shard: a multiple of ``chunk_rows`` near ``shard_bytes``, at least one chunk.

    For an array smaller than one shard the shard is the array rounded up to whole chunks.
    """
    chunk_nbytes = chunk_rows * max(1, features * itemsize)
    shard_rows = max(1, shard_bytes // chunk_nbytes) * chunk_rows
    if rows is not None:
        whole_chunks = -(-max(1, rows) // chunk_rows) * chunk_rows
        shard_rows = min(shard_rows, whole_chunks)
    return shard_rows


def check_sizes(chunk_bytes: Any, shard_bytes: Any) -> None:
    """Refuse non-positive or non-integer chunk/shard byte budgets."""
    from repscope.errors import InputError

    for name, value in (("chunk_bytes", chunk_bytes), ("shard_bytes", shard_bytes)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
            raise InputError(f"{name} must be a positive integer number of bytes, got {value!r}")


def _digest() -> Any:
    return hashlib.blake2b(digest_size=16)


def canonical_ids(ids: np.ndarray) -> bytes:
    """Bytes that identify an id array independently of its integer width or string dtype."""
    if ids.dtype.kind in "iu":
        return b"int\0" + np.ascontiguousarray(ids, dtype="<i8").tobytes()
    return b"str\0" + "\0".join(str(v) for v in ids.tolist()).encode("utf-8")


def row_fingerprint(
    n_rows: int,
    ids: np.ndarray | None = None,
    example: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> str:
    """Hex digest of the row set: row count, ids, row -> example map and padding mask.

    Two stores (or two ingests) with the same rows get the same fingerprint; without ids the
    fingerprint can only say "same number of rows (and same token layout)".
    """
    h = _digest()
    h.update(f"repscope-rows-v{_HASH_VERSION}\nn={int(n_rows)}\n".encode())
    for tag, arr in (("ids", ids), ("example", example), ("mask", mask)):
        if arr is None:
            continue
        h.update(f"{tag}:{arr.shape}\n".encode())
        if tag == "ids":
            h.update(canonical_ids(np.asarray(arr)))
        elif tag == "example":
            h.update(np.ascontiguousarray(arr, dtype="<i8").tobytes())
        else:
            h.update(np.packbits(np.asarray(arr, dtype=bool)).tobytes())
    return h.hexdigest()


def ids_digest(ids: np.ndarray, level: str) -> str:
    """Hex digest of row ids (independent of integer width or string dtype) and their level."""
    h = _digest()
    h.update(f"repscope-ids-v{_HASH_VERSION}\n{level}\n{ids.shape[0]}\n".encode())
    h.update(canonical_ids(np.asarray(ids)))
    return h.hexdigest()


def tokens_digest(example: np.ndarray, mask: np.ndarray | None) -> str:
    """Hex digest of a token layout: the row -> example map and the padding mask."""
    h = _digest()
    h.update(f"repscope-tokens-v{_HASH_VERSION}\n{example.shape}\n".encode())
    h.update(np.ascontiguousarray(example, dtype="<i8").tobytes())
    if mask is not None:
        h.update(f"mask:{mask.shape}\n".encode())
        h.update(np.packbits(np.asarray(mask, dtype=bool)).tobytes())
    return h.hexdigest()


class ContentHash:
    """Streaming hash of a unit's stored data, fed shard by shard in row order.

    The digest covers dtype, feature count and every stored byte, so two units with the same
    fingerprint hold bit-identical arrays.
    """

    def __init__(self, dtype: str, features: int) -> None:
        self._h = _digest()
        self._h.update(f"repscope-unit-v{_HASH_VERSION}\n{dtype}\n{features}\n".encode())
        self.rows = 0

    def update(self, block: np.ndarray) -> None:
        """Add a (rows, features) block in storage dtype."""
        self._h.update(np.ascontiguousarray(block).data)
        self.rows += block.shape[0]

    def hexdigest(self) -> str:
        h = self._h.copy()
        h.update(f"\nrows={self.rows}".encode())
        return h.hexdigest()


def format_bytes(nbytes: int) -> str:
    """A size for people: "512 B", "3.5 MiB", "37.3 GiB"."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
