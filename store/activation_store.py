"""ActivationStore: the read side of a store, and :func:`open_store`.

A store is a Zarr v3 group at a URL (store/layout.py, docs/store.md). Units (model, layer)
are (rows, features) arrays, all with the same rows. Each unit has immutable *versions*; a
reader resolves a unit's current version once and reads only it, so an ingest that replaces
the unit meanwhile never mixes old and new rows into one read sequence. Writers go through
:meth:`ActivationStore.writer` (store/writer.py), which keeps its bookkeeping in the store's
:class:`~repscope.store.catalog.Catalog`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import numpy as np

from repscope.errors import (
    InputError,
    IntegrityError,
    NotFoundError,
    UnitChangedError,
)
from repscope.store import layout
from repscope.store.catalog import Catalog, UnitEntry
from repscope.store.direct_read import (
    ShardError,
    ShardLayout,
    read_rows,
    read_rows_remote,
    shard_layout,
)
from repscope.store.urls import open_zarr_store, redact, secrets_of, storage_errors
from repscope.store.validate import shown


@dataclass(frozen=True)
class UnitInfo:
    """What a unit holds and how it is laid out.

    ``rows`` x ``features`` values in storage ``dtype`` (float32 or float16), converted at
    ingest from ``source_dtype``; ``chunk_rows``/``shard_rows`` rows per chunk/shard;
    ``nbytes`` the uncompressed size in bytes; ``fingerprint`` a hash of the stored bytes
    (same fingerprint, bit-identical data), used by incremental runs to detect changed
    units; ``version`` the immutable version these describe: pass it to
    :meth:`ActivationStore.read` to read exactly this data (format-1 stores have no
    versions: there it is the fingerprint).
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
    version: str


@dataclass
class _Opened:
    """A unit version's array, opened once: its entry, array and direct-read layout."""

    entry: UnitEntry
    array: Any
    direct: ShardLayout | None


