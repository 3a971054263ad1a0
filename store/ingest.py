"""Ingest: put arrays and .npy/.npz files into a store as units, with bounded memory.

Structure, dtype, names and row alignment are checked before anything is written; NaN/Inf
and overflow are found while streaming (a large input is not read twice), in which case the
partly written unit is removed and never becomes visible.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from repscope.errors import InputError, NotFoundError
from repscope.store import layout
from repscope.store.activation_store import ActivationStore, UnitInfo
from repscope.store.hints import setting
from repscope.store.rows import RowSet
from repscope.store.sources import as_source
from repscope.store.validate import (
    check_name,
    check_ndim,
    check_padding_mask,
    check_row_ids,
    check_source_dtype,
    check_storage_dtype,
    convert_block,
    where,
)
from repscope.store.writer import UnitWriter

# Source bytes read per block (at most one shard): large enough for fast reads, small next to
# the default shard.
_BLOCK_BYTES = 32 << 20


def ingest_array(
    store: ActivationStore,
    model: str,
    layer: str,
    array: Any,
    *,
    dtype: str = "float32",
    row_ids: Any = None,
    padding_mask: Any = None,
    chunk_bytes: int = layout.DEFAULT_CHUNK_BYTES,
    shard_bytes: int = layout.DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    _source: object | None = None,
) -> UnitInfo:
    """Write ``array`` as unit (model, layer) and return its :class:`UnitInfo`.

    ``array``: ndarray (np.memmap included), dask array, torch tensor or array-like, of shape
    (rows, features), or (examples, tokens, features) for token activations: then every
    token is a row, the row -> example map is stored, and tokens where ``padding_mask``
    ((examples, tokens) bool, True = padding) is set are dropped. ``row_ids``: one unique id
    per row (2-D) or per example (3-D). Stored as ``dtype`` (float32 or float16).

    Memory: about one shard (``shard_bytes``) plus one read block, whatever the input size.
    """
    ctx = where(check_name("model", model), check_name("layer", layer), _source)
    storage = check_storage_dtype(dtype)
    layout.check_sizes(chunk_bytes, shard_bytes)
    src, rows, keep = _prepare(array, row_ids, padding_mask, ctx)
    writer = UnitWriter(
        store,
        model,
        layer,
        features=src.shape[-1],
        dtype=storage,
        chunk_bytes=chunk_bytes,
        shard_bytes=shard_bytes,
        overwrite=overwrite,
        _row_set=rows,
        _source=_source,
    )
    try:
        _feed(writer, src, keep, min(_BLOCK_BYTES, shard_bytes))
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _prepare(array: Any, row_ids: Any, padding_mask: Any, ctx: str):
    """(source, row set, kept tokens or None) of an ingest, checked before anything is read."""
    src = as_source(array)
    check_source_dtype(src.dtype, ctx)
    check_ndim(src.shape, ctx)
    if len(src.shape) == 2:
        if padding_mask is not None:
            raise InputError(f"{ctx}: padding_mask applies to 3-D (examples, tokens, ...) input")
        rows = RowSet(
            n_rows=src.shape[0],
            ids=None if row_ids is None else check_row_ids(row_ids, src.shape[0], "rows", ctx),
        )
        return src, rows, None
    examples, tokens, _ = src.shape
    mask = None if padding_mask is None else check_padding_mask(padding_mask, examples, tokens, ctx)
    keep = np.ones((examples, tokens), bool) if mask is None else ~mask
    per_example = keep.sum(axis=1)
    rows = RowSet(
        n_rows=int(per_example.sum()),
        ids=None if row_ids is None else check_row_ids(row_ids, examples, "examples", ctx),
        ids_level="example",
        example=np.repeat(np.arange(examples, dtype=np.int64), per_example),
        mask=mask,
    )
    return src, rows, keep


def _feed(sink, src, keep: np.ndarray | None, block_bytes: int) -> None:
    """Append a source to ``sink`` (a UnitWriter or a _Fingerprint) block by block."""
    if keep is None:
        _append_rows(sink, src, block_bytes)
    else:
        _append_tokens(sink, src, keep, block_bytes)


class _Fingerprint:
    """What a UnitWriter would store, hashed instead of written: the unit fingerprint an
    ingest of the same source would get (to compare with a stored unit)."""

    def __init__(self, dtype: str, features: int, ctx: str) -> None:
        self._dtype, self._ctx = dtype, ctx
        self._hash = layout.ContentHash(dtype, features)

    def append(self, block: np.ndarray, *, _describe: Callable[[int], str]) -> None:
        self._hash.update(convert_block(np.asarray(block), self._dtype, self._ctx, _describe))

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _append_rows(writer, src, block_bytes: int) -> None:
    """Feed a (rows, features) source in blocks of about ``block_bytes``."""
    rows, features = src.shape
    step = max(1, block_bytes // max(1, features * src.dtype.itemsize))
    for start in range(0, rows, step):
        block = src.block(start, min(rows, start + step))
        writer.append(block, _describe=lambda i, s=start: f"row {s + i}")


def _append_tokens(writer, src, keep: np.ndarray, block_bytes: int) -> None:
    """Feed an (examples, tokens, features) source as token rows, dropping padded tokens."""
    examples, tokens, features = src.shape
    step = max(1, block_bytes // max(1, tokens * features * src.dtype.itemsize))
    row = 0
    for start in range(0, examples, step):
        stop = min(examples, start + step)
        flat_keep = keep[start:stop].reshape(-1)
        kept = np.flatnonzero(flat_keep)
        block = src.block(start, stop).reshape(-1, features)
        if kept.size != block.shape[0]:
            block = block[kept]

        def describe(i: int, s=start, r=row, k=kept) -> str:
            example, token = divmod(int(k[i]), tokens)
            return f"row {r + i} (example {s + example}, token {token})"

        writer.append(block, _describe=describe)
        row += kept.size


# -- files ------------------------------------------------------------------------------


def _npy_header(fp) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from an open .npy stream without reading the data."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    return tuple(shape), dtype


def _sources(model: str, path: Path, layer: str | None) -> list[tuple[str, Path, str | None]]:
    """(layer, file, npz key) for every layer of a source path, validated names included."""
    if not path.exists():
        raise NotFoundError(f"{where(model, layer)}: source file not found: {path}")
    if path.is_dir():
        files = layout.natural_sorted(p.name for p in path.glob("*.npy") if p.is_file())
        if layer is not None:
            files = [f for f in files if f == f"{layer}.npy"]
            if not files:
                raise NotFoundError(f"{where(model, layer)}: no {layer}.npy in directory {path}")
        if not files:
            raise NotFoundError(f"{where(model)}: no <layer>.npy files in directory {path}")
        return [(f[: -len(".npy")], path / f, None) for f in files]
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if layer is None:
            raise InputError(
                f"{where(model)} (file {path}): a .npy file holds one layer; name it with "
                f"{setting('layer')}"
            )
        return [(layer, path, None)]
    if suffix == ".npz":
        keys = _npz_keys(model, path)
        if layer is not None:
            if layer not in keys:
                raise NotFoundError(
                    f"{where(model, layer)}: no key {layer!r} in {path} (keys: {', '.join(keys)})"
                )
            keys = [layer]
        return [(key, path, key) for key in keys]
    raise InputError(
        f"{where(model, layer)}: unsupported source {path}: expected a .npy file, an .npz file "
        "or a directory of <layer>.npy files"
    )


def _npz_keys(model: str, path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            keys = [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{where(model)} (file {path}): not a readable .npz file: {exc}") from None
    if not keys:
        raise InputError(f"{where(model)} (file {path}): .npz file holds no arrays")
    return layout.natural_sorted(keys)


def _header(model: str, layer: str, path: Path, key: str | None) -> tuple[tuple[int, ...], Any]:
    """Shape and dtype of one layer's file (or .npz member), read from its header only."""
    ctx = where(model, layer, path)
    try:
        if key is None:
            with open(path, "rb") as fp:
                return _npy_header(fp)
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fp:
            return _npy_header(fp)
    except (ValueError, OSError, KeyError) as exc:
        raise InputError(f"{ctx}: not a readable .npy array: {exc}") from None


