"""Results stores: one Zarr group per job, readable with ``xarray.open_zarr(output)``.

Layout (the interface other tools read):
- one data variable per metric, dims ("x", "y"), float64, the same unit order on both axes;
  entry [i, j] is metric(unit i, unit j) (for pwcca: weighted by unit i's canonical variates);
- coordinates ``model_x``, ``layer_x`` (on x) and ``model_y``, ``layer_y`` (on y);
- variable attributes ``direction`` ("similarity" or "distance");
- group attributes: ``repscope_version``, ``spec`` (JSON, without storage options),
  ``spec_identity`` (JSON: what must match for a rerun to reuse the output),
  ``store_fingerprint``, ``rows`` ([start, stop)), ``created`` (UTC ISO 8601),
  ``directions`` (JSON {metric: direction}) and ``repscope_results``: the id of the write
  that made this store (unique per write; what proves repscope wrote it, jobs/outputs.py).

On a local file system the output is a plain folder, so ``cp -r`` and ``rm -r`` work on it
as on any folder. Replacement is atomic: the new result is written complete into a sibling
``.<name>.repscope-<id>/data`` and swapped with the output by one
``renameat2(RENAME_EXCHANGE)`` (Linux); the previous result, now in the sibling, is then
removed. Where the exchange is not available (other systems, some network file systems) two
renames take its place, and for a moment there is no output. ``open_results`` reads one
whole result in either case: it compares the write id it loaded with the output's id after
reading and reads again if they differ, and it waits out the moment between two renames. A
lazy reader of its own (``xarray.open_zarr`` without ``.load()``) that overlaps a rewrite
may fail or see a mixture; load, or use ``open_results``.

Object stores have no rename: there a journal (`<output>.staging` written complete, then a
`<output>.commit` marker, then the copy into place) makes a crash roll forward at the next
write, and ``open_results`` reads the staged copy while a commit is in flight; only a raw
reader of the output during the copy may see a mixture (docs/jobs.md). The output lock
(jobs/lock.py) keeps writers apart everywhere; jobs/outputs.py says what may be replaced.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import json
import os
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from repscope import __version__
from repscope.errors import ConflictError, InputError, NotFoundError, StorageError
from repscope.jobs.outputs import (
    MARKER,
    TEMP_OWNER,
    existing_output,
    is_results_attrs,
    legacy_link,
    read_root_attrs,
    remove_legacy_versions,
    temp_name,
    temp_pattern,
)


def local_path(url: str) -> Path | None:
    """The local path of a URL, or None for object storage (anything with another scheme)."""
    from repscope.store import urls

    return urls.local_path(url) if urls.scheme_of(url) == "file" else None


def build_results(
    matrices: dict[str, np.ndarray],
    units: Sequence[tuple[str, str]],
    directions: dict[str, str],
    attrs: dict[str, Any],
    keys: Sequence[str] | None = None,
    bounds: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    level: float = 0.9,
    unit_coords: dict[str, np.ndarray] | None = None,
) -> dict:
    """A result of (U, U) matrices with labelled unit axes, as a plain dict in the form of
    xarray's ``Dataset.to_dict(data="array")`` (``to_zarr`` writes it without xarray, which
    a job would otherwise spend a second importing; ``to_dataset`` makes it a Dataset).

    keys: optional content keys of the units (nightly runs), stored as coordinates
    ``key_x`` and ``key_y``. bounds: optional {metric: (lower, upper)} confidence bounds,
    stored as variables ``<metric>_lower`` and ``<metric>_upper``. unit_coords: optional
    per-unit values (U,), each stored as coordinates ``<name>_x`` and ``<name>_y`` (a job's
    ``rank`` and ``features``)."""

    def variable(dims: tuple[str, ...], data: np.ndarray, attrs: dict | None = None) -> dict:
        return {"dims": dims, "data": data, "attrs": attrs or {}}

    # Object arrays of str become Zarr v3's variable-length UTF-8 strings.
    models = np.array([m for m, _ in units], dtype=object)
    layers = np.array([layer for _, layer in units], dtype=object)
    data_vars = {
        name: variable(("x", "y"), np.asarray(matrix, dtype=np.float64),
                       {"direction": directions[name]})
        for name, matrix in matrices.items()
    }
    for name, (lower, upper) in (bounds or {}).items():
        for side, values in (("lower", lower), ("upper", upper)):
            data_vars[f"{name}_{side}"] = variable(
                ("x", "y"), np.asarray(values, dtype=np.float64),
                {"bound_of": name, "confidence_level": level, "method": "row-shard bootstrap"},
            )
    coords = {
        "model_x": variable(("x",), models),
        "layer_x": variable(("x",), layers),
        "model_y": variable(("y",), models),
        "layer_y": variable(("y",), layers),
    }
    for name, values in (unit_coords or {}).items():
        coords[f"{name}_x"] = variable(("x",), np.asarray(values))
        coords[f"{name}_y"] = variable(("y",), np.asarray(values))
    if keys is not None:
        coords["key_x"] = variable(("x",), np.array(list(keys), dtype=object))
        coords["key_y"] = variable(("y",), np.array(list(keys), dtype=object))
    base = {
        "repscope_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "directions": json.dumps(directions),
    }
    return {"coords": coords, "data_vars": data_vars, "attrs": {**base, **attrs}}


def to_dataset(results: dict):
    """``build_results``' dict as the xarray Dataset a reader of the store gets."""
    import xarray as xr

    return xr.Dataset.from_dict(results)


