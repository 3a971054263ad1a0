"""A unit is visible only when complete: interrupted ingests, streaming writers, overwrite."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

from repscope.errors import InputError, NotFoundError
from repscope.store import ActivationStore, UnclosedWriterWarning, UnitWriter, ingest_array

CHUNK, SHARD = 4 * 4 * 8, 4 * 4 * 32  # 4 float32 features: 8-row chunks, 32-row shards


class Exploding:
    """A lazy (rows, features) array whose reads fail past ``fail_at`` rows, like a dying disk."""

    def __init__(self, data: np.ndarray, fail_at: int) -> None:
        self.data, self.fail_at = data, fail_at
        self.shape, self.dtype = data.shape, data.dtype

    def __getitem__(self, key: slice) -> np.ndarray:
        if key.stop > self.fail_at:
            raise RuntimeError("simulated crash while reading the source")
        return self.data[key]


def _acts(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)


def test_interrupted_ingest_leaves_nothing_visible_and_rerun_works(backend, monkeypatch):
    import repscope.store.ingest

    monkeypatch.setattr(repscope.store.ingest, "_BLOCK_BYTES", SHARD)  # read one shard per block
    st = backend.create()
    ingest_array(st, "m", "done", _acts(200))
    x = _acts(200, seed=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest_array(st, "m", "l", Exploding(x, fail_at=150), chunk_bytes=CHUNK, shard_bytes=SHARD)
    reader = ActivationStore.open(st.url, backend.storage_options)
    assert reader.units() == [("m", "done")]
    with pytest.raises(NotFoundError, match="layer 'l' of model 'm' not found"):
        reader.read("m", "l")
    info = ingest_array(st, "m", "l", x, chunk_bytes=CHUNK, shard_bytes=SHARD)
    assert (info.rows, info.shard_rows) == (200, 32)
    np.testing.assert_array_equal(reader.read("m", "l"), x)


def test_leftover_incomplete_unit_is_invisible_and_replaced(store):
    # A writer dropped without close or abort: shards written, never published. It warns.
    w = UnitWriter(store, "m", "l", chunk_bytes=CHUNK, shard_bytes=SHARD)
    w.append(_acts(100))
    with pytest.warns(UnclosedWriterWarning, match=r"model 'm', layer 'l' was garbage-collected"):
        del w
        gc.collect()
    assert store.units() == []
    with pytest.raises(NotFoundError, match=r"model 'm' not in store"):
        store.read("m", "l")
    ingest_array(store, "m", "other", _acts(64))
    with pytest.raises(NotFoundError, match=r"layer 'l' of model 'm' is incomplete"):
        store.read("m", "l")
    ingest_array(store, "m", "l", _acts(64, seed=3))  # no overwrite needed for a leftover
    np.testing.assert_array_equal(store.read("m", "l"), _acts(64, seed=3))


def test_writer_context_manager_discards_on_exception(store):
    with pytest.raises(KeyError):
        with UnitWriter(store, "m", "l", chunk_bytes=CHUNK, shard_bytes=SHARD) as w:
            for i in range(5):
                w.append(_acts(20, seed=i))
            raise KeyError("training loop failed")
    assert store.units() == []
    assert store.catalog.entry("m", "l", fresh=True) == "absent"


def test_streaming_writer_equals_batch_ingest(store):
    batches = [_acts(n, seed=n) for n in (1, 7, 32, 33, 64, 5)]
    with UnitWriter(store, "m", "stream", chunk_bytes=CHUNK, shard_bytes=SHARD) as w:
        for b in batches:
            w.append(b)
            assert store.units() == []  # nothing visible before close
    x = np.concatenate(batches)
    batch = ingest_array(store, "m", "batch", x, chunk_bytes=CHUNK, shard_bytes=SHARD)
    stream = store.unit_info("m", "stream")
    np.testing.assert_array_equal(store.read("m", "stream"), x)
    assert stream.fingerprint == batch.fingerprint
    assert stream.rows == 142 and stream.shard_rows == 32


def test_small_streamed_unit_gets_one_right_sized_shard(store):
    w = UnitWriter(store, "m", "l")
    w.append(np.ones((3, 5)))
    info = w.close()
    assert (info.rows, info.chunk_rows, info.shard_rows, info.source_dtype) == (3, 3, 3, "float64")


def test_streaming_writer_row_count_must_match_store(store):
    ingest_array(store, "m", "a", _acts(40))
    w = UnitWriter(store, "m", "b", chunk_bytes=CHUNK, shard_bytes=SHARD)
    w.append(_acts(30))
    with pytest.raises(InputError, match=r"layer 'b': 30 rows, but the store's units have 40"):
        w.close()
    w = UnitWriter(store, "m", "c", chunk_bytes=CHUNK, shard_bytes=SHARD)
    w.append(_acts(30))
    with pytest.raises(
        InputError, match=r"layer 'c': 50 rows appended, but the store's units have 40"
    ):
        w.append(_acts(20))
    assert store.units() == [("m", "a")]


def test_nan_in_a_later_shard_removes_the_staging_unit(local):
    st = local.create()
    x = _acts(200)
    x[170, 2] = np.nan
    with pytest.raises(InputError, match=r"model 'm', layer 'l': NaN at row 170, column 2"):
        ingest_array(st, "m", "l", x, chunk_bytes=CHUNK, shard_bytes=SHARD)
    assert st.units() == []
    assert not Path(st.url, "units", "m", "l").exists()


def test_existing_unit_needs_overwrite(store):
    ingest_array(store, "m", "l", _acts(10))
    with pytest.raises(InputError, match=r"model 'm', layer 'l': unit already exists .*overwrite"):
        ingest_array(store, "m", "l", _acts(10, seed=1))
    with pytest.raises(InputError, match=r"unit already exists"):
        UnitWriter(store, "m", "l")
    info = ingest_array(store, "m", "l", _acts(10, seed=1), dtype="float16", overwrite=True)
    assert info.dtype == "float16"
    np.testing.assert_array_equal(store.read("m", "l"), _acts(10, seed=1).astype(np.float16))


def test_overwriting_the_only_unit_may_change_rows(store):
    ingest_array(store, "m", "l", _acts(10))
    ingest_array(store, "m", "l", _acts(12), overwrite=True)
    assert store.n_rows == 12


def test_streaming_writer_with_row_ids_and_expected_rows(store):
    with UnitWriter(store, "m", "a", row_ids=["x", "y", "z"]) as w:
        w.append(_acts(2))
        w.append(_acts(1))
    assert list(store.row_ids()) == ["x", "y", "z"] and store.n_rows == 3
    w = UnitWriter(store, "m", "b", rows=3)
    w.append(_acts(2))
    with pytest.raises(InputError, match=r"layer 'b': 2 rows written, but 3 expected"):
        w.close()
    assert store.units() == [("m", "a")]