def _load(path: Path, key: str | None, ctx: str) -> np.ndarray:
    try:
        if key is None:
            # Memory-mapped: a large file streams shard by shard instead of loading whole.
            return np.load(path, mmap_mode="r", allow_pickle=False)
        with np.load(path, allow_pickle=False) as npz:
            return npz[key]  # .npz members cannot be memory-mapped; one layer at a time
    except (ValueError, OSError) as exc:
        raise InputError(f"{ctx}: cannot load array: {exc}") from None


def ingest_path(
    store: ActivationStore,
    model: str,
    source: str | Path,
    *,
    layer: str | None = None,
    progress: Callable[[str], None] | None = None,
    resume: bool = False,
    **kw: Any,
) -> list[UnitInfo]:
    """Ingest the layers of a file or directory as units of ``model``.

    ``source``: a ``.npy`` file (``layer`` required), an ``.npz`` file (every key a layer, or
    only ``layer``), or a directory (every ``<layer>.npy`` a layer, or only ``layer``). ``kw``
    goes to :func:`ingest_array` (dtype, row_ids, padding_mask, chunk_bytes, shard_bytes,
    overwrite). All headers, names, dtypes, row counts and existing units are checked before
    the first layer is written; ``progress`` receives one line per layer.

    ``resume``: finish an interrupted ingest of the same source. Units already in the store
    are kept if their content equals what this source would store (each such source is
    read once to compare) and refused, naming them, if it differs; the rest are ingested.
    Returns the UnitInfo of every layer, kept ones included.
    """
    check_name("model", model)
    if layer is not None:
        check_name("layer", layer)
    overwrite = bool(kw.get("overwrite", False))
    if resume and overwrite:
        raise InputError(
            f"{where(model)}: {setting('resume')} keeps units that match the source and "
            f"{setting('overwrite')} replaces them; choose one"
        )
    path = Path(source).expanduser()
    items = _sources(model, path, layer)

    # Everything that can be known from headers, checked before any layer is written.
    existing = set(store.units())
    first_rows: tuple[int, str] | None = None
    for name, file, key in items:
        check_name("layer", name)
        ctx = where(model, name, file)
        shape, dtype = _header(model, name, file, key)
        check_source_dtype(np.dtype(dtype), ctx)
        check_ndim(shape, ctx)
        if (model, name) in existing and not overwrite and not resume:
            raise InputError(
                f"{ctx}: unit already exists in store {store.url}; pass "
                f"{setting('overwrite')} to replace it, or {setting('resume')} to finish an "
                "interrupted ingest (units that match the source are kept)"
            )
        rows = shape[0] if len(shape) == 2 else shape[0] * shape[1]
        if kw.get("padding_mask") is None and len(shape) == 3 or len(shape) == 2:
            if first_rows is not None and rows != first_rows[0]:
                raise InputError(
                    f"{ctx}: {rows} rows, but layer {first_rows[1]!r} has {first_rows[0]}; "
                    "every layer must have the same rows"
                )
            first_rows = first_rows or (rows, name)
            others = [u for u in existing if u[0] != model or u[1] != name]
            if others and store.n_rows is not None and rows != store.n_rows:
                raise InputError(
                    f"{ctx}: {rows} rows, but the store's units have {store.n_rows} rows; "
                    "every unit of a store must have the same rows in the same order"
                )

    kept: dict[str, UnitInfo] = {}
    if resume:
        # Every kept unit is compared before anything is written: a differing one stops
        # the resume with nothing changed.
        for name, file, key in items:
            if (model, name) in existing:
                ctx = where(model, name, file)
                if progress is not None:
                    progress(f"comparing {model}/{name} with {_what(file, key)}")
                kept[name] = _matching_unit(store, model, name, _load(file, key, ctx), ctx, kw)

    infos = []
    for name, file, key in items:
        if name in kept:
            if progress is not None:
                progress(f"keeping {model}/{name}: already in the store with the same content")
            infos.append(kept[name])
            continue
        ctx = where(model, name, file)
        if progress is not None:
            progress(f"ingesting {model}/{name} from {_what(file, key)}")
        array = _load(file, key, ctx)
        infos.append(ingest_array(store, model, name, array, _source=file, **kw))
    return infos


def _what(file: Path, key: str | None) -> str:
    return f"{file}[{key}]" if key is not None else str(file)


def _matching_unit(
    store: ActivationStore, model: str, layer: str, array: Any, ctx: str, kw: dict
) -> UnitInfo:
    """The stored unit's info if it holds exactly what ingesting ``array`` would store."""
    info = store.unit_info(model, layer)
    storage = check_storage_dtype(kw.get("dtype", "float32"))
    src, rows, keep = _prepare(array, kw.get("row_ids"), kw.get("padding_mask"), ctx)
    same = (info.dtype, info.rows, info.features) == (storage, rows.n_rows, src.shape[-1])
    if same:
        fingerprint = _Fingerprint(storage, src.shape[-1], ctx)
        _feed(fingerprint, src, keep, _BLOCK_BYTES)
        same = fingerprint.hexdigest() == info.fingerprint
    if not same:
        raise InputError(
            f"{ctx}: the unit in store {store.url} ({info.rows} x {info.features} "
            f"{info.dtype}) differs from this source; nothing was written. Pass "
            f"{setting('overwrite')} to replace it"
        )
    return info
