"""Array sources for ingest: numpy (memmap too), dask, torch, and other array-likes.

A :class:`Source` exposes shape, dtype and ``block(start, stop)`` along the first axis, so
ingest reads one block at a time and never materialises a memmap or dask array whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from repscope.errors import InputError


def _is_torch(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "torch"


def _is_dask(obj: Any) -> bool:
    return hasattr(obj, "dask") and hasattr(obj, "compute") and hasattr(obj, "chunks")


def to_numpy(obj: Any) -> np.ndarray:
    """An in-memory array as numpy without copying where possible.

    torch bfloat16 has no numpy dtype: its bits are reinterpreted as ml_dtypes.bfloat16
    (exact, no copy); without ml_dtypes it is widened to float32.
    """
    if isinstance(obj, np.ndarray):
        return obj
    if _is_torch(obj):
        tensor = obj.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            try:
                import ml_dtypes
                import torch

                return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            except ImportError:
                return tensor.float().numpy()
        return tensor.numpy()
    if _is_dask(obj):
        return np.asarray(obj.compute())
    try:
        return np.asarray(obj)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"cannot read {type(obj).__name__} as an array ({exc}); pass a numpy, dask or "
            "torch array"
        ) from None


@dataclass
class Source:
    """An array read block by block along its first axis."""

    obj: Any
    shape: tuple[int, ...]
    dtype: np.dtype
    lazy: bool  # True when block() reads from disk or computes (memmap, dask, zarr...)

    def block(self, start: int, stop: int) -> np.ndarray:
        part = self.obj[start:stop]
        return to_numpy(part) if not isinstance(part, np.ndarray) else np.asarray(part)


def as_source(array: Any) -> Source:
    """Wrap ``array`` for blockwise reading, keeping memmaps and dask arrays lazy."""
    if isinstance(array, np.memmap):
        return Source(array, tuple(array.shape), array.dtype, lazy=True)
    if isinstance(array, np.ndarray):
        return Source(array, tuple(array.shape), array.dtype, lazy=False)
    if _is_dask(array):
        return Source(array, tuple(array.shape), np.dtype(array.dtype), lazy=True)
    if _is_torch(array):
        arr = to_numpy(array)
        return Source(arr, tuple(arr.shape), arr.dtype, lazy=False)
    dtype = getattr(array, "dtype", None)
    if isinstance(dtype, np.dtype) and hasattr(array, "shape") and hasattr(array, "__getitem__"):
        # zarr / h5py / xarray-like: sliceable without loading everything.
        return Source(array, tuple(array.shape), dtype, lazy=True)
    arr = to_numpy(array)
    return Source(arr, tuple(arr.shape), arr.dtype, lazy=False)
