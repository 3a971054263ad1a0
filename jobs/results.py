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

Atomic replacement on a local file system: every result is written, complete, into its own
version folder `.<name>.versions/<time>-<id>/`, and the output path is a symbolic link that
one rename(2) points at the new version. Versions are never modified; the previous one is
kept while a new one is written, so a reader that resolved the link (``open_results`` does)
reads one whole version. ``xarray.open_zarr(output)`` works as on any Zarr folder; a lazy
reader that must not straddle a concurrent rewrite opens ``os.path.realpath(output)``.
Object stores have no rename: there a journal (`<output>.staging` written complete, then a
`<output>.commit` marker, then the copy into place) makes a crash roll forward at the next
write, and ``open_results`` reads the staged copy while a commit is in flight; only a raw
reader of the output during the copy may see a mixture (docs/jobs.md). The output lock
(jobs/lock.py) keeps writers apart everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from repscope import __version__
from repscope.errors import ConflictError, NotFoundError


def local_path(url: str) -> Path | None:
    """The local path of a URL, or None for object storage (anything with another scheme)."""
    from repscope.store import urls

    return urls.local_path(url) if urls.scheme_of(url) == "file" else None


def build_dataset(
    matrices: dict[str, np.ndarray],
    units: Sequence[tuple[str, str]],
    directions: dict[str, str],
    attrs: dict[str, Any],
    keys: Sequence[str] | None = None,
    bounds: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    level: float = 0.9,
):
    """An xarray Dataset of (U, U) matrices with labelled unit axes.

    keys: optional content keys of the units (nightly runs), stored as coordinates
    ``key_x`` and ``key_y``. bounds: optional {metric: (lower, upper)} confidence bounds,
    stored as variables ``<metric>_lower`` and ``<metric>_upper``."""
    import xarray as xr

    # Object arrays of str become Zarr v3's variable-length UTF-8 strings.
    models = np.array([m for m, _ in units], dtype=object)
    layers = np.array([layer for _, layer in units], dtype=object)
    data_vars = {
        name: (("x", "y"), np.asarray(matrix, dtype=np.float64), {"direction": directions[name]})
        for name, matrix in matrices.items()
    }
    for name, (lower, upper) in (bounds or {}).items():
        for side, values in (("lower", lower), ("upper", upper)):
            data_vars[f"{name}_{side}"] = (
                ("x", "y"), np.asarray(values, dtype=np.float64),
                {"bound_of": name, "confidence_level": level, "method": "row-shard bootstrap"},
            )
    coords = {
        "model_x": ("x", models),
        "layer_x": ("x", layers),
        "model_y": ("y", models),
        "layer_y": ("y", layers),
    }
    if keys is not None:
        coords["key_x"] = ("x", np.array(list(keys), dtype=object))
        coords["key_y"] = ("y", np.array(list(keys), dtype=object))
    base = {
        "repscope_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "directions": json.dumps(directions),
    }
    return xr.Dataset(data_vars, coords=coords, attrs={**base, **attrs})


def open_results(url: str, storage_options: dict | None = None):
    """Load a results store into memory as an xarray Dataset; NotFoundError if there is none.

    A local output is a link to its current version: the link is resolved once, so the whole
    Dataset comes from one version even if a new one is written meanwhile.
    """
    import xarray as xr

    from repscope.store import redact

    path = local_path(url)
    for _ in range(3):
        if path is not None:
            where = os.path.realpath(path)
        else:  # an object store mid-commit: its staged copy is the complete new result
            where = _staging(url) if _committing(url, storage_options) else url
        try:
            with xr.open_zarr(where, storage_options=storage_options or None,
                              zarr_format=3, chunks=None) as ds:
                loaded = ds.load()
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise NotFoundError(
                f"no results store at {redact(url)} ({type(exc).__name__})"
            ) from None
        # A version pruned while it was read reads as fill values: read the current one.
        if path is None or os.path.isdir(where):
            return loaded
    raise NotFoundError(f"results store at {redact(url)} kept changing while being read")


def existing_identity(url: str, storage_options: dict | None = None) -> str | None:
    """The spec identity recorded in an existing results store, or None if there is none."""
    try:
        ds = open_results(url, storage_options)
    except NotFoundError:
        return None
    return ds.attrs.get("spec_identity", "")


