"""Results stores: one Zarr group per job, readable with ``xarray.open_zarr(output)``.

Layout (the interface other tools read):
- one data variable per metric, dims ("x", "y"), float64, the same unit order on both axes;
  entry [i, j] is metric(unit i, unit j) (for pwcca: weighted by unit i's canonical variates);
- coordinates ``model_x``, ``layer_x`` (on x) and ``model_y``, ``layer_y`` (on y);
- variable attributes ``direction`` ("similarity" or "distance");
- group attributes: ``repscope_version``, ``spec`` (JSON, without storage options),
  ``spec_identity`` (JSON: what must match for a rerun to reuse the output),
  ``store_fingerprint``, ``rows`` ([start, stop)), ``created`` (UTC ISO 8601),
  ``directions`` (JSON {metric: direction}).

Atomic replacement: on a local file system the new result is written beside the output and
swapped in with one rename(2) exchange, so a reader sees the old or the new result, never a
mixture. Object stores have no rename: there the arrays are written first and the group's
consolidated metadata last (see docs/results.md for what a concurrent reader can see).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from jobs import __version__
from store.errors import ConflictError, NotFoundError

_LOCAL_PREFIX = "file://"


def local_path(url: str) -> Path | None:
    """The local path of a URL, or None for object storage (anything with another scheme)."""
    if url.startswith(_LOCAL_PREFIX):
        return Path(url[len(_LOCAL_PREFIX) :])
    if "://" in url:
        return None
    return Path(url)


def build_dataset(
    matrices: dict[str, np.ndarray],
    units: Sequence[tuple[str, str]],
    directions: dict[str, str],
    attrs: dict[str, Any],
):
    """An xarray Dataset of (U, U) matrices with labelled unit axes."""
    import xarray as xr

    # Object arrays of str become Zarr v3's variable-length UTF-8 strings.
    models = np.array([m for m, _ in units], dtype=object)
    layers = np.array([layer for _, layer in units], dtype=object)
    data_vars = {
        name: (("x", "y"), np.asarray(matrix, dtype=np.float64), {"direction": directions[name]})
        for name, matrix in matrices.items()
    }
    coords = {
        "model_x": ("x", models),
        "layer_x": ("x", layers),
        "model_y": ("y", models),
        "layer_y": ("y", layers),
    }
    base = {
        "repscope_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "directions": json.dumps(directions),
    }
    return xr.Dataset(data_vars, coords=coords, attrs={**base, **attrs})


def open_results(url: str, storage_options: dict | None = None):
    """Open a results store as an xarray Dataset; NotFoundError if there is none."""
    import xarray as xr

    from store import redact

    try:
        return xr.open_zarr(url, storage_options=storage_options or None, zarr_format=3)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise NotFoundError(f"no results store at {redact(url)} ({type(exc).__name__})") from None


def existing_identity(url: str, storage_options: dict | None = None) -> str | None:
    """The spec identity recorded in an existing results store, or None if there is none."""
    try:
        ds = open_results(url, storage_options)
    except NotFoundError:
        return None
    return ds.attrs.get("spec_identity", "")


def check_output(url: str, identity: str, storage_options: dict | None, overwrite: bool) -> None:
    """Refuse to replace results of a different spec unless overwrite is set."""
    from store import redact

    found = existing_identity(url, storage_options)
    if found is not None and found != identity and not overwrite:
        raise ConflictError(
            f"output {redact(url)} holds results of a different job spec; choose another "
            "output or pass --overwrite to replace them"
        )


def _to_zarr(ds, url: str, storage_options: dict | None) -> None:
    with warnings.catch_warnings():
        # Consolidated metadata lets xarray.open_zarr(output) open with one read; zarr warns
        # that it is not yet part of the v3 spec.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        ds.to_zarr(url, mode="w", zarr_format=3, consolidated=True,
                   storage_options=storage_options or None)


def write_results(ds, url: str, storage_options: dict | None = None) -> None:
    """Write a results Dataset so that readers never see a partial result."""
    path = local_path(url)
    if path is None:
        _to_zarr(ds, url, storage_options)
        return
    path = path.absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        _to_zarr(ds, str(staging), None)
        _swap_into_place(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_into_place(new: Path, target: Path) -> None:
    """Put directory `new` at `target` atomically; `new` then holds the old content (if any)."""
    if not target.exists():
        os.rename(new, target)
        new.mkdir()  # the caller removes `new`; keep that uniform
        return
    if not _rename_exchange(new, target):
        # No renameat2 (non-Linux): two renames; a reader may briefly find no output, but
        # never a mixture of two results.
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        os.rename(new, target)
        os.rename(old, new)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with Linux renameat2(RENAME_EXCHANGE)."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0
