"""The catalog of a store: which version of each unit is current, and the rows all units share.

This is the store's bookkeeping, and the only module that writes its metadata documents.
ActivationStore reads through it; UnitWriter writes through it, with this interface only:

- before writing: :meth:`Catalog.check_writable` (refuses stores this version reads but does
  not write), :meth:`Catalog.entry` (is the unit there already?), :meth:`Catalog.rows`,
  :meth:`Catalog.has_other_unit` and :meth:`Catalog.check_rows` (may these rows join?);
- :meth:`Catalog.begin` names a new version of a unit (and removes the unit's leftover
  versions of interrupted ingests); the writer then writes the version's array at
  :func:`~repscope.store.layout.version_path` in :attr:`Catalog.zstore`, inside
  :meth:`Catalog.errors`, marks it complete and calls
- :meth:`Catalog.publish`, which checks or records the store's rows and switches the unit
  to the new version, in one step under the store's lock; or :meth:`Catalog.discard`.

Documents (Zarr v3 ``zarr.json`` files, so any Zarr reader sees an ordinary hierarchy):
the root group's attribute ``repscope`` (the format), ``rows/zarr.json`` (attribute
``repscope_rows``: the rows, see store/rows.py) and ``units/<model>/<layer>/zarr.json``
(attribute ``repscope_unit``: the current version and the versions it replaced, with the
time they were replaced). Versions are immutable once complete, so a reader that resolved a
version reads exactly that data, whatever later ingests do.

Concurrency. Writers of *different* units may run at once, in threads or processes. On
local disk publishing is serialised by ``flock`` on the store's folder, and in memory by a
process lock; the rows are claimed by exclusive creation of ``rows/zarr.json`` on every
backend (a conditional PUT on S3), so two first writers cannot both fix the rows. Object
stores have no lock: there, overwriting the only unit with different rows while another
unit is written first is not coordinated (see docs/store.md). Two writers of the *same*
unit at once are not supported: the later one removes the other's unfinished version.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from repscope.errors import ConflictError, InputError, IntegrityError, NotFoundError
from repscope.store import layout
from repscope.store.keys import Keys, dump_json, group_doc
from repscope.store.rows import RowMeta, RowSet, incompatibility

# Rows recorded by a writer that never published its unit (it crashed in between) may be
# redefined by another writer after this long on backends without a lock.
_CLAIM_STALE_S = 600
_MEMORY_LOCKS: dict[str, threading.Lock] = {}
_MEMORY_LOCKS_GUARD = threading.Lock()


def _storable(name: str) -> bool:
    return 0 < len(name.encode("utf-8", "surrogatepass")) <= layout.MAX_NAME_BYTES and not (
        "/" in name or "\\" in name or name in (".", "..")
    )


@dataclass(frozen=True)
class Superseded:
    """A version replaced by a newer one at ``at`` (seconds since the epoch)."""

    version: str
    at: float


@dataclass(frozen=True)
class UnitEntry:
    """A complete unit: its current version and where that version's array lies."""

    model: str
    layer: str
    version: str
    path: str  # the version's array, relative to the store root
    superseded: tuple[Superseded, ...] = ()