def new_write_id() -> str:
    """A unique id for one write of a results store: UTC time, then random hex."""
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"


class _Changed(Exception):
    """The output was replaced while it was read: read it again."""


# How long open_results keeps reading again while the output is being replaced.
READ_ATTEMPTS = 40


def open_results(url: str, storage_options: dict | None = None):
    """Load a results store into memory as an xarray Dataset: one whole result, never parts
    of two (module docs). NotFoundError if nothing is there; InputError if what is there is
    not a results store (an activation store says so, with the command to use instead);
    StorageError if the backend fails."""
    from repscope.store import redact

    for attempt in range(READ_ATTEMPTS):
        try:
            with _reading_errors(url, storage_options):
                return _read_once(url, storage_options)
        except _Changed:
            time.sleep(min(0.01 * (attempt + 1), 0.2))
    raise ConflictError(f"results store at {redact(url)} kept changing while being read: "
                        "another run is rewriting it; read it when that run is done")


@contextmanager
def _reading_errors(url: str, storage_options: dict | None) -> Iterator[None]:
    """Backend failures as StorageError (exit 1), missing credentials as InputError (exit
    2: the user's storage options), both redacted; repscope's own errors pass."""
    from repscope.store.urls import option_values, redact, storage_errors

    with storage_errors(url, storage_options):
        try:
            yield
        except Exception as exc:
            if type(exc).__name__ not in ("PartialCredentialsError", "NoCredentialsError"):
                raise
            detail = redact(str(exc), option_values(storage_options))
            raise InputError(f"results store {redact(url)}: incomplete credentials in the "
                             f"storage options ({detail})") from None


def _located(url: str, storage_options: dict | None):
    """(filesystem, where the complete result is, local path or None, committing)."""
    import fsspec

    path = local_path(url)
    if path is not None:
        return fsspec.filesystem("file"), os.path.realpath(path), path, False
    fs, root = _fs_path(url, storage_options)
    committing = fs.exists(_marker(url, storage_options)[1])
    # an object store mid-commit: its staged copy is the complete new result
    where = _fs_path(_staging(url), storage_options)[1] if committing else root
    return fs, where, None, committing


def _read_once(url: str, storage_options: dict | None):
    fs, where, path, committing = _located(url, storage_options)
    attrs = read_root_attrs(fs, where)
    if attrs is None:
        if path is not None and _swapping(Path(os.path.abspath(path))):
            raise _Changed
        raise NotFoundError(f"no results store at {_shown(url)}")
    _check_results(url, attrs)
    source = where if path is not None else (_staging(url) if committing else url)
    try:
        loaded = _load(source, storage_options)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        if MARKER in attrs:
            now = read_root_attrs(fs, os.path.realpath(path) if path is not None else where)
            changed = now is None or now.get(MARKER) != attrs[MARKER]
        else:  # repscope 0.2's layout: a version replaced while read
            changed = path is not None and os.path.realpath(path) != where
        if changed:
            raise _Changed from exc
        raise InputError(f"results store {_shown(url)} is damaged: "
                         f"{type(exc).__name__}: {str(exc)[:200]}") from None
    written = loaded.attrs.get(MARKER)
    if path is not None:
        if written is None:  # repscope 0.2: a version pruned while read reads as fill values
            if os.path.isdir(where):
                return loaded
            raise _Changed
        now = read_root_attrs(fs, os.path.realpath(path))
    else:
        if fs.exists(_marker(url, storage_options)[1]) != committing:
            raise _Changed
        now = read_root_attrs(fs, where)
    if now is None or now.get(MARKER) != written:
        raise _Changed
    return loaded


def _load(where: str, storage_options: dict | None):
    import xarray as xr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        # chunks=None: numpy, not dask (xarray imports dask, a second, if it is installed).
        with xr.open_zarr(where, storage_options=storage_options or None, zarr_format=3,
                          consolidated=True, chunks=None) as ds:
            return ds.load()


