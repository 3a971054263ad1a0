"""Property: any input either ingests and round-trips exactly, or is refused with InputError."""

from __future__ import annotations

import uuid

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repscope.errors import InputError
from repscope.store import ActivationStore, ingest_array

DTYPES = [
    "float64",
    "float32",
    "float16",
    "int64",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "<U2",
    "object",
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple),
    dtype=st.sampled_from(DTYPES),
    storage=st.sampled_from(["float32", "float16"]),
    scale=st.sampled_from([1.0, 1e5, 1e39]),
    poison=st.sampled_from([None, np.nan, np.inf]),
    seed=st.integers(0, 2**16),
)
def test_ingest_round_trips_or_refuses(shape, dtype, storage, scale, poison, seed):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape) * (scale if dtype.startswith("float") else 50)
    if poison is not None and values.size and dtype.startswith("float"):
        values.flat[rng.integers(values.size)] = poison
    with np.errstate(all="ignore"):  # 1e39 overflows float32/float16 sources: inf, refused
        x = values.astype(dtype) if dtype != "<U2" else values.astype(str).astype("<U2")

    numeric = dtype not in ("bool", "complex64", "<U2", "object")
    with np.errstate(all="ignore"):
        as_storage = x.astype(storage) if numeric else None
    expect_ok = (
        numeric
        and len(shape) in (2, 3)
        and all(shape)
        and bool(np.isfinite(x.astype(np.float64)).all())
        and bool(np.isfinite(as_storage).all())
    )
    store = ActivationStore.create(f"memory://repscope-prop/{uuid.uuid4().hex}")
    try:
        info = ingest_array(store, "m", "l", x, dtype=storage)
    except InputError as exc:
        assert not expect_ok, f"refused a valid input: {exc}"
        assert str(exc).startswith("model 'm', layer 'l': ")
        assert store.units() == []
        return
    assert expect_ok, f"accepted {x.dtype} {x.shape} into {storage}"
    expected = as_storage.reshape(-1, shape[-1])
    assert (info.rows, info.features, info.source_dtype) == (*expected.shape, x.dtype.name)
    np.testing.assert_array_equal(store.read("m", "l"), expected)
