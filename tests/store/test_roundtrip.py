"""Round trips on every backend, S3 bit-identical to local, listing, pickling, row identity."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest

from repscope.errors import InputError, NotFoundError
from repscope.store import ActivationStore, UnitInfo, ingest_array


def _acts(rows: int, features: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, features)).astype(np.float32)


def test_round_trip_every_backend(backend):
    store = backend.create()
    x = _acts(300, 12)
    # Small chunks and shards so the unit spans several shards and a partial last one.
    info = ingest_array(store, "m1", "layer1", x, chunk_bytes=12 * 4 * 16, shard_bytes=12 * 4 * 64)
    assert info == UnitInfo(
        model="m1",
        layer="layer1",
        rows=300,
        features=12,
        dtype="float32",
        source_dtype="float32",
        chunk_rows=16,
        shard_rows=64,
        nbytes=300 * 12 * 4,
        fingerprint=info.fingerprint,
        version=info.version,
    )
    reopened = ActivationStore.open(
        backend.url(store.url.rsplit("/", 1)[1]), backend.storage_options
    )
    assert reopened.units() == [("m1", "layer1")]
    assert reopened.n_rows == 300
    np.testing.assert_array_equal(reopened.read("m1", "layer1"), x)
    np.testing.assert_array_equal(reopened.read("m1", "layer1", 50, 130), x[50:130])
    assert reopened.unit_info("m1", "layer1") == info


def test_s3_bit_identical_to_local(s3_server, tmp_path):
    rng = np.random.default_rng(7)
    arrays = {
        "layer1": rng.standard_normal((257, 9)),  # float64 -> float32
        "layer2": rng.standard_normal((257, 5)).astype(np.float16),
        "layer10": rng.integers(-1000, 1000, (257, 3)),
    }
    local = ActivationStore.create(str(tmp_path / "local"))
    remote = ActivationStore.create(s3_server.url(), s3_server.storage_options)
    for store in (local, remote):
        for layer, x in arrays.items():
            ingest_array(
                store, "m", layer, x, row_ids=np.arange(257) * 3, chunk_bytes=256, shard_bytes=1024
            )
    remote = ActivationStore.open(remote.url, s3_server.storage_options)
    assert remote.units() == local.units() == [("m", "layer1"), ("m", "layer2"), ("m", "layer10")]
    for _, layer in local.units():
        a, b = local.read("m", layer), remote.read("m", layer)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
        # Same everything but the version name (random per ingest).
        a_info, b_info = local.unit_info("m", layer), remote.unit_info("m", layer)
        assert replace(a_info, version="") == replace(b_info, version="")
    assert local.row_fingerprint == remote.row_fingerprint
    np.testing.assert_array_equal(remote.row_ids(), np.arange(257) * 3)


def test_natural_order_of_models_layers_and_units(store):
    x = _acts(4, 2)
    for model in ("m10", "m2"):
        for layer in ("layer10", "layer2", "layer1"):
            ingest_array(store, model, layer, x)
    assert store.models() == ["m2", "m10"]
    assert store.layers("m10") == ["layer1", "layer2", "layer10"]
    assert store.units()[:3] == [("m2", "layer1"), ("m2", "layer2"), ("m2", "layer10")]
    assert len(store.units()) == 6


def test_unknown_model_and_layer_name_close_matches(store):
    ingest_array(store, "resnet18", "layer2", _acts(4, 2))
    with pytest.raises(NotFoundError, match=r"model 'resnet19' not in store .*'resnet18'"):
        store.layers("resnet19")
    with pytest.raises(NotFoundError, match=r"layer 'layer3' of model 'resnet18' not found"):
        store.read("resnet18", "layer3")
    with pytest.raises(InputError, match=r"rows 2:9 out of range 0:4"):
        store.read("resnet18", "layer2", 2, 9)


def test_open_missing_store_is_not_found(tmp_path):
    with pytest.raises(NotFoundError, match=r"no store at .*nothing-here"):
        ActivationStore.open(str(tmp_path / "nothing-here"))
    with pytest.raises(NotFoundError, match=r"no store at memory://"):
        ActivationStore.open("memory://repscope-tests/never-created")


def test_create_opens_existing_and_file_urls_work(tmp_path):
    first = ActivationStore.create(f"file://{tmp_path}/st")
    ingest_array(first, "m", "l", _acts(3, 2))
    again = ActivationStore.create(str(tmp_path / "st"))
    assert again.units() == [("m", "l")]


def test_not_a_repscope_store(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "other"), mode="w").create_group("something")
    with pytest.raises(InputError, match="not a repscope store"):
        ActivationStore.open(str(tmp_path / "other"))
    with pytest.raises(InputError, match="not a repscope store"):
        ActivationStore.create(str(tmp_path / "other"))


def test_pickles_as_url_and_reconnects(local):
    store = local.create()
    ingest_array(store, "m", "l", _acts(5, 3))
    store.read("m", "l")  # populate caches that must not travel
    blob = pickle.dumps(store)
    assert len(blob) < 500
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone.read("m", "l"), store.read("m", "l"))


def test_row_fingerprint_same_rows_same_digest(local, memory):
    ids = np.array([f"img{i}" for i in range(6)])
    a, b, c = local.create(), memory.create(), memory.create()
    assert a.n_rows is None and a.row_fingerprint is None
    ingest_array(a, "m", "l", _acts(6, 2), row_ids=ids)
    ingest_array(b, "other", "x", _acts(6, 4), row_ids=ids)
    ingest_array(c, "other", "x", _acts(6, 4), row_ids=ids[::-1])
    assert a.row_fingerprint == b.row_fingerprint != c.row_fingerprint
    assert list(a.row_ids()) == list(ids)


def test_second_unit_must_match_row_ids(store):
    ingest_array(store, "m", "a", _acts(3, 2), row_ids=[10, 11, 12])
    ingest_array(store, "m", "b", _acts(3, 2), row_ids=np.array([10, 11, 12], np.int32))
    ingest_array(store, "m", "c", _acts(3, 2))  # no ids: rows taken as the store's
    with pytest.raises(
        InputError,
        match=r"model 'm', layer 'd': row_ids differ from the store's "
        r"\(first difference at index 1: stored '11', given '13'\)",
    ):
        ingest_array(store, "m", "d", _acts(3, 2), row_ids=[10, 13, 12])
    with pytest.raises(InputError, match=r"row_ids are not unique: 4 appears 2 times"):
        ingest_array(store, "m", "e", _acts(3, 2), row_ids=[4, 4, 5])


def test_content_fingerprint_tracks_data(store):
    x = _acts(10, 3)
    a = ingest_array(store, "m", "a", x)
    b = ingest_array(store, "m", "b", x.astype(np.float64))
    c = ingest_array(store, "m", "c", x + 1)
    assert a.fingerprint == b.fingerprint != c.fingerprint
