"""Storage dtypes and conversions: float64, float16, bfloat16 (ml_dtypes), integers, torch."""

from __future__ import annotations

import numpy as np
import pytest

from repscope.errors import InputError
from repscope.store import UnitWriter, ingest_array


@pytest.mark.parametrize(
    "source, storage",
    [
        ("float64", "float32"),
        ("float32", "float32"),
        ("float16", "float32"),
        ("float64", "float16"),
        ("float32", "float16"),
        ("int64", "float32"),
        ("int8", "float16"),
        ("uint16", "float32"),
    ],
)
def test_conversion_round_trip(store, source, storage):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((50, 6)) * 100).astype(source)
    info = ingest_array(store, "m", "l", x, dtype=storage)
    assert (info.dtype, info.source_dtype) == (storage, source)
    out = store.read("m", "l")
    assert out.dtype == np.dtype(storage)
    np.testing.assert_array_equal(out, x.astype(storage))


def test_bfloat16_from_ml_dtypes_is_exact(store):
    import ml_dtypes  # a test dependency: fail, never skip, if it is missing
    x = np.random.default_rng(1).standard_normal((40, 8)).astype(ml_dtypes.bfloat16)
    info = ingest_array(store, "m", "l", x)
    assert info.source_dtype == "bfloat16" and info.dtype == "float32"
    np.testing.assert_array_equal(store.read("m", "l"), x.astype(np.float32))
    # bfloat16 -> float32 is exact: converting back reproduces the input bits.
    assert store.read("m", "l").astype(ml_dtypes.bfloat16).tobytes() == x.tobytes()


def test_bfloat16_nan_is_found(store):
    import ml_dtypes  # a test dependency: fail, never skip, if it is missing
    x = np.zeros((5, 3), dtype=ml_dtypes.bfloat16)
    x[4, 1] = np.inf
    with pytest.raises(InputError, match=r"layer 'l': \+Inf at row 4, column 1"):
        ingest_array(store, "m", "l", x)


def test_torch_tensors_including_bfloat16(store):
    torch = pytest.importorskip("torch")
    x = torch.randn(30, 4, dtype=torch.bfloat16)
    info = ingest_array(store, "m", "l", x)
    assert info.source_dtype == "bfloat16"
    np.testing.assert_array_equal(store.read("m", "l"), x.float().numpy())


def test_float16_overflow_is_refused(store):
    x = np.ones((10, 3))
    x[7, 2] = 70000.0
    with pytest.raises(
        InputError,
        match=r"layer 'l': value 70000\.0 at row 7, column 2 overflows "
        r"float16 \(largest 65504\); store as float32 instead",
    ):
        ingest_array(store, "m", "l", x, dtype="float16")
    with pytest.raises(InputError, match=r"overflows float16"):
        ingest_array(store, "m", "l", np.full((2, 2), 100_000, dtype=np.int64), dtype="float16")
    x[7, 2] = 1e39
    with pytest.raises(InputError, match=r"value 1e\+39 at row 7, column 2 overflows float32"):
        ingest_array(store, "m", "l", x)
    assert store.units() == []


@pytest.mark.parametrize("dtype", ["float64", "int32", "bfloat16", "float8"])
def test_unsupported_storage_dtypes(store, dtype):
    with pytest.raises(InputError, match=r"storage dtype must be one of float32, float16, got"):
        ingest_array(store, "m", "l", np.ones((2, 2)), dtype=dtype)


def test_streaming_writer_converts_and_keeps_source_dtype(store):
    with UnitWriter(store, "m", "l", dtype="float16") as w:
        w.append(np.ones((3, 2), dtype=np.float64))
        with pytest.raises(InputError, match=r"batch dtype int64 differs from earlier batches"):
            w.append(np.ones((3, 2), dtype=np.int64))
    assert store.units() == []  # the failed append aborted the writer
