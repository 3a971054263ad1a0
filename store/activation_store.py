"""ActivationStore: the read side of a store, and the row bookkeeping writers rely on.

A store is a Zarr v3 group at a URL (see store/layout.py and docs/store.md). Units are
(rows, features) arrays; a unit is visible only once its ``complete`` attribute is true, which
a writer sets last, so readers never see a half-written unit on any backend.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from repscope.errors import InputError, NotFoundError, StorageError
from repscope.store import layout
from repscope.store.direct_read import ShardLayout, read_rows, shard_layout
from repscope.store.urls import open_zarr_store, option_values, redact, storage_errors


@dataclass(frozen=True)
class UnitInfo:
    """What a unit holds and how it is laid out.

    ``rows`` x ``features`` values in storage ``dtype`` (float32 or float16), converted at
    ingest from ``source_dtype``; ``chunk_rows``/``shard_rows`` rows per chunk/shard;
    ``nbytes`` the uncompressed size; ``fingerprint`` a hash of the stored bytes (same
    fingerprint, bit-identical data), used by incremental runs to detect changed units.
    """

    model: str
    layer: str
    rows: int
    features: int
    dtype: str
    source_dtype: str
    chunk_rows: int
    shard_rows: int
    nbytes: int
    fingerprint: str


@dataclass(frozen=True)
class RowSet:
    """The rows of an ingest: count, optional ids, and for token input the example map.

    ``ids`` has one entry per row (2-D input) or per example (3-D input, ``ids_level``
    "example"); ``example`` is the (rows,) row -> example map, ``mask`` the
    (examples, tokens) padding mask (True = padded, dropped) of 3-D input.
    """

    n_rows: int
    ids: np.ndarray | None = None
    ids_level: str = "row"
    example: np.ndarray | None = None
    mask: np.ndarray | None = None

    @property
    def fingerprint(self) -> str:
        return layout.row_fingerprint(self.n_rows, self.ids, self.example, self.mask)


def _close_matches(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return f"{hint} (known: {listed or 'none'})"


class ActivationStore:
    """A store of activation units (model, layer), each an array of shape (rows, features).

    Open with :meth:`open` (must exist) or :meth:`create` (created if missing). Instances pickle
    as their URL and storage options and reconnect lazily, so Ray workers can receive them.
    """

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self._raw_url = url
        self._options = dict(storage_options or {})
        self._secrets = option_values(self._options)
        self.url = redact(url, self._secrets)
        self._zstore: Any = None
        self._root_group: Any = None
        self._arrays: dict[tuple[str, str], Any] = {}
        self._direct: dict[tuple[str, str], ShardLayout | None] = {}  # see store/direct_read

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None) -> ActivationStore:
        """Open an existing store; :class:`NotFoundError` naming the URL if there is none."""
        store = cls(url, storage_options)
        with store._errors():
            try:
                group = zarr.open_group(store._store(), mode="r")
            except FileNotFoundError:
                raise NotFoundError(
                    f"no store at {store.url}; create one with 'repscope ingest'"
                ) from None
        store._check_format(group)
        store._root_group = group
        return store

    @classmethod
    def create(cls, url: str, storage_options: dict | None = None) -> ActivationStore:
        """Open the store at ``url``, creating an empty one if there is none."""
        store = cls(url, storage_options)
        with store._errors():
            group = zarr.open_group(store._store(), mode="a")
            if layout.ROOT_ATTR not in group.attrs:
                if next(iter(group.keys()), None) is not None:
                    raise InputError(
                        f"{store.url} holds a Zarr group that is not a repscope store; "
                        "choose an empty location"
                    )
                group.update_attributes({layout.ROOT_ATTR: {"format": layout.FORMAT}})
        store._check_format(group)
        store._root_group = group
        return store

    def _check_format(self, group: Any) -> None:
        meta = group.attrs.get(layout.ROOT_ATTR)
        if not isinstance(meta, dict):
            raise InputError(f"{self.url} is a Zarr group but not a repscope store")
        if meta.get("format") != layout.FORMAT:
            raise InputError(
                f"{self.url} has store format {meta.get('format')!r}; this repscope reads "
                f"format {layout.FORMAT}"
            )

    def _store(self) -> Any:
        if self._zstore is None:
            self._zstore = open_zarr_store(self._raw_url, self._options)
        return self._zstore

    def _root(self) -> Any:
        if self._root_group is None:
            with self._errors():
                self._root_group = zarr.open_group(self._store(), mode="r+")
        return self._root_group

    def _errors(self):
        return storage_errors(self._raw_url, self._options)

    def refresh(self) -> None:
        """Forget cached metadata, to see units written by other processes since opening."""
        self._root_group = None
        self._arrays.clear()
        self._direct.clear()

    def __reduce__(self):
        # Only the URL and options travel: zarr stores and fsspec sessions do not pickle
        # cheaply (or at all), and workers reconnect on first use.
        return (type(self), (self._raw_url, self._options))

    def __repr__(self) -> str:
        return f"ActivationStore({self.url!r})"

    # -- store-level metadata -----------------------------------------------------------

    def _meta(self) -> dict:
        return dict(self._root().attrs.get(layout.ROOT_ATTR, {}))

    @property
    def n_rows(self) -> int | None:
        """Rows shared by all units; None while the store is empty."""
        return self._meta().get("n_rows")

    @property
    def row_fingerprint(self) -> str | None:
        """Hex digest of the row set (ids if given, else row count and example map)."""
        return self._meta().get("row_fingerprint")

    def _rows_array(self, path: str) -> np.ndarray | None:
        with self._errors():
            try:
                arr = zarr.open_array(self._store(), path=path, mode="r")
            except FileNotFoundError:
                return None
            return np.asarray(arr[...])

    def row_ids(self) -> np.ndarray | None:
        """Row ids given at ingest: (rows,) for 2-D ingests, (examples,) for 3-D; or None."""
        if not self._meta().get("row_ids"):
            return None
        ids = self._rows_array(layout.ROW_IDS)
        if ids is not None and ids.dtype.kind in "TO":
            ids = np.array(ids.tolist(), dtype=str)  # numpy StringDType -> plain str array
        return ids

    def example_index(self) -> np.ndarray | None:
        """(rows,) int64 map from token row to example, for stores ingested from 3-D input."""
        return self._rows_array(layout.ROW_EXAMPLE) if self._meta().get("example_map") else None

    def padding_mask(self) -> np.ndarray | None:
        """(examples, tokens) bool, True where a token was padding (and not stored)."""
        return self._rows_array(layout.ROW_MASK) if self._meta().get("padding_mask") else None

    # -- units --------------------------------------------------------------------------

    def _unit_arrays(self) -> dict[tuple[str, str], Any]:
        """Every unit array, complete or not, keyed by (model, layer)."""
        with self._errors():
            try:
                units = zarr.open_group(self._store(), path=layout.UNITS, mode="r")
            except FileNotFoundError:
                return {}
            found = {}
            for path, node in units.members(max_depth=1):
                parts = path.split("/")
                if len(parts) == 2 and isinstance(node, zarr.Array):
                    found[(parts[0], parts[1])] = node
            return found

    def units(self) -> list[tuple[str, str]]:
        """(model, layer) of every complete unit: models, then layers, in natural order."""
        done = [key for key, arr in self._unit_arrays().items() if arr.attrs.get("complete")]
        return sorted(
            done, key=lambda key: (layout.natural_key(key[0]), layout.natural_key(key[1]))
        )

    def models(self) -> list[str]:
        """Models with at least one complete unit, in natural order (m2 before m10)."""
        return layout.natural_sorted({model for model, _ in self.units()})

    def layers(self, model: str) -> list[str]:
        """Complete layers of ``model`` in natural order; NotFoundError if the model is unknown."""
        units = self.units()
        layers = [layer for m, layer in units if m == model]
        if not layers:
            models = layout.natural_sorted({m for m, _ in units})
            raise NotFoundError(
                f"model {model!r} not in store {self.url}{_close_matches(model, models)}"
            )
        return layers

    def _array(self, model: str, layer: str) -> Any:
        """The complete array of a unit (cached), or NotFoundError naming model and layer."""
        key = (model, layer)
        if key in self._arrays:
            return self._arrays[key]
        with self._errors():
            try:
                arr = zarr.open_array(self._store(), path=layout.unit_path(model, layer), mode="r")
            except FileNotFoundError:
                arr = None
        if arr is None or not arr.attrs.get("complete"):
            layers = self.layers(model)  # an unknown model gets its own message
            state = (
                "is incomplete (interrupted ingest; ingest it again)"
                if arr is not None
                else "not found"
            )
            hint = _close_matches(layer, layers) if arr is None else ""
            raise NotFoundError(
                f"layer {layer!r} of model {model!r} {state} in store {self.url}{hint}"
            )
        self._arrays[key] = arr
        self._direct[key] = shard_layout(arr)
        return arr

    def unit_info(self, model: str, layer: str) -> UnitInfo:
        """Shape, dtypes, chunking and content fingerprint of one unit."""
        arr = self._array(model, layer)
        rows, features = arr.shape
        shards = arr.shards or arr.chunks
        return UnitInfo(
            model=model,
            layer=layer,
            rows=int(rows),
            features=int(features),
            dtype=str(arr.dtype),
            source_dtype=str(arr.attrs.get("source_dtype", arr.dtype)),
            chunk_rows=int(arr.chunks[0]),
            shard_rows=int(shards[0]),
            nbytes=int(rows * features * arr.dtype.itemsize),
            fingerprint=str(arr.attrs.get("fingerprint", "")),
        )

    def unit_attributes(self, model: str, layer: str) -> dict:
        """The ``attributes`` its writer recorded with a complete unit ({} if none)."""
        return dict(self._array(model, layer).attrs.get("attributes") or {})

    def read(self, model: str, layer: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of a unit: ndarray of shape (stop - start, features), storage dtype.

        Reads only the chunks that hold those rows; read whole shards for best throughput.
        """
        arr = self._array(model, layer)
        rows = arr.shape[0]
        stop = rows if stop is None else stop
        if not (0 <= start <= stop <= rows):
            raise InputError(
                f"model {model!r}, layer {layer!r}: rows {start}:{stop} out of range 0:{rows}"
            )
        with self._errors():
            try:
                direct = self._direct.get((model, layer))
                if direct is not None:
                    return read_rows(direct, start, stop)
                return np.asarray(arr[start:stop])
            except (ValueError, RuntimeError) as exc:
                # Codec failures (a checksum mismatch, a truncated shard) mean a corrupt chunk.
                raise StorageError(
                    f"corrupt data in store {self.url}, model {model!r}, layer {layer!r}, "
                    f"rows {start}:{stop}: {type(exc).__name__}: {exc}"
                ) from None

    # -- row bookkeeping for writers ----------------------------------------------------

    def _other_units(self, model: str, layer: str) -> list[tuple[str, str]]:
        return [u for u in self.units() if u != (model, layer)]

    def _check_rows(self, rows: RowSet, model: str, layer: str, ctx: str) -> bool:
        """Refuse rows that differ from the store's; True if the store's rows are already set.

        Rows are set by the first complete unit; while no other unit is complete (empty
        store, or overwriting the only unit) a writer may (re)define them.
        """
        self._root_group = None  # other writers may have committed rows since we opened
        if not self._other_units(model, layer):
            return False
        meta = self._meta()
        if meta.get("n_rows") != rows.n_rows:
            raise InputError(
                f"{ctx}: {rows.n_rows} rows, but the store's units have {meta.get('n_rows')} "
                "rows; every unit of a store must have the same rows in the same order"
            )
        if rows.ids is not None:
            stored = self.row_ids()
            if stored is None:
                raise InputError(
                    f"{ctx}: row_ids given, but the store's units were ingested without row ids; "
                    "ingest without row_ids or into a new store"
                )
            if meta.get("row_ids_level", "row") != rows.ids_level or layout.canonical_ids(
                stored
            ) != layout.canonical_ids(rows.ids):
                diff = _first_difference(stored, rows.ids)
                raise InputError(f"{ctx}: row_ids differ from the store's {diff}")
        if rows.example is not None:
            stored_map = self.example_index()
            if stored_map is None:
                raise InputError(
                    f"{ctx}: token (3-D) input, but the store's rows are not token rows of "
                    "examples; ingest 2-D (rows, features) arrays into this store"
                )
            same_mask = (rows.mask is None) == (self.padding_mask() is None) and (
                rows.mask is None or np.array_equal(self.padding_mask(), rows.mask)
            )
            if not np.array_equal(stored_map, rows.example) or not same_mask:
                raise InputError(
                    f"{ctx}: token layout (example map or padding mask) differs from the "
                    "store's; every unit must have the same examples and tokens"
                )
        return True

    def _commit_rows(self, rows: RowSet) -> None:
        """Write the row arrays and the row metadata (first complete unit only)."""
        root = self._root()
        with self._errors():
            if "rows" in root:
                del root["rows"]
            store = self._store()
            if rows.ids is not None:
                ids = rows.ids
                if ids.dtype.kind in "iu":
                    zarr.create_array(store, name=layout.ROW_IDS, data=ids, overwrite=True)
                else:
                    # Variable-length UTF-8: the string dtype with a Zarr v3 extension spec
                    # (fixed-width numpy unicode has none).
                    arr = zarr.create_array(
                        store, name=layout.ROW_IDS, shape=ids.shape, dtype=str, overwrite=True
                    )
                    arr[:] = ids.astype(str)
            if rows.example is not None:
                zarr.create_array(
                    store,
                    name=layout.ROW_EXAMPLE,
                    data=rows.example.astype("<i8"),
                    overwrite=True,
                )
            if rows.mask is not None:
                zarr.create_array(store, name=layout.ROW_MASK, data=rows.mask, overwrite=True)
            meta = {
                "format": layout.FORMAT,
                "n_rows": int(rows.n_rows),
                "row_fingerprint": rows.fingerprint,
                "row_ids": rows.ids is not None,
                "row_ids_level": rows.ids_level,
                "example_map": rows.example is not None,
                "padding_mask": rows.mask is not None,
            }
            root.update_attributes({layout.ROOT_ATTR: meta})

    def _forget(self, model: str, layer: str) -> None:
        self._arrays.pop((model, layer), None)
        self._direct.pop((model, layer), None)


def _first_difference(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape:
        return f"({a.shape[0]} stored, {b.shape[0]} given)"
    sa, sb = a.astype(str), b.astype(str)
    i = int(np.argmax(sa != sb))
    return f"(first difference at index {i}: stored {str(sa[i])!r}, given {str(sb[i])!r})"
