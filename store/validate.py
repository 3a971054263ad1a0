"""Checks on ingest input, run before (or, for streamed values, while) anything is written.

Every message starts with where the problem is, ``model 'm', layer 'l' (file x.npy)``, then
says what is wrong with the values involved and, where there is one, the fix.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from repscope.errors import InputError
from repscope.store.layout import MAX_NAME_BYTES, STORAGE_DTYPES

# Largest finite value of each storage dtype: converting anything larger gives inf.
_STORAGE_MAX = {name: float(np.finfo(name).max) for name in STORAGE_DTYPES}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def where(model: str, layer: str | None = None, source: object | None = None) -> str:
    """The prefix of every ingest message: model, layer and the file they came from."""
    text = f"model {model!r}"
    if layer is not None:
        text += f", layer {layer!r}"
    if source is not None:
        text += f" (file {source})"
    return text


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters: what messages echo of user values."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def check_name(kind: str, name: object) -> str:
    """Refuse model or layer names that are empty or would escape or confuse the store.

    Names become path segments (``units/<model>/<layer>``), so ``/``, ``\\``, ``..``, a leading
    dot, control characters, Zarr's reserved ``__`` prefix, ``zarr.json`` and names longer
    than ``MAX_NAME_BYTES`` bytes in UTF-8 (file systems allow 255 per name) are refused.
    """
    if not isinstance(name, str):
        raise InputError(f"{kind} name must be a string, got {type(name).__name__} {shown(name)}")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise InputError(
            f"{kind} name {name[:40]!r}... is too long ({len(name)} characters, {size} bytes "
            f"in UTF-8); at most {MAX_NAME_BYTES} bytes, since names become folder and object "
            "names"
        )
    problem = None
    if not name.strip():
        problem = "is empty"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator ('/' or '\\')"
    elif name.startswith("."):
        problem = "starts with '.' (would escape the store or hide the unit)"
    elif name.startswith("__"):
        problem = "starts with '__' (reserved by Zarr)"
    elif _CONTROL.search(name):
        problem = "contains control characters"
    elif name != name.strip():
        problem = "has leading or trailing whitespace"
    elif name == "zarr.json":
        problem = "is a Zarr metadata key"
    if problem:
        raise InputError(f"{kind} name {name!r} {problem}; use letters, digits, '-', '_', '.'")
    return name


def check_storage_dtype(dtype: object) -> str:
    """The storage dtype name, ``float32`` or ``float16``."""
    try:
        name = np.dtype(dtype).name  # type: ignore[call-overload]
    except TypeError:
        name = str(dtype)
    if name not in STORAGE_DTYPES:
        raise InputError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    return name


def is_extended_float(dtype: np.dtype) -> bool:
    """bfloat16 and float8 variants from ml_dtypes (numpy kind 'V', no native Zarr dtype)."""
    return type(dtype).__module__.startswith("ml_dtypes") or (
        dtype.type.__module__.startswith("ml_dtypes") and "float" in dtype.name
    )


def check_source_dtype(dtype: np.dtype, ctx: str) -> str:
    """The source dtype's name if it converts to a float storage dtype, else InputError."""
    if dtype.kind in "fiu" and dtype.itemsize <= 8 or is_extended_float(dtype):
        return dtype.name
    if dtype.kind == "b":
        reason = "is boolean; convert to a float array if 0/1 activations are meant"
    elif dtype.kind == "c":
        reason = "is complex; store real and imaginary parts as separate layers or features"
    elif dtype.kind == "f":
        reason = "is extended precision; convert to float64 first"
    else:
        reason = "is not numeric"
    raise InputError(f"{ctx}: dtype {dtype} {reason}")


def check_ndim(shape: tuple[int, ...], ctx: str) -> None:
    """Activations are (rows, features) or (examples, tokens, features), all non-empty."""
    if len(shape) not in (2, 3):
        raise InputError(
            f"{ctx}: array of shape {tuple(shape)} is {len(shape)}-D; expected 2-D (rows, "
            "features) or 3-D (examples, tokens, features)"
        )
    if any(n == 0 for n in shape):
        raise InputError(f"{ctx}: array of shape {tuple(shape)} is empty")