def _close_matches(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(str(name)[:300], names, n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return f"{hint} (known: {listed or 'none'})"


def open_store(
    url: str, mode: str = "r", storage_options: dict | None = None
) -> ActivationStore:
    """Open the activation store at ``url`` (a path, ``file://``, ``memory://``, ``s3://``,
    ``gs://``).

    ``mode`` "r": the store must exist (NotFoundError otherwise); "a": it is created if
    missing. Reading and writing work in both modes (``store.writer(model, layer)``).
    ``storage_options``: fsspec options for remote URLs (credentials, endpoint).
    """
    if mode == "r":
        return ActivationStore.open(url, storage_options)
    if mode == "a":
        return ActivationStore.create(url, storage_options)
    raise InputError(
        f"mode {redact(repr(mode))[:40]} is not a store mode: use 'r' (must exist) or 'a' "
        "(create if missing)"
    )


class ActivationStore:
    """A store of activation units (model, layer), each an array of shape (rows, features).

    Open with :func:`open_store`, :meth:`open` (must exist) or :meth:`create` (created if
    missing). Instances pickle as their URL and storage options and reconnect lazily, so
    Ray workers can receive them. Reads without a ``version`` use the version this object
    resolved first for that unit (until :meth:`refresh`).
    """

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self._raw_url = url
        self._options = dict(storage_options or {})
        self._secrets = secrets_of(url, self._options)
        self.url = redact(url, self._secrets)
        self._catalog: Catalog | None = None
        self._opened: dict[str, _Opened] = {}  # by version path

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None) -> ActivationStore:
        """Open an existing store; :class:`NotFoundError` naming the URL if there is none."""
        store = cls(url, storage_options)
        store.catalog.format  # noqa: B018  (reads and checks the root document)
        return store

    @classmethod
    def create(cls, url: str, storage_options: dict | None = None) -> ActivationStore:
        """Open the store at ``url``, creating an empty one if there is none."""
        store = cls(url, storage_options)
        store.catalog.create()
        return store

    @property
    def catalog(self) -> Catalog:
        """The store's bookkeeping (versions, rows): the interface writers use."""
        if self._catalog is None:
            with self._errors():
                zstore = open_zarr_store(self._raw_url, self._options)
            self._catalog = Catalog(zstore, self.url, self._errors)
        return self._catalog

    @property
    def format(self) -> int:
        """The store's format: 2 (written by this version) or 1 (read only)."""
        return self.catalog.format

    def _errors(self):
        return storage_errors(self._raw_url, self._options)

    def refresh(self) -> None:
        """Forget cached metadata, to see units written by other processes since opening."""
        if self._catalog is not None:
            self._catalog.forget()
        self._opened.clear()

    def __reduce__(self):
        # Only the URL and options travel: zarr stores and fsspec sessions do not pickle
        # cheaply (or at all), and workers reconnect on first use.
        return (type(self), (self._raw_url, self._options))

    def __repr__(self) -> str:
        return f"ActivationStore({self.url!r})"

    def writer(self, model: str, layer: str, **kw: Any):
        """A :class:`~repscope.store.writer.UnitWriter` for unit (model, layer).

        Use it as a context manager: append (batch_rows, features) batches inside the
        block; the unit becomes visible when the block exits normally, and an exception
        discards it. ``kw``: features, dtype, rows, row_ids, chunk_bytes, shard_bytes,
        overwrite (see UnitWriter).
        """
        from repscope.store.writer import UnitWriter

        return UnitWriter(self, model, layer, **kw)

    # -- rows ----------------------------------------------------------------------------

    @property
    def n_rows(self) -> int | None:
        """Rows shared by all units; None while the store is empty."""
        rows = self.catalog.rows()
        return None if rows is None else rows.n_rows

    @property
    def row_fingerprint(self) -> str | None:
        """Hex digest of the row set (ids if given, else row count and example map)."""
        rows = self.catalog.rows()
        return None if rows is None else rows.row_fingerprint

    def row_ids(self) -> np.ndarray | None:
        """Row ids given at ingest: (rows,) for 2-D ingests, (examples,) for 3-D; or None."""
        rows = self.catalog.rows()
        if rows is None or not rows.row_ids:
            return None
        ids = self.catalog.row_array(layout.ROW_IDS)
        if ids is not None and ids.dtype.kind in "TO":
            ids = np.array(ids.tolist(), dtype=str)  # numpy StringDType -> plain str array
        return ids

    def example_index(self) -> np.ndarray | None:
        """(rows,) int64 map from token row to example, for stores ingested from 3-D input."""
        rows = self.catalog.rows()
        return self.catalog.row_array(layout.ROW_EXAMPLE) if rows and rows.example_map else None

    def padding_mask(self) -> np.ndarray | None:
        """(examples, tokens) bool, True where a token was padding (and not stored)."""
        rows = self.catalog.rows()
        return self.catalog.row_array(layout.ROW_MASK) if rows and rows.padding_mask else None

    # -- units ---------------------------------------------------------------------------

    def units(self) -> list[tuple[str, str]]:
        """(model, layer) of every complete unit: models, then layers, in natural order."""
        done = [(e.model, e.layer) for e in self.catalog.units()]
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
                f"model {shown(model)} not in store {self.url}{_close_matches(model, models)}"
            )
        return layers

    def _entry(self, model: str, layer: str) -> UnitEntry:
        """The unit's resolved entry, or NotFoundError naming model and layer."""
        found = self.catalog.entry(model, layer)
        if isinstance(found, UnitEntry):
            return found
        layers = self.layers(model)  # an unknown model gets its own message
        if found == "incomplete":
            state, hint = "is incomplete (interrupted ingest; ingest it again)", ""
        else:
            state, hint = "not found", _close_matches(layer, layers)
        raise NotFoundError(
            f"layer {shown(layer)} of model {shown(model)} {state} in store {self.url}{hint}"
        )

    def _open(self, model: str, layer: str, version: str | None) -> _Opened:
        """The array of ``version`` of a unit (default: the resolved current one), opened once."""
        entry = self._entry(model, layer) if version is None else self._pinned(
            model, layer, version)
        opened = self._opened.get(entry.path)
        if opened is None:
            import zarr

            what = f"store {self.url}, model {model!r}, layer {layer!r}, version {entry.version}"
            with self._errors():
                try:
                    array = zarr.open_array(self.catalog.zstore, path=entry.path, mode="r")
                except FileNotFoundError:
                    array = None
                except (ValueError, TypeError, KeyError) as exc:  # unreadable zarr.json
                    detail = " ".join(str(exc).split())[:200]
                    raise IntegrityError(f"{what}: its array metadata is damaged: {detail}"
                                         ) from None
            if array is None or array.attrs.get("complete") is not True:
                current = self.catalog.entry(model, layer, fresh=True)
                if version is not None or (
                    isinstance(current, UnitEntry) and current.version != entry.version
                ):
                    raise self._gone(model, layer, entry.version)
                raise IntegrityError(f"{what}: the current version's array is missing")
            if len(array.shape) != 2:
                raise IntegrityError(f"{what}: array of shape {array.shape} is not 2-D")
            direct = shard_layout(array, dense=self.catalog.format >= 2)
            opened = _Opened(entry, array, direct)
            self._opened[entry.path] = opened
        return opened

    def _pinned(self, model: str, layer: str, version: str) -> UnitEntry:
        """The entry of a version a reader pinned, whether or not it is still current."""
        if not isinstance(version, str) or not version:
            raise InputError(f"model {model!r}, layer {layer!r}: version must be a non-empty "
                             f"string from UnitInfo.version, got {shown(version)}")
        if self.catalog.format == 1:
            entry = self._entry(model, layer)
            if entry.version != version:
                raise self._gone(model, layer, version)
            return entry
        if "/" in version or version.startswith("."):
            raise self._gone(model, layer, version)
        return UnitEntry(model, layer, version, layout.version_path(model, layer, version))

    def _gone(self, model: str, layer: str, version: str) -> UnitChangedError:
        return UnitChangedError(
            f"model {model!r}, layer {layer!r}: version {version[:60]} is no longer in store "
            f"{self.url} (the unit was ingested again and the old version removed); run the "
            "job again to read the current version"
        )

    def unit_info(self, model: str, layer: str, *, version: str | None = None) -> UnitInfo:
        """Shape, dtypes, chunking, fingerprint and version of a unit (its resolved current
        version, or ``version``)."""
        opened = self._open(model, layer, version)
        arr = opened.array
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
            version=opened.entry.version,
        )

    def unit_attributes(self, model: str, layer: str, *, version: str | None = None) -> dict:
        """The ``attributes`` its writer recorded with a complete unit ({} if none)."""
        return dict(self._open(model, layer, version).array.attrs.get("attributes") or {})

    def read(
        self,
        model: str,
        layer: str,
        start: int = 0,
        stop: int | None = None,
        *,
        version: str | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Rows ``start:stop`` of a unit: ndarray of shape (stop - start, features), storage dtype.

        ``out``: a C-contiguous array of that shape and dtype to read into (returned), so
        that a reader can reuse its memory from block to block.

        ``version`` (from :attr:`UnitInfo.version`): read exactly that version, or raise
        :class:`~repscope.errors.UnitChangedError` if it is gone. Without it, the version
        this object resolved first. Every chunk is checked: a missing or damaged one raises
        :class:`~repscope.errors.IntegrityError` naming the unit, shard and rows. Reads only
        the chunks that hold those rows; read whole shards for best throughput.
        """
        opened = self._open(model, layer, version)
        rows = opened.array.shape[0]
        stop = rows if stop is None else stop
        if not (0 <= start <= stop <= rows):
            raise InputError(
                f"model {model!r}, layer {layer!r}: rows {start}:{stop} out of range 0:{rows}"
            )
        if out is not None and (out.shape != (stop - start, opened.array.shape[1])
                                or out.dtype != opened.array.dtype
                                or not out.flags.c_contiguous):
            raise ValueError(f"out must be a C-contiguous ({stop - start}, "
                             f"{opened.array.shape[1]}) {opened.array.dtype} array, got "
                             f"{out.shape} {out.dtype}")
        what = f"store {self.url}, model {model!r}, layer {layer!r}"
        if self.catalog.format >= 2:
            what += f" (version {opened.entry.version})"
        try:
            with self._errors():
                direct = opened.direct
                if direct is not None and direct.directory is not None:
                    return read_rows(direct, start, stop, out=out)
                if direct is not None:
                    rows_read = read_rows_remote(direct, self.catalog.zstore,
                                                 opened.entry.path, start, stop)
                else:
                    rows_read = np.asarray(opened.array[start:stop])
                if out is None:
                    return rows_read
                out[...] = rows_read
                return out
        except ShardError as exc:
            if self.catalog.format >= 2 and not self.catalog.version_exists(opened.entry.path):
                self._opened.pop(opened.entry.path, None)
                raise self._gone(model, layer, opened.entry.version) from None
            kind = "missing data" if exc.missing else "corrupt data"
            raise IntegrityError(f"{kind} in {what}, {exc}") from None
        except (ValueError, RuntimeError) as exc:
            # Zarr's codecs (layouts repscope does not write) fail this way on damaged chunks.
            raise IntegrityError(
                f"corrupt data in {what}, rows {start}:{stop}: {type(exc).__name__}: {exc}"
            ) from None

    def prune(self, grace_s: float | None = None) -> int:
        """Remove versions that a later ingest replaced at least ``grace_s`` seconds ago
        (default :data:`~repscope.store.layout.SUPERSEDED_GRACE_S`, 24 hours).

        Each new version of a unit already prunes that unit's old versions; this sweeps every
        unit. Returns the number of versions removed. A job still reading one of them fails
        with UnitChangedError (it does not read wrong data).
        """
        self.catalog.check_writable(f"store {self.url}")
        return self.catalog.prune(grace_s)
