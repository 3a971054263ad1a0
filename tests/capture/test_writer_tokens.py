"""UnitWriter streaming token batches (what capture writes through) and unit attributes."""

from __future__ import annotations

import numpy as np
import pytest

from repscope.errors import InputError
from repscope.store import ActivationStore, UnitWriter, ingest_array


@pytest.fixture
def store(tmp_path):
    return ActivationStore.create(str(tmp_path / "acts.zarr"))


def batches():
    """Three (examples, tokens, 4) batches of widths 5, 3, 6 with their padding masks."""
    rng = np.random.default_rng(0)
    out = []
    for width, lengths in ((5, [5, 2, 4]), (3, [1, 3]), (6, [6, 6, 2, 5])):
        x = rng.standard_normal((len(lengths), width, 4)).astype(np.float32)
        pad = np.arange(width)[None, :] >= np.array(lengths)[:, None]
        x[pad] = np.nan  # padding may hold anything: it is dropped, not checked
        out.append((x, pad))
    return out


def test_token_batches_record_what_ingest_records_for_the_same_array(store, tmp_path):
    with UnitWriter(store, "m", "l", example_ids=[f"e{i}" for i in range(9)],
                    chunk_bytes=64, shard_bytes=256) as writer:
        for x, pad in batches():
            writer.append(x, padding_mask=pad)
    # The same tokens as one padded (examples, tokens, features) array, through ingest.
    full = np.zeros((9, 6, 4), np.float32)
    mask = np.ones((9, 6), bool)
    start = 0
    for x, pad in batches():
        full[start : start + len(x), : x.shape[1]] = np.nan_to_num(x)
        mask[start : start + len(x), : x.shape[1]] = pad
        start += len(x)
    other = ActivationStore.create(str(tmp_path / "other.zarr"))
    ingest_array(other, "m", "l", full, padding_mask=mask, row_ids=[f"e{i}" for i in range(9)])
    assert store.row_fingerprint == other.row_fingerprint
    np.testing.assert_array_equal(store.read("m", "l"), other.read("m", "l"))
    np.testing.assert_array_equal(store.padding_mask(), mask)
    np.testing.assert_array_equal(store.example_index(), other.example_index())
    assert store.n_rows == int((~mask).sum()) == 34


def test_a_second_unit_with_another_token_layout_is_refused(store):
    with UnitWriter(store, "m", "a") as writer:
        for x, pad in batches():
            writer.append(x, padding_mask=pad)
    writer = UnitWriter(store, "m", "b")
    for x, pad in batches()[::-1]:  # the same examples in another order: other rows
        writer.append(x, padding_mask=pad)
    with pytest.raises(InputError, match=r"layer 'b': token layout .* differs from the store's"):
        writer.close()
    assert store.units() == [("m", "a")]


def test_nan_in_a_kept_token_names_the_example_across_batches(store):
    (x0, p0), (x1, p1), _ = batches()
    x1 = x1.copy()
    x1[1, 2, 3] = np.nan  # example 4 overall (the second of the second batch), token 2
    writer = UnitWriter(store, "m", "l")
    writer.append(x0, padding_mask=p0)
    with pytest.raises(InputError, match=r"NaN at row 14 \(example 4, token 2\), column 3"):
        writer.append(x1, padding_mask=p1)
    assert store.units() == []


def test_mixed_batch_kinds_and_misplaced_ids_are_refused(store):
    x, pad = batches()[0]
    writer = UnitWriter(store, "m", "l")
    writer.append(x, padding_mask=pad)
    with pytest.raises(InputError, match=r"2-D batch of shape \(3, 4\) after token batches"):
        writer.append(np.ones((3, 4), np.float32))
    with pytest.raises(InputError, match=r"token batch of shape \(3, 5, 4\) after 2-D rows"):
        UnitWriter(store, "m", "l", row_ids=[1, 2, 3]).append(x, padding_mask=pad)
    with pytest.raises(InputError, match=r"example_ids apply to token \(3-D\) batches"):
        UnitWriter(store, "m", "l", example_ids=[1, 2, 3]).append(np.ones((3, 4)))
    writer = UnitWriter(store, "m", "l", example_ids=["a", "b"])
    writer.append(x, padding_mask=pad)
    with pytest.raises(InputError, match=r"2 example_ids given, but 3 examples were appended"):
        writer.close()
    with pytest.raises(InputError, match=r"padding_mask applies to 3-D"):
        UnitWriter(store, "m", "l").append(np.ones((3, 4)), padding_mask=pad)
    assert store.units() == []


def test_attributes_round_trip_and_must_be_json(store):
    with UnitWriter(store, "m", "l", attributes={"step": 100, "tags": ["a"]}) as writer:
        writer.append(np.ones((2, 3)))
    assert store.unit_attributes("m", "l") == {"step": 100, "tags": ["a"]}
    with UnitWriter(store, "m", "plain") as writer:
        writer.append(np.ones((2, 3)))
    assert store.unit_attributes("m", "plain") == {}
    with pytest.raises(InputError, match=r"attributes must be JSON-serialisable"):
        UnitWriter(store, "m", "x", attributes={"when": object()})
    with pytest.raises(InputError, match=r"attributes must be JSON-serialisable"):
        UnitWriter(store, "m", "x", attributes={"loss": float("nan")})