class Catalog:
    """Bookkeeping of one store (its zarr store ``zstore``, printed as ``url``).

    ``errors`` is a context manager factory turning backend failures into StorageError.
    """

    def __init__(self, zstore: Any, url: str, errors: Callable[[], AbstractContextManager]):
        self.keys = Keys(zstore)
        self.url = url
        self.errors = errors
        self._root: dict | None = None
        self._rows: RowMeta | None = None
        self._rows_read = False
        self._entries: dict[tuple[str, str], UnitEntry] = {}

    @property
    def zstore(self) -> Any:
        return self.keys.zstore

    def forget(self) -> None:
        """Drop cached documents (see ActivationStore.refresh)."""
        self._root, self._rows, self._rows_read = None, None, False
        self._entries.clear()

    # -- the root ------------------------------------------------------------------------

    @property
    def format(self) -> int:
        return int(self._root_record()["format"])

    def _root_record(self) -> dict:
        if self._root is None:
            root = self.keys.local_root
            if root is not None and root.is_file():
                raise InputError(f"{self.url} is a file, not a store")
            if root is not None and not (root / "zarr.json").is_file():
                raw = None  # without asking zarr, whose LocalStore would create the folder
            else:
                with self.errors():
                    raw = self.keys.get("zarr.json")
            if raw is None:
                raise NotFoundError(f"no store at {self.url}; create one with 'repscope ingest'")
            self._root = self._parse_root(raw)
        return self._root

    def _parse_root(self, raw: bytes) -> dict:
        doc = self._document(raw, "zarr.json", f"store {self.url}: its root metadata")
        if doc.get("node_type") != "group":
            raise InputError(f"{self.url} is a Zarr array, not a repscope store")
        record = (doc.get("attributes") or {}).get(layout.ROOT_ATTR)
        if not isinstance(record, dict):
            raise InputError(f"{self.url} is a Zarr group but not a repscope store")
        fmt = record.get("format")
        if isinstance(fmt, bool) or fmt not in layout.READ_FORMATS:
            newer = isinstance(fmt, int) and fmt > layout.FORMAT
            raise InputError(
                f"{self.url} has store format {fmt!r}; this repscope reads formats "
                f"{', '.join(map(str, layout.READ_FORMATS))}"
                + ("; upgrade repscope to read it" if newer else "")
            )
        return {**doc.get("attributes", {}), **record}

    def _document(self, raw: bytes, key: str, what: str) -> dict:
        """``raw`` parsed as a Zarr metadata document, or IntegrityError naming ``what``."""
        from repscope.store.keys import parse_json

        try:
            doc = parse_json(raw)
        except ValueError as exc:
            raise IntegrityError(f"{what} ({key}) is damaged: {exc}") from None
        if not isinstance(doc, dict) or doc.get("zarr_format") != 3:
            raise IntegrityError(f"{what} ({key}) is damaged: not Zarr v3 metadata")
        return doc

    def create(self) -> None:
        """Create the store (format 2) unless it exists; refuse locations that hold other data."""
        doc = group_doc({layout.ROOT_ATTR: {"format": layout.FORMAT}})
        root = self.keys.local_root
        if root is not None and root.is_file():  # before zarr's LocalStore tries to mkdir it
            raise InputError(f"{self.url} is a file, not a store; choose another location")
        with self.errors():
            raw = self.keys.get("zarr.json")
            if raw is None:
                self._refuse_foreign_location()
                if self.keys.create("zarr.json", dump_json(doc)):
                    self._root = None
                    return
                raw = self.keys.get("zarr.json")  # another process created it meanwhile
        parsed = self._document(raw, "zarr.json", f"store {self.url}: its root metadata")
        attrs = parsed.get("attributes") or {}
        if parsed.get("node_type") == "group" and layout.ROOT_ATTR not in attrs:
            with self.errors():
                children = [n for n in self.keys.list_dir("") if n != "zarr.json"]
                if children:
                    raise InputError(
                        f"{self.url} holds a Zarr group that is not a repscope store; choose "
                        "an empty location"
                    )
                self.keys.put_json("zarr.json", doc)
        self._root = None
        self._root_record()

    def _refuse_foreign_location(self) -> None:
        """A local folder holding files that a concurrent creator of the store would not write."""
        root = self.keys.local_root
        if root is None:
            return
        ours = {"zarr.json", layout.UNITS, layout.ROWS}
        if root.is_dir() and any(
            p.name not in ours and not p.name.startswith(".zarr.json.") for p in root.iterdir()
        ):
            raise InputError(
                f"{self.url} is a folder that holds other files, not a store; choose a new or "
                "empty location"
            )

    # -- rows -------------------------------------------------------------------------------

    def rows(self, fresh: bool = False) -> RowMeta | None:
        """What the store records about its rows; None while no unit has fixed them."""
        if fresh or not self._rows_read:
            if self.format == 1:
                record = {k: v for k, v in self._root_record().items() if k != "format"}
                where = f"store {self.url} (root zarr.json)"
            else:
                key = f"{layout.ROWS}/zarr.json"
                where = f"store {self.url} ({key})"
                with self.errors():
                    raw = self.keys.get(key)
                if raw is None:
                    record = None
                else:
                    doc = self._document(raw, key, f"store {self.url}: its row metadata")
                    record = (doc.get("attributes") or {}).get(layout.ROWS_ATTR)
            self._rows, self._rows_read = RowMeta.parse(record, where), True
        return self._rows

    def row_array(self, path: str) -> np.ndarray | None:
        """A row array (``rows/ids``, ``rows/example``, ``rows/mask``), or None if absent."""
        import zarr

        with self.errors():
            try:
                arr = zarr.open_array(self.zstore, path=path, mode="r")
            except FileNotFoundError:
                return None
            except ValueError as exc:
                raise IntegrityError(f"store {self.url}: {path} is damaged: {exc}") from None
            return np.asarray(arr[...])

    def _write_rows(self, rows: RowSet, model: str, layer: str, replace_rows: bool) -> bool:
        """Record ``rows`` (exclusively unless ``replace_rows``) and write the row arrays.

        False if another writer recorded rows first (nothing written).
        """

        doc = dump_json(group_doc({layout.ROWS_ATTR: rows.record(model, layer, time.time())}))
        key = f"{layout.ROWS}/zarr.json"
        with self.errors():
            if replace_rows:
                self.keys.put(key, doc)
            elif not self.keys.create(key, doc):
                return False
            for path, data in ((layout.ROW_IDS, rows.ids), (layout.ROW_EXAMPLE, rows.example),
                               (layout.ROW_MASK, rows.mask)):
                if data is None:
                    self.keys.delete_dir(path)
                else:
                    self._write_row_array(path, data)
        self._rows_read = False
        return True

    def _write_row_array(self, path: str, data: np.ndarray) -> None:
        import zarr

        if data.dtype.kind in "iub":
            data = data.astype("<i8") if data.dtype.kind in "iu" else data
            zarr.create_array(self.zstore, name=path, data=data, overwrite=True)
        else:
            # Variable-length UTF-8: the string dtype with a Zarr v3 extension spec (fixed-width
            # numpy unicode has none).
            arr = zarr.create_array(self.zstore, name=path, shape=data.shape, dtype=str,
                                    overwrite=True)
            arr[:] = data.astype(str)

    def check_rows(self, rows: RowSet, model: str, layer: str, ctx: str) -> None:
        """Refuse ``rows`` that cannot join the store (before any data is written)."""
        stored = self.rows(fresh=True)
        if stored is None:
            return
        problem = incompatibility(stored, rows, ctx, lambda: self.row_array(layout.ROW_IDS))
        if problem and not self._may_redefine(stored, model, layer):
            raise InputError(problem)

    def _may_redefine(self, stored: RowMeta, model: str, layer: str) -> bool:
        """Rows may change while no other unit is complete: the only unit being overwritten,
        or rows left by a writer that never published."""
        if self.has_other_unit(model, layer):
            return False
        if self.has_lock or stored.set_by == (model, layer):
            return True
        return stored.set_at is not None and time.time() - stored.set_at > _CLAIM_STALE_S

    # -- units -------------------------------------------------------------------------------

    def units(self) -> list[UnitEntry]:
        """Every complete unit, read afresh (one metadata read per unit, concurrently)."""
        with self.errors():
            names = [
                (model, layer)
                for model in self._names(layout.UNITS)
                for layer in self._names(f"{layout.UNITS}/{model}")
            ]
            raws = self.keys.get_many(f"{layout.unit_path(*unit)}/zarr.json" for unit in names)
        entries = [self._parse_unit(*unit, raw) for unit, raw in zip(names, raws, strict=True)]
        return [e for e in entries if isinstance(e, UnitEntry)]

    def has_other_unit(self, model: str, layer: str) -> bool:
        """True if a unit other than (model, layer) is complete; stops at the first found,
        so it usually costs a few requests, not one per unit."""
        with self.errors():
            for m in self._names(layout.UNITS):
                for name in self._names(f"{layout.UNITS}/{m}"):
                    if (m, name) == (model, layer):
                        continue
                    raw = self.keys.get(f"{layout.unit_path(m, name)}/zarr.json")
                    if isinstance(self._parse_unit(m, name, raw), UnitEntry):
                        return True
        return False

    def _names(self, prefix: str) -> list[str]:
        return [n for n in self.keys.list_dir(prefix) if n != "zarr.json" and not
                n.startswith(".")]

    def entry(self, model: str, layer: str, fresh: bool = False) -> UnitEntry | str:
        """The unit's entry (cached after the first look-up unless ``fresh``), or why there
        is none: ``"absent"`` or ``"incomplete"``."""
        key = (model, layer)
        if not all(isinstance(n, str) and _storable(n) for n in key):
            return "absent"  # could never have been written; asking the backend would fail
        if fresh:
            self._entries.pop(key, None)
        elif key in self._entries:
            return self._entries[key]
        with self.errors():
            raw = self.keys.get(f"{layout.unit_path(model, layer)}/zarr.json")
        found = self._parse_unit(model, layer, raw)
        if isinstance(found, UnitEntry):
            self._entries[key] = found
        return found

    def _parse_unit(self, model: str, layer: str, raw: bytes | None) -> UnitEntry | str:
        if raw is None:
            return "absent"
        key = f"{layout.unit_path(model, layer)}/zarr.json"
        what = f"store {self.url}, model {model!r}, layer {layer!r}: its metadata"
        doc = self._document(raw, key, what)
        attrs = doc.get("attributes") or {}
        if self.format == 1:
            if doc.get("node_type") != "array" or attrs.get("complete") is not True:
                return "incomplete" if doc.get("node_type") == "array" else "absent"
            version = str(attrs.get("fingerprint") or "format1")
            return UnitEntry(model, layer, version, layout.unit_path(model, layer))
        if doc.get("node_type") != "group":
            raise IntegrityError(f"{what} ({key}) is damaged: not a unit group")
        record = attrs.get(layout.UNIT_ATTR)
        if record is None:
            return "incomplete"  # only unfinished versions so far
        try:
            version = record["version"]
            superseded = tuple(Superseded(str(s["version"]), float(s["at"]))
                               for s in record.get("superseded", []))
            if not isinstance(version, str) or not version or "/" in version:
                raise TypeError
        except (TypeError, KeyError, ValueError):
            raise IntegrityError(f"{what} ({key}) is damaged: no valid current version") from None
        return UnitEntry(model, layer, version, layout.version_path(model, layer, version),
                         superseded)

    def version_exists(self, path: str) -> bool:
        with self.errors():
            return self.keys.get(f"{path}/zarr.json") is not None

    # -- writing (UnitWriter) ----------------------------------------------------------------

    def check_writable(self, ctx: str) -> None:
        if self.format != layout.FORMAT:
            raise InputError(
                f"{ctx}: store {self.url} has format {self.format}, which this repscope reads "
                f"but does not write; copy it to a new store (format {layout.FORMAT}) with "
                "'python -m repscope.store.upgrade OLD NEW' and write there"
            )

    def begin(self, model: str, layer: str) -> str:
        """A new version name for the unit; removes its versions that are neither current
        nor superseded (left by interrupted ingests)."""
        version = layout.new_version(time.time())
        current = self.entry(model, layer, fresh=True)
        keep = set() if not isinstance(current, UnitEntry) else {
            current.version, *(s.version for s in current.superseded)}
        with self.errors():
            for name in self._names(layout.unit_path(model, layer)):
                if layout.is_version(name) and name not in keep:
                    self._delete_version(layout.version_path(model, layer, name))
        return version

    def publish(self, model: str, layer: str, version: str, rows: RowSet, ctx: str) -> UnitEntry:
        """Make ``version`` (complete, written) the unit's current version.

        Under the store's lock: the rows are checked against the store's (or recorded, for
        the first unit), the version is checked to exist, the unit's document is replaced
        (the old version joins ``superseded``), and superseded versions older than
        :data:`~repscope.store.layout.SUPERSEDED_GRACE_S` are removed.
        """
        path = layout.version_path(model, layer, version)
        with self.lock():
            self._settle_rows(rows, model, layer, ctx)
            if not self.version_exists(path):
                raise ConflictError(
                    f"{ctx}: the version being written ({version}) was removed by another "
                    f"writer of the same unit in store {self.url}; write each unit from one "
                    "writer at a time"
                )
            now = time.time()
            old = self.entry(model, layer, fresh=True)
            superseded = () if not isinstance(old, UnitEntry) else (
                *old.superseded, Superseded(old.version, now))
            entry = UnitEntry(model, layer, version, path, superseded)
            self._write_entry(entry)  # the switch: from here on the version is current
            self._entries[(model, layer)] = entry
            try:
                self._entries[(model, layer)] = self._prune_entry(entry, now)
            except Exception:
                pass  # the unit is published; old versions go at a later publish or prune()
        return self._entries[(model, layer)]

    def _settle_rows(self, rows: RowSet, model: str, layer: str, ctx: str) -> None:
        for _ in range(2):  # a second pass after losing the race to record the rows
            stored = self.rows(fresh=True)
            if stored is None:
                if self._write_rows(rows, model, layer, replace_rows=False):
                    return
                continue
            problem = incompatibility(stored, rows, ctx, lambda: self.row_array(layout.ROW_IDS))
            if problem is None:
                self._complete_row_arrays(stored, rows)
                return
            if not self._may_redefine(stored, model, layer):
                raise InputError(problem)
            self._write_rows(rows, model, layer, replace_rows=True)
            return

    def _complete_row_arrays(self, stored: RowMeta, rows: RowSet) -> None:
        """Write row arrays the record announces but that are missing (their writer stopped
        between recording the rows and writing them), from this writer's equal rows."""
        parts = [(layout.ROW_IDS, stored.row_ids, rows.ids),
                 (layout.ROW_EXAMPLE, stored.example_map, rows.example),
                 (layout.ROW_MASK, stored.padding_mask, rows.mask)]
        with self.errors():
            for path, announced, data in parts:
                if announced and data is not None and self.keys.get(f"{path}/zarr.json") is None:
                    self._write_row_array(path, data)

    def _write_entry(self, entry: UnitEntry) -> None:
        record = {
            "version": entry.version,
            "superseded": [{"version": s.version, "at": s.at} for s in entry.superseded],
        }
        with self.errors():
            self.keys.put_json(f"{layout.unit_path(entry.model, entry.layer)}/zarr.json",
                               group_doc({layout.UNIT_ATTR: record}))

    def discard(self, model: str, layer: str, version: str) -> None:
        """Remove an unpublished version, and the unit's group if nothing else is in it."""
        unit = layout.unit_path(model, layer)
        with self.errors():
            self._delete_version(layout.version_path(model, layer, version))
            if self.entry(model, layer, fresh=True) == "incomplete" and not any(
                layout.is_version(n) for n in self._names(unit)
            ):
                self.keys.delete(f"{unit}/zarr.json")
                self.keys.remove_empty_folder(unit)

    def _delete_version(self, path: str) -> None:
        # Metadata first: a reader that finds shards missing then sees the version is gone.
        self.keys.delete(f"{path}/zarr.json")
        self.keys.delete_dir(path)

    # -- pruning -----------------------------------------------------------------------------

    def _prune_entry(self, entry: UnitEntry, now: float, grace_s: float | None = None
                     ) -> UnitEntry:
        grace_s = layout.SUPERSEDED_GRACE_S if grace_s is None else grace_s
        old = [s for s in entry.superseded if now - s.at >= grace_s]
        if not old:
            return entry
        kept = replace(entry, superseded=tuple(s for s in entry.superseded if s not in old))
        self._write_entry(kept)  # the document first: a crash then leaves only strays
        with self.errors():
            for s in old:
                self._delete_version(layout.version_path(entry.model, entry.layer, s.version))
        return kept

    def prune(self, grace_s: float | None = None) -> int:
        """Remove superseded versions replaced at least ``grace_s`` seconds ago, in every unit.

        Returns how many versions were removed. Jobs reading a removed version fail with
        UnitChangedError; the default grace (layout.SUPERSEDED_GRACE_S) lets jobs that
        started before the ingest finish.
        """
        removed = 0
        with self.lock():
            for entry in self.units():
                kept = self._prune_entry(entry, time.time(), grace_s)
                removed += len(entry.superseded) - len(kept.superseded)
                self._entries.pop((entry.model, entry.layer), None)
        return removed

    # -- the lock ----------------------------------------------------------------------------

    @property
    def has_lock(self) -> bool:
        """True where :meth:`lock` excludes other writers (local disk, memory)."""
        return self.keys.local_root is not None or self._memory_key() is not None

    def _memory_key(self) -> str | None:
        fs = getattr(self.zstore, "fs", None)
        protocol = getattr(fs, "protocol", None)
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol or ())
        return f"memory:{self.zstore.path}" if "memory" in protocols else None

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclude other writers' publishing: ``flock`` on the store's folder, a process lock
        for memory://, nothing on object stores."""
        root = self.keys.local_root
        if root is not None:
            fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the lock
            return
        key = self._memory_key()
        if key is None:
            yield
            return
        with _MEMORY_LOCKS_GUARD:
            lock = _MEMORY_LOCKS.setdefault(key, threading.Lock())
        with lock:
            yield
