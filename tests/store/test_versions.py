"""Immutable unit versions: a reader that pinned a version reads exactly it while the unit is
ingested again; old versions are kept for a grace period, then removed; format-1 stores
are read (not written) and copied to format 2 by the upgrade tool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from repscope.errors import InputError, UnitChangedError
from repscope.store import ActivationStore, ingest_array, layout, open_store
from repscope.store.rows import RowSet
from repscope.store.upgrade import upgrade

REPSCOPE = str(Path(sys.executable).with_name("repscope"))


def _acts(rows: int, seed: int, features: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, features)).astype(np.float32)


def test_a_pinned_version_survives_an_overwrite(backend):
    store = backend.create()
    old, new = _acts(300, 0), _acts(300, 1)
    ingest_array(store, "m", "l", old, chunk_bytes=6 * 4 * 10, shard_bytes=6 * 4 * 50)
    reader = open_store(store.url, storage_options=backend.storage_options)
    pinned = reader.unit_info("m", "l")
    first = reader.read("m", "l", 0, 100, version=pinned.version)

    info = ingest_array(store, "m", "l", new, overwrite=True)
    assert info.version != pinned.version and info.fingerprint != pinned.fingerprint
    # The job that pinned the old version reads the rest of it, from any process.
    later = open_store(store.url, storage_options=backend.storage_options)
    rest = later.read("m", "l", 100, 300, version=pinned.version)
    np.testing.assert_array_equal(np.concatenate([first, rest]), old)
    assert later.unit_info("m", "l", version=pinned.version) == pinned
    # A new reader without a version gets the new data; the old reader keeps what it
    # resolved until refresh().
    np.testing.assert_array_equal(later.read("m", "l"), new)
    np.testing.assert_array_equal(reader.read("m", "l"), old)
    reader.refresh()
    np.testing.assert_array_equal(reader.read("m", "l"), new)


def test_a_removed_version_is_a_one_line_error_naming_it(store):
    ingest_array(store, "m", "l", _acts(20, 0))
    pinned = store.unit_info("m", "l").version
    ingest_array(store, "m", "l", _acts(20, 1), overwrite=True)
    assert store.prune() == 0  # within the grace period: kept for running jobs
    np.testing.assert_array_equal(store.read("m", "l", version=pinned), _acts(20, 0))
    assert store.prune(grace_s=0) == 1
    reader = ActivationStore.open(store.url)
    with pytest.raises(UnitChangedError, match=rf"^model 'm', layer 'l': version {pinned} is no "
                                               r"longer in store .*; run the job again"):
        reader.read("m", "l", version=pinned)
    with pytest.raises(UnitChangedError, match="is no longer in store"):
        reader.read("m", "l", version="v20000101T000000Z-deadbeef")
    assert not isinstance(UnitChangedError("x"), OSError)


def test_a_version_removed_while_it_is_read_is_gone_not_corrupt(local):
    store = local.create()
    ingest_array(store, "m", "l", _acts(300, 0), chunk_bytes=6 * 4 * 10, shard_bytes=6 * 4 * 50)
    pinned = store.unit_info("m", "l").version
    store.read("m", "l", 0, 50, version=pinned)  # opened: metadata cached
    ingest_array(store, "m", "l", _acts(300, 1), overwrite=True)
    ActivationStore.open(store.url).prune(grace_s=0)  # another process removes it
    with pytest.raises(UnitChangedError, match=rf"version {pinned} is no longer in store"):
        store.read("m", "l", 50, 300, version=pinned)


def test_old_versions_go_at_a_later_ingest_after_the_grace_period(local, monkeypatch):
    store = local.create()
    versions = []
    for seed in range(3):
        versions.append(ingest_array(store, "m", "l", _acts(10, seed), overwrite=True).version)
    unit_dir = Path(store.url, "units", "m", "l")
    assert sorted(p.name for p in unit_dir.iterdir() if p.is_dir()) == sorted(versions)
    monkeypatch.setattr(layout, "SUPERSEDED_GRACE_S", 0)
    versions.append(ingest_array(store, "m", "l", _acts(10, 3), overwrite=True).version)
    assert [p.name for p in unit_dir.iterdir() if p.is_dir()] == [versions[-1]]
    np.testing.assert_array_equal(ActivationStore.open(store.url).read("m", "l"), _acts(10, 3))


def test_an_interrupted_version_is_removed_by_the_next_ingest_of_the_unit(local):
    store = local.create()
    ingest_array(store, "m", "l", _acts(10, 0))
    w = store.writer("m", "l", overwrite=True, chunk_bytes=6 * 4 * 2, shard_bytes=6 * 4 * 4)
    w.append(_acts(10, 1))  # two shards written
    stray = w._version
    w._done = True  # as if the process died: no abort, no warning
    unit_dir = Path(store.url, "units", "m", "l")
    assert stray in {p.name for p in unit_dir.iterdir()}
    np.testing.assert_array_equal(ActivationStore.open(store.url).read("m", "l"), _acts(10, 0))
    (unit_dir / "notes.txt").write_text("not ours")  # never removed: repscope did not write it
    info = ingest_array(store, "m", "l", _acts(10, 2), overwrite=True)
    names = {p.name for p in unit_dir.iterdir()}
    assert stray not in names and info.version in names and "notes.txt" in names


# -- a real concurrent overwrite ---------------------------------------------------------


def test_reads_of_a_pinned_version_never_mix_with_a_concurrent_ingest(tmp_path):
    """A job reads a unit shard by shard while another process ingests it again and again."""
    rows, features, shard_rows = 4000, 64, 200
    store = ActivationStore.create(str(tmp_path / "acts.zarr"))
    a = np.full((rows, features), 1.0, np.float32)
    b = np.full((rows, features), 2.0, np.float32)
    np.save(tmp_path / "b.npy", b)
    np.save(tmp_path / "a.npy", a)
    ingest_array(store, "m", "l", a, shard_bytes=shard_rows * features * 4)
    script = (
        "import sys, numpy as np\n"
        "from repscope.store import ActivationStore, ingest_array\n"
        "st = ActivationStore.open(sys.argv[1])\n"
        "data = [np.load(sys.argv[2]), np.load(sys.argv[3])]\n"
        "for i in range(int(sys.argv[4])):\n"
        "    ingest_array(st, 'm', 'l', data[i % 2], overwrite=True,\n"
        f"                 shard_bytes={shard_rows * features * 4})\n"
        "    print(i, flush=True)\n"
    )
    pinned = store.unit_info("m", "l").version
    writer = subprocess.Popen(
        [sys.executable, "-c", script, store.url, str(tmp_path / "b.npy"),
         str(tmp_path / "a.npy"), "40"], stdout=subprocess.PIPE, text=True)
    seen_new, passes = set(), 0
    try:
        assert writer.stdout.readline().strip() == "0"  # the first overwrite is published
        while writer.poll() is None or passes < 2:
            for start in range(0, rows, shard_rows):
                # Like a Ray task: a fresh handle per block, the version pinned at planning.
                block = ActivationStore.open(store.url).read(
                    "m", "l", start, start + shard_rows, version=pinned)
                assert (block == 1.0).all(), f"rows {start}: mixed with a newer version"
                seen_new.add(float(ActivationStore.open(store.url).read("m", "l", 0, 1)[0, 0]))
            passes += 1
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0 and passes >= 2
    assert 2.0 in seen_new  # the overwrites did happen while the job read


# -- format 1 ----------------------------------------------------------------------------


def _format1_store(path: Path, data: dict[str, np.ndarray], ids: list[int]) -> None:
    """A store as repscope 0.2 wrote it (docs/store.md, format 1)."""
    root = zarr.open_group(str(path), mode="w")
    n = len(ids)
    rows = RowSet(n_rows=n, ids=np.array(ids))
    zarr.create_array(str(path), name=layout.ROW_IDS, data=np.array(ids, "<i8"))
    for layer, x in data.items():
        h = layout.ContentHash("float32", x.shape[1])
        h.update(x)
        zarr.create_array(
            str(path), name=f"units/m/{layer}", data=x, chunks=(5, x.shape[1]),
            shards=(10, x.shape[1]), compressors=None, fill_value=0.0,
            attributes={"complete": True, "source_dtype": "float64",
                        "fingerprint": h.hexdigest()})
    root.update_attributes({"repscope": {
        "format": 1, "n_rows": n, "row_fingerprint": rows.fingerprint, "row_ids": True,
        "row_ids_level": "row", "example_map": False, "padding_mask": False}})


def test_format1_stores_are_read_not_written_and_upgrade_to_format2(tmp_path):
    data = {"layer1": _acts(25, 0), "layer2": _acts(25, 1, features=3)}
    data["layer2"][10:20] = 0.0  # chunks format 1 did not write
    _format1_store(tmp_path / "old.zarr", data, list(range(100, 125)))
    old = ActivationStore.open(str(tmp_path / "old.zarr"))
    assert old.format == 1 and old.units() == [("m", "layer1"), ("m", "layer2")]
    assert old.n_rows == 25 and list(old.row_ids()) == list(range(100, 125))
    info = old.unit_info("m", "layer2")
    assert info.version == info.fingerprint and info.source_dtype == "float64"
    np.testing.assert_array_equal(old.read("m", "layer2", version=info.version), data["layer2"])
    with pytest.raises(UnitChangedError):
        old.read("m", "layer2", version="something-else")
    with pytest.raises(InputError, match=r"has format 1, which this repscope reads but does not "
                                         r"write; .*python -m repscope.store.upgrade OLD NEW"):
        ingest_array(old, "m", "layer3", _acts(25, 2))

    code = subprocess.run([sys.executable, "-m", "repscope.store.upgrade",
                           str(tmp_path / "old.zarr"), str(tmp_path / "new.zarr")],
                          capture_output=True, text=True, timeout=120)
    assert code.returncode == 0, code.stderr
    new = ActivationStore.open(str(tmp_path / "new.zarr"))
    assert new.format == 2 and new.units() == old.units()
    assert new.row_fingerprint == old.row_fingerprint
    for _, layer in old.units():
        a, b = old.unit_info("m", layer), new.unit_info("m", layer)
        assert (a.fingerprint, a.chunk_rows, a.shard_rows, a.source_dtype) == (
            b.fingerprint, b.chunk_rows, b.shard_rows, b.source_dtype)
        np.testing.assert_array_equal(new.read("m", layer), data[layer])
    ingest_array(new, "m", "layer3", _acts(25, 2), row_ids=range(100, 125))
    with pytest.raises(InputError, match="already holds units"):
        upgrade(str(tmp_path / "old.zarr"), str(tmp_path / "new.zarr"))
    assert os.listdir(tmp_path / "old.zarr")  # untouched

