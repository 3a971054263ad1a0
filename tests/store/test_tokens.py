"""3-D (examples, tokens, features) input: token rows, example map, padding mask."""

from __future__ import annotations

import numpy as np
import pytest

from repscope.errors import InputError
from repscope.store import ingest_array


def _tokens(examples=4, tokens=6, features=3):
    return np.arange(examples * tokens * features, dtype=np.float32).reshape(
        examples, tokens, features
    )


def test_token_rows_with_padding_mask(store):
    x = _tokens()
    lengths = np.array([6, 2, 4, 1])
    pad = np.arange(6)[None, :] >= lengths[:, None]  # True = padding
    x[pad] = np.nan  # padding may hold garbage: it is dropped, not checked
    info = ingest_array(
        store,
        "m",
        "l",
        x,
        padding_mask=pad,
        chunk_bytes=3 * 4 * 2,
        shard_bytes=3 * 4 * 4,
        row_ids=["a", "b", "c", "d"],
    )
    assert info.rows == 13 == store.n_rows
    np.testing.assert_array_equal(store.read("m", "l"), x[~pad])
    np.testing.assert_array_equal(store.example_index(), np.repeat(np.arange(4), lengths))
    np.testing.assert_array_equal(store.padding_mask(), pad)
    assert list(store.row_ids()) == ["a", "b", "c", "d"]
    # A second layer with the same token layout is accepted; another layout is not.
    ingest_array(store, "m", "l2", _tokens(), padding_mask=pad)
    other = pad.copy()
    other[0, 5], other[1, 2] = True, False
    with pytest.raises(InputError, match=r"layer 'l3': token layout .* differs from the store's"):
        ingest_array(store, "m", "l3", _tokens(), padding_mask=other)


def test_token_rows_without_mask(store):
    info = ingest_array(store, "m", "l", _tokens(3, 5, 2))
    assert info.rows == 15
    np.testing.assert_array_equal(store.example_index(), np.repeat(np.arange(3), 5))
    assert store.padding_mask() is None


def test_nan_in_a_kept_token_names_example_and_token(store):
    x = _tokens()
    x[2, 3, 1] = np.nan
    pad = np.zeros((4, 6), bool)
    pad[0, 4:] = True
    with pytest.raises(InputError, match=r"NaN at row 13 \(example 2, token 3\), column 1"):
        ingest_array(store, "m", "l", x, padding_mask=pad)


def test_padding_mask_checks(store):
    x = _tokens()
    with pytest.raises(InputError, match=r"padding_mask has shape \(4, 5\), expected"):
        ingest_array(store, "m", "l", x, padding_mask=np.zeros((4, 5), bool))
    all_pad = np.zeros((4, 6), bool)
    all_pad[1] = True
    with pytest.raises(InputError, match=r"pads every token of example 1 .*pass ~attention_mask"):
        ingest_array(store, "m", "l", x, padding_mask=all_pad)
    with pytest.raises(InputError, match=r"padding_mask applies to 3-D"):
        ingest_array(store, "m", "l", x[0], padding_mask=all_pad)


def test_token_input_into_a_row_store_is_refused(store):
    ingest_array(store, "m", "rows", np.ones((24, 3)))
    with pytest.raises(InputError, match=r"store's rows are not token rows of examples"):
        ingest_array(store, "m", "tokens", _tokens())