def _check_results(url: str, attrs: dict) -> None:
    if is_results_attrs(attrs):
        return
    if "repscope" in attrs:
        raise InputError(f"{_shown(url)} is an activation store, not a results store: "
                         f"`repscope inspect {_shown(url)}` lists its units, and "
                         "`repscope run SPEC` compares them")
    raise InputError(f"{_shown(url)} is a Zarr store but not a results store written by "
                     "repscope")


def _shown(url: str) -> str:
    from repscope.store import redact

    return redact(url)


def _swapping(path: Path) -> bool:
    """True while a write of ``path`` is between its two renames (no RENAME_EXCHANGE)."""
    pattern = temp_pattern(path.name)
    try:
        return any(pattern.match(p.name) and (p / "old").exists()
                   for p in path.parent.iterdir())
    except OSError:
        return False


def existing_identity(url: str, storage_options: dict | None = None) -> str | None:
    """The spec identity recorded in an existing results store, or None if there is none.
    Read from the store's root attributes (no xarray: a job's first second); a result between
    the two renames of its replacement is read whole (open_results) instead."""
    with _reading_errors(url, storage_options):
        fs, where, _, _ = _located(url, storage_options)
        attrs = read_root_attrs(fs, where)
    if attrs is None:
        try:
            attrs = open_results(url, storage_options).attrs
        except NotFoundError:
            return None
    _check_results(url, attrs)
    return attrs.get("spec_identity", "")


def check_output(url: str, identity: str, storage_options: dict | None, overwrite: bool) -> None:
    """Refuse to replace results of a different spec unless overwrite is set. (What is not
    a results store at all is refused whatever overwrite says: jobs.outputs.)"""
    from repscope.store import redact

    found = existing_identity(url, storage_options)
    if found is not None and found != identity and not overwrite:
        raise ConflictError(
            f"output {redact(url)} holds results of a different job spec; choose another "
            "output or pass --overwrite to replace them"
        )


# xarray's _FillValue attribute of float variables: base64 of a float64 NaN's bytes (for
# float32 data too).
_NAN_FILL = base64.b64encode(np.float64(np.nan).tobytes()).decode()


def to_zarr(results, url: str, storage_options: dict | None) -> None:
    """Write results (``build_results``' dict, or an xarray Dataset) as a consolidated Zarr
    v3 group, laid out as xarray's ``Dataset.to_zarr`` lays it out but written with zarr
    alone (writing imports neither xarray nor pandas nor dask: a second of a job's fixed
    cost). A new write id unless the results have one."""
    import zarr

    results = _as_results(results)
    coords, data_vars = results.get("coords", {}), results.get("data_vars", {})
    attrs = {k: _json_safe(v) for k, v in results.get("attrs", {}).items()}
    attrs.setdefault(MARKER, new_write_id())
    # xarray's "coordinates" attributes: the non-dimension coordinates within a variable's
    # dims; those within no data variable's are named in the group's.
    others = sorted(name for name, c in coords.items() if name not in c["dims"])
    spanned = {name: [c for c in others if set(coords[c]["dims"]) <= set(v["dims"])]
               for name, v in data_vars.items()}
    alone = [c for c in others if not any(c in names for names in spanned.values())]
    if alone:
        attrs.setdefault("coordinates", " ".join(alone))
    with warnings.catch_warnings():
        # Consolidated metadata lets xarray.open_zarr(output) open with one read; zarr warns
        # that it is not yet part of the v3 spec.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        group = zarr.open_group(url, mode="w", zarr_format=3, attributes=attrs,
                                storage_options=storage_options or None)
        for name, var in {**coords, **data_vars}.items():
            data = np.asarray(var["data"])
            var_attrs = {k: _json_safe(v) for k, v in var.get("attrs", {}).items()}
            if spanned.get(name):
                var_attrs["coordinates"] = " ".join(spanned[name])
            floating = data.dtype.kind == "f"
            if floating:
                var_attrs["_FillValue"] = _NAN_FILL
            array = group.create_array(
                name, shape=data.shape, dimension_names=var["dims"],
                # object (ours) or StringDType (xarray's reading) arrays of str
                dtype=str if data.dtype.kind in "OT" else data.dtype,
                fill_value=np.nan if floating else None, attributes=var_attrs)
            array[...] = data
        zarr.consolidate_metadata(group.store)


def _as_results(results) -> dict:
    """Results as ``build_results``' dict, from that dict or an xarray Dataset."""
    return results if isinstance(results, dict) else results.to_dict(data="array")


def _json_safe(value):
    """An attribute value as xarray writes it: arrays as lists, numpy scalars as Python's."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


def _staging(url: str) -> str:
    return url.rstrip("/") + ".staging"


def _fs_path(url: str, storage_options: dict | None):
    import fsspec

    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def _marker(url: str, storage_options: dict | None):
    """(file system, path) of an object-store output's commit marker."""
    return _fs_path(url.rstrip("/") + ".commit", storage_options)


