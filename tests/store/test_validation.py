"""Bad input is refused before anything is written, with file, model, layer and values named."""

from __future__ import annotations

import numpy as np
import pytest

from repscope.errors import InputError, NotFoundError
from repscope.store import ActivationStore, ingest_array, ingest_path


def _ok(rows=5, features=3):
    return np.ones((rows, features), dtype=np.float32)


@pytest.mark.parametrize("value, kind", [(np.nan, "NaN"), (np.inf, r"\+Inf"), (-np.inf, "-Inf")])
def test_non_finite_values_name_first_row_and_column(store, value, kind):
    x = _ok(10, 4)
    x[6, 3] = value
    x[8, 0] = value
    with pytest.raises(InputError, match=rf"^model 'm', layer 'l': {kind} at row 6, column 3; "):
        ingest_array(store, "m", "l", x)
    assert store.units() == [] and store.n_rows is None


def test_row_count_must_match_the_store(store):
    ingest_array(store, "m", "a", _ok(5))
    with pytest.raises(
        InputError,
        match=r"model 'm2', layer 'b': 6 rows, but the store's units "
        r"have 5 rows",
    ):
        ingest_array(store, "m2", "b", _ok(6))


@pytest.mark.parametrize(
    "shape, message",
    [
        ((5,), r"array of shape \(5,\) is 1-D; expected 2-D \(rows, features\) or 3-D"),
        ((2, 2, 2, 2), r"array of shape \(2, 2, 2, 2\) is 4-D; expected"),
        ((), r"array of shape \(\) is 0-D"),
        ((0, 3), r"array of shape \(0, 3\) is empty"),
        ((3, 0), r"array of shape \(3, 0\) is empty"),
    ],
)
def test_shapes(store, shape, message):
    with pytest.raises(InputError, match=rf"model 'm', layer 'l': {message}"):
        ingest_array(store, "m", "l", np.zeros(shape, dtype=np.float32))


@pytest.mark.parametrize(
    "array, message",
    [
        (np.array([["a", "b"]]), r"dtype <U1 is not numeric"),
        (np.array([[1, None]], dtype=object), r"dtype object is not numeric"),
        (np.ones((2, 2), dtype=bool), r"dtype bool is boolean; convert to a float array"),
        (np.ones((2, 2), dtype=np.complex64), r"dtype complex64 is complex"),
        (np.zeros((2, 2), dtype="datetime64[s]"), r"dtype datetime64\[s\] is not numeric"),
    ],
)
def test_non_numeric_dtypes(store, array, message):
    with pytest.raises(InputError, match=rf"model 'm', layer 'l': {message}"):
        ingest_array(store, "m", "l", array)


@pytest.mark.parametrize(
    "name, message",
    [
        ("..", r"starts with '\.'"),
        (".hidden", r"starts with '\.'"),
        ("a/b", r"contains a path separator"),
        ("../../etc", r"contains a path separator"),
        ("a\\b", r"contains a path separator"),
        ("", r"is empty"),
        ("  ", r"is empty"),
        ("__meta", r"starts with '__' \(reserved by Zarr\)"),
        ("zarr.json", r"is a Zarr metadata key"),
        ("a\nb", r"control characters"),
    ],
)
def test_names_that_would_escape_the_store(store, name, message):
    with pytest.raises(InputError, match=rf"layer name .* {message}"):
        ingest_array(store, "m", name, _ok())
    with pytest.raises(InputError, match=rf"model name .* {message}"):
        ingest_array(store, name, "l", _ok())
    with pytest.raises(InputError, match=r"model name must be a string, got int"):
        ingest_array(store, 3, "l", _ok())


def test_bad_sizes(store):
    with pytest.raises(InputError, match=r"chunk_bytes must be a positive integer .* got 0"):
        ingest_array(store, "m", "l", _ok(), chunk_bytes=0)
    with pytest.raises(InputError, match=r"shard_bytes must be a positive integer .* got -1"):
        ingest_array(store, "m", "l", _ok(), shard_bytes=-1)


def test_row_ids_checks(store):
    with pytest.raises(InputError, match=r"layer 'l': 2 row_ids given for 5 rows"):
        ingest_array(store, "m", "l", _ok(), row_ids=[1, 2])
    with pytest.raises(InputError, match=r"row_ids must be integers or strings, got dtype float64"):
        ingest_array(store, "m", "l", _ok(), row_ids=np.arange(5.0))


# -- files ------------------------------------------------------------------------------