def first_bad(bad: np.ndarray) -> tuple[int, int]:
    """(row, column) of the first True in a (rows, features) boolean array, in row order."""
    row = int(np.argmax(bad.any(axis=1)))
    return row, int(np.argmax(bad[row]))


def convert_block(
    block: np.ndarray, storage: str, ctx: str, describe_row: Callable[[int], str]
) -> np.ndarray:
    """A (rows, features) block checked for NaN/Inf and converted to the storage dtype.

    ``describe_row(i)`` names local row ``i`` in messages (global row, example and token).
    Values that are finite in the source but too large for the storage dtype (e.g. above
    65504 for float16) are refused rather than silently stored as inf.
    """
    if is_extended_float(block.dtype):
        # bfloat16/float8 -> float32 is exact, and gives numpy's isfinite a native dtype.
        block = block.astype(np.float32)
    if block.dtype.kind == "f":
        bad = ~np.isfinite(block)
        if bad.any():
            row, col = first_bad(bad)
            value = block[row, col]
            kind = "NaN" if np.isnan(value) else ("+Inf" if value > 0 else "-Inf")
            raise InputError(
                f"{ctx}: {kind} at {describe_row(row)}, column {col}; activations must be finite"
            )
    with np.errstate(over="ignore"):  # overflow is reported below, with row and column
        out = np.asarray(block, dtype=np.dtype(storage).newbyteorder("<"))
    # Only a narrowing conversion (float64 -> float32, anything -> float16, large ints) can
    # turn finite values into inf; an identity conversion needs no second pass.
    if out is not block:
        bad = ~np.isfinite(out)
        if bad.any():
            row, col = first_bad(bad)
            raise InputError(
                f"{ctx}: value {block[row, col].item()!r} at {describe_row(row)}, column {col} "
                f"overflows {storage} (largest {_STORAGE_MAX[storage]:g}); store as float32 instead"
            )
    return out


def check_row_ids(row_ids: object, n: int, what: str, ctx: str) -> np.ndarray:
    """Row ids as a 1-D integer or string array of ``n`` unique values."""
    ids = np.asarray(row_ids)
    if ids.ndim != 1:
        raise InputError(f"{ctx}: row_ids must be 1-D, got shape {ids.shape}")
    if ids.dtype.kind not in "iuUSOT":
        raise InputError(f"{ctx}: row_ids must be integers or strings, got dtype {ids.dtype}")
    if ids.dtype.kind in "SOT":
        try:
            ids = np.array(ids.tolist(), dtype=str)
        except (TypeError, ValueError, UnicodeDecodeError):
            raise InputError(f"{ctx}: row_ids must be integers or strings") from None
    if ids.shape[0] != n:
        raise InputError(f"{ctx}: {ids.shape[0]} row_ids given for {n} {what}")
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if uniq.shape[0] != n:
        dup = int(np.argmax(counts > 1))
        raise InputError(
            f"{ctx}: row_ids are not unique: {uniq[dup].item()!r} appears {counts[dup]} times "
            f"(first at {what[:-1] if what.endswith('s') else what} {first[dup]})"
        )
    return ids


def check_padding_mask(mask: object, examples: int, tokens: int, ctx: str) -> np.ndarray:
    """A boolean (examples, tokens) mask, True at padded positions; every example keeps a token."""
    arr = np.asarray(mask)
    if arr.shape != (examples, tokens):
        raise InputError(
            f"{ctx}: padding_mask has shape {arr.shape}, expected (examples, tokens) = "
            f"({examples}, {tokens})"
        )
    if arr.dtype != bool:
        if arr.dtype.kind not in "iu" or not np.isin(arr, (0, 1)).all():
            raise InputError(f"{ctx}: padding_mask must be boolean (True = padded token)")
        arr = arr.astype(bool)
    empty = np.flatnonzero(arr.all(axis=1))
    if empty.size:
        raise InputError(
            f"{ctx}: padding_mask pads every token of example {int(empty[0])} "
            f"({empty.size} such examples); True marks padding, so pass ~attention_mask"
        )
    return arr