def check_output(url: str, identity: str, storage_options: dict | None, overwrite: bool) -> None:
    """Refuse to replace results of a different spec unless overwrite is set."""
    from repscope.store import redact

    found = existing_identity(url, storage_options)
    if found is not None and found != identity and not overwrite:
        raise ConflictError(
            f"output {redact(url)} holds results of a different job spec; choose another "
            "output or pass --overwrite to replace them"
        )


def to_zarr(ds, url: str, storage_options: dict | None) -> None:
    with warnings.catch_warnings():
        # Consolidated metadata lets xarray.open_zarr(output) open with one read; zarr warns
        # that it is not yet part of the v3 spec.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        ds.to_zarr(url, mode="w", zarr_format=3, consolidated=True,
                   storage_options=storage_options or None)


def _staging(url: str) -> str:
    return url.rstrip("/") + ".staging"


def _fs_path(url: str, storage_options: dict | None):
    import fsspec

    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def _marker(url: str, storage_options: dict | None):
    """(file system, path) of an object-store output's commit marker."""
    return _fs_path(url.rstrip("/") + ".commit", storage_options)


def _committing(url: str, storage_options: dict | None) -> bool:
    fs, marker = _marker(url, storage_options)
    return fs.exists(marker)


def _roll_forward(url: str, storage_options: dict | None) -> None:
    """Finish an interrupted commit on an object store: the staged result is complete (the
    marker is written only after it), so copy it over the output, then drop the marker and
    the staging copy."""
    import xarray as xr

    fs, marker = _marker(url, storage_options)
    if not fs.exists(marker):
        return
    with xr.open_zarr(_staging(url), storage_options=storage_options or None,
                      zarr_format=3, chunks=None) as staged:
        to_zarr(staged.load(), url, storage_options)
    fs.rm(marker)
    staging_fs, staging = _fs_path(_staging(url), storage_options)
    staging_fs.rm(staging, recursive=True)


def _write_object_store(ds, url: str, storage_options: dict | None) -> None:
    """Object stores have no rename. A journal instead: (1) the complete result is written
    to `<output>.staging`, (2) `<output>.commit` marks it complete, (3) it is copied over the
    output and the marker removed. A crash after (2) is rolled forward by the next write, and
    open_results reads the staged copy while a marker exists, so neither a crash nor our
    readers see a mixture; a raw reader of the output during step (3) may."""
    _roll_forward(url, storage_options)
    to_zarr(ds, _staging(url), storage_options)
    fs, marker = _marker(url, storage_options)
    with fs.open(marker, "w") as f:
        f.write("committing")
    _roll_forward(url, storage_options)


def write_results(ds, url: str, storage_options: dict | None = None) -> None:
    """Write a results Dataset so that readers never see a partial result (module docs)."""
    path = local_path(url)
    if path is None:
        _write_object_store(ds, url, storage_options)
        return
    path = path.absolute()
    versions = path.with_name(f".{path.name}.versions")
    versions.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    new = versions / f"{stamp}-{uuid.uuid4().hex[:8]}"
    link = path.with_name(f".{path.name}.link-{uuid.uuid4().hex[:8]}")
    try:
        to_zarr(ds, str(new), None)
        if path.is_dir() and not path.is_symlink():
            # An output written as a plain directory (by hand, or by an older version):
            # keep it as a version so the link can take its place.
            os.rename(path, versions / f"00000000T000000-{uuid.uuid4().hex[:8]}-plain")
        os.symlink(os.path.relpath(new, path.parent), link)
        os.replace(link, path)  # rename(2): atomic, the link now names the new version
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        link.unlink(missing_ok=True)
        raise
    _prune_versions(versions, keep={new.name, Path(os.readlink(path)).name})


# Old versions stay this long after they were replaced, so a reader that resolved the link
# before a rewrite can finish reading them.
VERSION_GRACE_SECONDS = 600.0


def _prune_versions(versions: Path, keep: set[str], grace: float | None = None) -> None:
    """Remove versions other than `keep` that were replaced more than `grace` seconds ago."""
    grace = VERSION_GRACE_SECONDS if grace is None else grace
    now = time.time()
    for p in versions.iterdir():
        if p.name not in keep and now - p.stat().st_mtime > grace:
            shutil.rmtree(p, ignore_errors=True)