def test_missing_file_and_directory(store, tmp_path):
    with pytest.raises(NotFoundError, match=r"model 'm', layer 'l': source file not found: .*nope"):
        ingest_path(store, "m", tmp_path / "nope.npy", layer="l")
    with pytest.raises(NotFoundError, match=r"model 'm': no <layer>.npy files in directory"):
        ingest_path(store, "m", tmp_path)
    with pytest.raises(NotFoundError, match=r"model 'm', layer 'x': no x.npy in directory"):
        ingest_path(store, "m", tmp_path, layer="x")


def test_npy_needs_a_layer_and_unknown_suffix(store, tmp_path):
    np.save(tmp_path / "acts.npy", _ok())
    with pytest.raises(
        InputError,
        match=r"model 'm' \(file .*acts.npy\): a .npy file holds one "
        r"layer; name it with layer=\.\.\.$",
    ):
        ingest_path(store, "m", tmp_path / "acts.npy")
    (tmp_path / "acts.csv").write_text("1,2\n")
    with pytest.raises(InputError, match=r"unsupported source .*acts.csv: expected a .npy"):
        ingest_path(store, "m", tmp_path / "acts.csv")


def test_bad_file_in_a_directory_writes_nothing(store, tmp_path):
    np.save(tmp_path / "layer1.npy", _ok())
    np.save(tmp_path / "layer2.npy", np.array([[1 + 2j]]))
    with pytest.raises(
        InputError,
        match=r"model 'm', layer 'layer2' \(file .*layer2.npy\): dtype "
        r"complex128 is complex",
    ):
        ingest_path(store, "m", tmp_path)
    np.save(tmp_path / "layer2.npy", _ok(7))
    with pytest.raises(
        InputError,
        match=r"layer 'layer2' \(file .*\): 7 rows, but layer 'layer1' "
        r"has 5",
    ):
        ingest_path(store, "m", tmp_path)
    assert store.units() == []


def test_object_npy_is_refused(store, tmp_path):
    np.save(tmp_path / "obj.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=r"layer 'l' \(file .*obj.npy\): dtype object is not "):
        ingest_path(store, "m", tmp_path / "obj.npy", layer="l")


def test_nan_in_a_file_names_the_file(store, tmp_path):
    x = _ok(4)
    x[2, 1] = np.nan
    np.savez(tmp_path / "acts.npz", good=_ok(4), bad=x)
    with pytest.raises(
        InputError,
        match=r"model 'm', layer 'bad' \(file .*acts.npz\): NaN at row "
        r"2, column 1",
    ):
        ingest_path(store, "m", tmp_path / "acts.npz")


def test_npz_every_key_a_layer_and_layer_selects(store, tmp_path):
    np.savez(tmp_path / "acts.npz", layer10=_ok() * 10, layer2=_ok() * 2)
    infos = ingest_path(store, "m", tmp_path / "acts.npz")
    assert [i.layer for i in infos] == ["layer2", "layer10"]
    with pytest.raises(
        NotFoundError, match=r"no key 'layer3' in .*acts.npz \(keys: layer2, layer10"
    ):
        ingest_path(store, "m2", tmp_path / "acts.npz", layer="layer3")
    ingest_path(store, "m2", tmp_path / "acts.npz", layer="layer10")
    assert store.layers("m2") == ["layer10"]
    with pytest.raises(InputError, match=r"layer 'layer2' \(file .*\): unit already exists"):
        ingest_path(store, "m", tmp_path / "acts.npz")


def test_store_row_count_checked_before_any_file_is_written(tmp_path):
    store = ActivationStore.create(str(tmp_path / "st"))
    ingest_array(store, "m", "a", _ok(5))
    d = tmp_path / "acts"
    d.mkdir()
    for name in ("l1", "l2"):
        np.save(d / f"{name}.npy", _ok(6))
    with pytest.raises(
        InputError,
        match=r"layer 'l1' \(file .*l1.npy\): 6 rows, but the store's "
        r"units have 5 rows",
    ):
        ingest_path(store, "m2", d)
    assert store.units() == [("m", "a")]


def test_overlong_names_are_refused_for_writing_and_not_found_for_reading(store):
    ingest_array(store, "m", "l", _ok())
    with pytest.raises(InputError, match=r"^model name 'm{40}'\.\.\. is too long \(300 characters"):
        ingest_array(store, "m" * 300, "l", _ok())
    with pytest.raises(InputError, match=r"^layer name 'é{40}'\.\.\. is too long \(101 characters, "
                                         r"202 bytes in UTF-8\)"):
        ingest_array(store, "m", "é" * 101, _ok())
    ingest_array(store, "m", "é" * 100, _ok())  # 200 bytes: the limit
    for model, layer in [("m" * 300, "l"), ("m", "l" * 300)]:
        with pytest.raises(NotFoundError, match="not (in store|found)") as info:  # no I/O error
            store.read(model, layer)
        assert "m" * 61 not in str(info.value) and "l" * 61 not in str(info.value)