def roll_forward(url: str, storage_options: dict | None) -> None:
    """Finish an interrupted commit on an object store: the staged result is complete (the
    marker is written only after it), so copy it over the output, then drop the marker and
    the staging copy."""
    fs, marker = _marker(url, storage_options)
    if not fs.exists(marker):
        return
    import xarray as xr  # only here: a commit that did not finish

    with xr.open_zarr(_staging(url), storage_options=storage_options or None,
                      zarr_format=3, chunks=None) as staged:
        _commit(staged.load(), url, storage_options)  # keeps the staged write id


def _commit(results, url: str, storage_options: dict | None) -> None:
    """The journal's step (3): the staged result written over the output, then the marker
    and the staging copy removed."""
    to_zarr(results, url, storage_options)
    fs, marker = _marker(url, storage_options)
    fs.rm(marker)
    staging_fs, staging = _fs_path(_staging(url), storage_options)
    staging_fs.rm(staging, recursive=True)


def _write_object_store(results: dict, url: str, storage_options: dict | None) -> None:
    """Object stores have no rename. A journal instead: (1) the complete result is written
    to `<output>.staging`, (2) `<output>.commit` marks it complete, (3) it is copied over the
    output and the marker removed. A crash after (2) is rolled forward by the next write, and
    open_results reads the staged copy while a marker exists, so neither a crash nor our
    readers see a mixture; a raw reader of the output during step (3) may."""
    roll_forward(url, storage_options)
    fs, path = _fs_path(url, storage_options)
    existing_output(fs, path.rstrip("/"), url)  # never replace what repscope did not write
    staging = _fs_path(_staging(url), storage_options)[1]
    if fs.exists(staging):  # left by a writer that died before its commit point
        attrs = read_root_attrs(fs, staging)
        if attrs is None or not is_results_attrs(attrs):
            raise InputError(f"{_shown(url)}.staging exists and is not repscope's staging "
                             "copy: move it away")
        fs.rm(staging, recursive=True)
    to_zarr(results, _staging(url), storage_options)
    fs, marker = _marker(url, storage_options)
    with fs.open(marker, "w") as f:
        f.write("committing")
    _commit(results, url, storage_options)  # what is staged, without reading it back


def write_results(results, url: str, storage_options: dict | None = None) -> None:
    """Write results (``build_results``' dict, or an xarray Dataset) so that readers never
    see a partial result (module docs).

    Refuses (InputError) to replace anything but a results store repscope wrote."""
    results = _as_results(results)
    results = {**results, "attrs": {**results.get("attrs", {}), MARKER: new_write_id()}}
    path = local_path(url)
    if path is None:
        _write_object_store(results, url, storage_options)
    else:
        _write_local(results, Path(os.path.abspath(path)))


def _write_local(results: dict, path: Path) -> None:
    import fsspec

    legacy = legacy_link(path)  # repscope 0.2's layout: replaced by a plain folder
    # A link of the user's own is kept: the result is written where it points.
    target = path if legacy or not path.is_symlink() else Path(os.path.realpath(path))
    found = "results" if legacy else existing_output(
        fsspec.filesystem("file"), str(target), str(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / temp_name(target.name, uuid.uuid4().hex[:8])
    temp.mkdir()
    try:
        _write_owner(temp, target.name, complete=False)
        try:
            to_zarr(results, str(temp / "data"), None)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise StorageError(f"disk full while writing results {path} "
                               f"({os.strerror(exc.errno)}): free some space and rerun; "
                               "nothing was replaced") from None
        _write_owner(temp, target.name, complete=True)
        if found != "results":  # nothing there, or an empty folder: rename(2) replaces it
            os.rename(temp / "data", target)
        elif not exchange(temp / "data", target):
            os.rename(target, temp / "old")  # for a moment no output: open_results waits
            os.rename(temp / "data", target)
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # the previous result, or an unused new one
    if legacy:
        remove_legacy_versions(path)


def _write_owner(temp: Path, name: str, complete: bool) -> None:
    """owner.json: what proves a temporary folder is repscope's, and whether its data/ is
    complete (jobs.outputs.clean_leftovers finishes an interrupted swap with it)."""
    owner = {"repscope": TEMP_OWNER, "output": name, "pid": os.getpid(),
             "complete": complete}
    part = temp / f"owner.json.{uuid.uuid4().hex[:8]}"
    part.write_text(json.dumps(owner))
    os.replace(part, temp / "owner.json")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 with RENAME_EXCHANGE). False
    where the system or file system offers no such call; OSError for any other failure."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc before 2.28, or another C library
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
