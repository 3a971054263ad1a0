"""State kept beside a results store, in `<output>.state/`: what lets a run resume and a
nightly run recompute only what changed.

- `partials/<key>.npz`: merged moments of one task (a tile over a row range), written by the
  task itself when it finishes. A rerun of the same job after a crash loads these instead of
  recomputing them. The key hashes everything the partial depends on (the store's rows, the
  units' content fingerprints, the row range, precision and what is accumulated).
- `units/<key>.npz`: per-unit moments (mean, centered X'X) keyed by the unit's content, so a
  nightly run can finish pairs of an unchanged unit with a new one without a second pass
  over the unchanged unit.
- `tiles/<key>.npz` and `caches/<key>.npz`: a finished tile's matrix entries and, for a
  diagonal tile, its units' per-unit work: what a rerun after a crash reuses once the tile's
  partials are gone (they are removed as soon as the tile is finished, so the state never
  holds the moments of a whole job).
- `history/<time>.zarr`: a snapshot of each nightly result, for trends.

Every object is written under a temporary name (`<key>.npz.partial-<id>`), flushed to disk
and moved into place, so a reader never loads half of one; objects are immutable once
written (content-addressed keys). Each .npz is a zip whose members carry CRC-32 checksums,
checked when read: a damaged file (a crash of the machine, a full disk, a bit flip) is
discarded with one warning (StateWarning) and its work recomputed, never loaded. A killed
run's temporary files are removed when the next run takes the output (clean_leftovers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import time
import uuid
import warnings
import zipfile
import zlib
from typing import Any, BinaryIO, TypeVar

import fsspec
import numpy as np

T = TypeVar("T")

# Errors of a damaged or foreign .npz (truncated, bit flips, other fields): not loadable.
_DAMAGED = (zipfile.BadZipFile, zlib.error, ValueError, KeyError, EOFError, TypeError)
_TEMP = re.compile(r"\.partial-[0-9a-f]{8}$")
KINDS = ("partials", "units", "tiles", "caches", "history")
TEMP_GRACE_SECONDS = 120.0  # a temporary state file untouched this long is a leftover


class StateWarning(UserWarning):
    """A state file was damaged and is recomputed."""


def state_url(output: str) -> str:
    return output.rstrip("/") + ".state"


def digest(*parts: Any) -> str:
    """A stable key for JSON-serialisable parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def encode(obj: Any, file: BinaryIO | None = None) -> bytes | None:
    """A frozen dataclass of ndarrays, numbers, tuples and None as .npz: written to ``file``
    (streamed: a tile's moments are gigabytes, and building them in memory first cost
    several copies into fresh pages), or returned as bytes."""
    arrays, plain = {}, {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if isinstance(value, np.ndarray):
            arrays[field.name] = value
        elif isinstance(value, np.generic):
            plain[field.name] = value.item()
        else:
            plain[field.name] = value
    out = io.BytesIO() if file is None else file
    np.savez(out, __plain__=np.frombuffer(json.dumps(plain).encode(), dtype=np.uint8),
             **arrays)
    return out.getvalue() if file is None else None


def decode(data: bytes, cls: type[T]) -> T:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        values: dict[str, Any] = json.loads(npz["__plain__"].tobytes().decode())
        values.update({name: npz[name] for name in npz.files if name != "__plain__"})
    for field in dataclasses.fields(cls):
        if isinstance(values.get(field.name), list):
            values[field.name] = tuple(values[field.name])
    return cls(**values)


class StateStore:
    """`<output>.state/` on any fsspec file system. Picklable: Ray tasks write partials."""

    def __init__(self, output: str, storage_options: dict | None = None):
        self.output = output
        self.storage_options = dict(storage_options or {})
        self._resolved = None

    def __getstate__(self):
        return {**self.__dict__, "_resolved": None}  # file systems reopen where unpickled

    def _fs_root(self):
        if self._resolved is None:
            self._resolved = fsspec.core.url_to_fs(state_url(self.output), **self.storage_options)
        return self._resolved

    @property
    def fs(self):
        return self._fs_root()[0]

    @property
    def _local(self) -> bool:
        return "file" in _protocols(self.fs)

    def _path(self, kind: str, key: str) -> str:
        return f"{self._fs_root()[1]}/{kind}/{key}.npz"

    def _write(self, path: str, write) -> None:
        """write(file) into a temporary file, on disk, then moved to ``path``."""
        tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as f:
                write(f)
                if self._local:  # a crash of the machine must not leave a torn file
                    f.flush()
                    os.fsync(f.fileno())
            self.fs.mv(tmp, path)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def put(self, kind: str, key: str, obj: Any) -> None:
        self._write(self._path(kind, key), lambda f: encode(obj, f))

    def get(self, kind: str, key: str, cls: type[T]) -> T | None:
        """The object stored under ``key``, or None if there is none or it was damaged (then
        it is removed, with a StateWarning, so that it is recomputed)."""
        path = self._path(kind, key)
        try:
            with self.fs.open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            return decode(data, cls)
        except _DAMAGED as exc:
            self._discard(kind, key, exc)
            return None

    def has(self, kind: str, key: str) -> bool:
        """True if an intact object is stored under ``key`` (its checksums are read)."""
        path = self._path(kind, key)
        try:
            with self.fs.open(path, "rb") as f:
                damaged = zipfile.ZipFile(io.BytesIO(f.read())).testzip()
        except FileNotFoundError:
            return False
        except _DAMAGED as exc:
            self._discard(kind, key, exc)
            return False
        if damaged is not None:
            self._discard(kind, key, f"bad checksum in {damaged}")
            return False
        return True

    def _discard(self, kind: str, key: str, why: Any) -> None:
        from repscope.store import redact

        reason = f"{type(why).__name__}: {why}" if isinstance(why, BaseException) else why
        warnings.warn(f"discarded damaged state file {redact(self._path(kind, key))} "
                      f"({str(reason)[:120]}); its work is recomputed", StateWarning,
                      stacklevel=3)
        if kind == "partials":
            self.remove_partials([key])
        else:
            self.remove(kind, [key])

    # Partials: the moments a task has accumulated so far (its n says how many rows), with a
    # small sidecar so that the driver can count reusable rows without loading matrices.

    def _sidecar(self, key: str) -> str:
        return self._path("partials", key)[: -len(".npz")] + ".json"

    def put_partial(self, key: str, moments: Any) -> None:
        self.put("partials", key, moments)
        size = self.fs.size(self._path("partials", key))
        text = json.dumps({"rows": int(moments.n), "bytes": int(size)}).encode()
        self._write(self._sidecar(key), lambda f: f.write(text))

    def get_partial(self, key: str) -> Any:
        from repscope.cluster.moments import CrossMoments

        return self.get("partials", key, CrossMoments)

    def partial_rows(self, key: str) -> int:
        """Rows a saved partial holds, from its sidecar (0 if there is none, or the partial
        is not the size the sidecar recorded: a torn file is not counted as reusable)."""
        try:
            with self.fs.open(self._sidecar(key)) as f:
                info = json.loads(f.read())
            if "bytes" in info and self.fs.size(self._path("partials", key)) != info["bytes"]:
                return 0
            return int(info["rows"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return 0

    def remove_partials(self, keys) -> None:
        keys = list(keys)
        for key in keys:
            for path in (self._path("partials", key), self._sidecar(key)):
                if self.fs.exists(path):
                    self.fs.rm(path)
        self.prune_empty()

    def remove(self, kind: str, keys) -> None:
        for key in keys:
            path = self._path(kind, key)
            if self.fs.exists(path):
                self.fs.rm(path)
        self.prune_empty()

    def prune_empty(self) -> None:
        """Remove emptied kind folders and then the state folder itself, locally (object
        stores have no folders): a finished run leaves nothing but its output."""
        if not self._local:
            return
        root = self._fs_root()[1]
        for kind in KINDS:
            try:
                os.rmdir(f"{root}/{kind}")
            except OSError:  # missing, or holds something
                pass
        try:
            os.rmdir(root)
        except OSError:
            pass

    def clean_leftovers(self) -> list[str]:
        """Remove temporary files of writes a killed run left (`*.partial-<id>`) and history
        snapshots it left half-written; call only while holding the output's lock."""
        from repscope.jobs.outputs import is_results_attrs, read_root_attrs
        from repscope.store import redact

        root = self._fs_root()[1]
        done = []
        for kind in KINDS[:-1]:
            base = f"{root}/{kind}"
            if not self.fs.isdir(base):
                continue
            for path in self.fs.ls(base, detail=False):
                if _TEMP.search(path) and self._idle(path):
                    self.fs.rm(path)
                    done.append(redact(path))
        for url in self.history(complete=False):
            path = f"{root}/history/{url.rsplit('/', 1)[-1]}"
            meta = _root_meta(self.fs, path)
            attrs = read_root_attrs(self.fs, path) if meta is not None else None
            if attrs and is_results_attrs(attrs) and not meta.get("consolidated_metadata"):
                self.fs.rm(path, recursive=True)
                done.append(redact(url))
        self.prune_empty()
        return done

    def _idle(self, path: str) -> bool:
        """True if nothing wrote ``path`` for TEMP_GRACE_SECONDS: a task of a driver that
        died but whose Ray lives on (a notebook) may still be writing a young one."""
        try:
            modified = self.fs.modified(path)
        except (FileNotFoundError, NotImplementedError):
            return False
        return time.time() - modified.timestamp() > TEMP_GRACE_SECONDS

    def history_url(self, stamp: str) -> str:
        return f"{state_url(self.output)}/history/{stamp}.zarr"

    def history(self, complete: bool = True) -> list[str]:
        """URLs of the history snapshots, oldest first; only complete ones (their metadata
        consolidated, the last step of a write) unless ``complete`` is False."""
        base = f"{self._fs_root()[1]}/history"
        if not self.fs.exists(base):
            return []
        names = sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))
        urls = [f"{state_url(self.output)}/history/{n}" for n in names if n.endswith(".zarr")]
        if not complete:
            return urls
        return [u for u in urls if (_root_meta(self.fs, f"{base}/{u.rsplit('/', 1)[-1]}")
                                    or {}).get("consolidated_metadata")]


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _root_meta(fs, path: str) -> dict | None:
    try:
        meta = json.loads(fs.cat_file(f"{path}/zarr.json"))
    except (FileNotFoundError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None
