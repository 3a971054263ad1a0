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

Every object is written under a temporary name and moved into place, so a reader never
loads half of one; objects are immutable once written (content-addressed keys).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import uuid
from typing import Any, BinaryIO, TypeVar

import fsspec
import numpy as np

T = TypeVar("T")


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

    def _path(self, kind: str, key: str) -> str:
        return f"{self._fs_root()[1]}/{kind}/{key}.npz"

    def put(self, kind: str, key: str, obj: Any) -> None:
        path = self._path(kind, key)
        tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            encode(obj, f)
        self.fs.mv(tmp, path)

    def get(self, kind: str, key: str, cls: type[T]) -> T | None:
        path = self._path(kind, key)
        try:
            with self.fs.open(path, "rb") as f:
                return decode(f.read(), cls)
        except FileNotFoundError:
            return None

    def has(self, kind: str, key: str) -> bool:
        return self.fs.exists(self._path(kind, key))

    # Partials: the moments a task has accumulated so far (its n says how many rows), with a
    # small sidecar so that the driver can count reusable rows without loading matrices.

    def put_partial(self, key: str, moments: Any) -> None:
        self.put("partials", key, moments)
        with self.fs.open(self._path("partials", key)[: -len(".npz")] + ".json", "w") as f:
            f.write(json.dumps({"rows": int(moments.n)}))

    def get_partial(self, key: str) -> Any:
        from repscope.cluster.moments import CrossMoments

        return self.get("partials", key, CrossMoments)

    def partial_rows(self, key: str) -> int:
        try:
            with self.fs.open(self._path("partials", key)[: -len(".npz")] + ".json") as f:
                return int(json.loads(f.read())["rows"])
        except (FileNotFoundError, ValueError, KeyError):
            return 0

    def remove_partials(self, keys) -> None:
        for key in keys:
            for suffix in (".npz", ".json"):
                path = self._path("partials", key)[: -len(".npz")] + suffix
                if self.fs.exists(path):
                    self.fs.rm(path)

    def remove(self, kind: str, keys) -> None:
        for key in keys:
            path = self._path(kind, key)
            if self.fs.exists(path):
                self.fs.rm(path)

    def history_url(self, stamp: str) -> str:
        return f"{state_url(self.output)}/history/{stamp}.zarr"

    def history(self) -> list[str]:
        """URLs of the history snapshots, oldest first."""
        base = f"{self._fs_root()[1]}/history"
        if not self.fs.exists(base):
            return []
        names = sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))
        return [f"{state_url(self.output)}/history/{n}" for n in names if n.endswith(".zarr")]
