"""Every chunk of a complete unit is present and intact, or a read fails naming the store,
unit, version, shard and rows, with an IntegrityError (not an OSError: never retried)."""

from __future__ import annotations

import google_crc32c
import numpy as np
import pytest

from repscope.errors import IntegrityError
from repscope.store import ActivationStore, ingest_array

ROWS, FEATURES, CHUNK_ROWS = 1000, 7, 37
SHARD_ROWS = 5 * CHUNK_ROWS  # 185: shards of rows 0:185, 185:370, ..., 925:1000


def _unit(backend, data=None) -> tuple[ActivationStore, np.ndarray]:
    store = backend.create()
    data = np.random.default_rng(0).standard_normal((ROWS, FEATURES)) if data is None else data
    ingest_array(store, "m", "l", data, chunk_bytes=CHUNK_ROWS * FEATURES * 4,
                 shard_bytes=SHARD_ROWS * FEATURES * 4)
    return ActivationStore.open(store.url, backend.storage_options), data.astype(np.float32)


def _shard_key(store: ActivationStore, shard: int) -> str:
    opened = store._open("m", "l", None)
    return f"{opened.entry.path}/{opened.direct.shard_key(shard)}"


def _rewrite(store: ActivationStore, shard: int, change) -> None:
    keys = store.catalog.keys
    key = _shard_key(store, shard)
    keys.put(key, bytes(change(bytearray(keys.get(key)))))


def _where(store: ActivationStore, shard: int) -> str:
    version = store.unit_info("m", "l").version
    rows = f"{shard * SHARD_ROWS}:{min(ROWS, (shard + 1) * SHARD_ROWS)}"
    return (rf"in store {store.url}, model 'm', layer 'l' \(version {version}\), shard {shard} "
            rf"\(rows {rows}\)")


def test_a_deleted_shard_is_missing_data_not_zeros(backend):
    store, data = _unit(backend)
    store.catalog.keys.delete(_shard_key(store, 3))
    with pytest.raises(IntegrityError, match=rf"^missing data {_where(store, 3)}: shard "
                                             r"(file|object) is missing$") as info:
        store.read("m", "l", 500, 600)
    assert not isinstance(info.value, OSError) and info.value.exit_code == 1
    np.testing.assert_array_equal(store.read("m", "l", 0, 555), data[:555])  # others intact


def test_a_truncated_shard_is_named_with_its_own_rows(backend):
    store, data = _unit(backend)
    _rewrite(store, 2, lambda raw: raw[: len(raw) // 2])
    with pytest.raises(IntegrityError, match=rf"^corrupt data {_where(store, 2)}: "):
        store.read("m", "l", 0, ROWS)
    np.testing.assert_array_equal(store.read("m", "l", 555, ROWS), data[555:])


@pytest.mark.parametrize("rows", [(0, ROWS), (40, 60), (37, 74)])
def test_a_flipped_bit_in_a_chunk_is_found(backend, rows):
    store, _ = _unit(backend)
    # Chunk 1 of shard 0 (rows 37:74): the chunks come first in the shard, each with its CRC.
    offset = (CHUNK_ROWS * FEATURES * 4 + 4) + 100

    def flip(raw: bytearray) -> bytearray:
        raw[offset] ^= 0x04
        return raw

    _rewrite(store, 0, flip)
    with pytest.raises(IntegrityError, match=rf"^corrupt data {_where(store, 0)}: chunk 1 "
                                             r"\(rows 37:74\) checksum mismatch"):
        store.read("m", "l", *rows)


def test_a_chunk_the_index_calls_missing_is_an_error(local):
    store, _ = _unit(local)
    n = SHARD_ROWS // CHUNK_ROWS

    def drop_chunk_2(raw: bytearray) -> bytearray:
        index = np.frombuffer(bytes(raw[-(16 * n + 4):-4]), "<u8").copy().reshape(n, 2)
        index[2] = 2**64 - 1  # "never written": Zarr would read fill values
        body = index.tobytes()
        raw[-(16 * n + 4):] = body + google_crc32c.value(body).to_bytes(4, "little")
        return raw

    _rewrite(store, 1, drop_chunk_2)
    with pytest.raises(IntegrityError, match=rf"{_where(store, 1)}: chunk 2 \(rows 259:296\) "
                                             "is missing"):
        store.read("m", "l", 200, 300)


def test_all_zero_units_are_data_every_chunk_stored(backend):
    # A dead ReLU layer: all zeros. Zarr skips writing chunks equal to the fill value unless
    # told otherwise; then a deleted shard would read back as the same zeros.
    store, data = _unit(backend, np.zeros((ROWS, FEATURES)))
    keys = store.catalog.keys
    assert all(keys.get(_shard_key(store, s)) is not None for s in range(6))
    np.testing.assert_array_equal(store.read("m", "l"), data)
    keys.delete(_shard_key(store, 5))
    with pytest.raises(IntegrityError, match=rf"missing data {_where(store, 5)}"):
        store.read("m", "l")
