"""A zarr store's keys, synchronously: JSON documents, exclusive creation, listing, deletion.

The catalog (store/catalog.py) keeps its bookkeeping in small Zarr ``zarr.json`` documents
and reads and writes them here, through zarr's storage layer (``zarr.abc.store.Store``), so
one code path serves local disk, ``memory://`` and object stores. Replacing a document is
atomic on every backend repscope supports: zarr's LocalStore writes a temporary file and
renames it, an object PUT replaces the whole object, and memory is a dictionary.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _sync(coro: Any) -> Any:
    from zarr.core.sync import sync

    return sync(coro)


class Keys:
    """Synchronous access to the keys of one zarr store (paths relative to its root)."""

    def __init__(self, zstore: Any) -> None:
        self.zstore = zstore

    @property
    def local_root(self) -> Path | None:
        """The store's folder when it is on local disk, else None."""
        from zarr.storage import LocalStore

        return Path(self.zstore.root) if isinstance(self.zstore, LocalStore) else None

    def get(self, key: str) -> bytes | None:
        """The bytes at ``key``, or None if there is no such key."""
        return _sync(self._get(key))

    def get_many(self, keys: Iterable[str]) -> list[bytes | None]:
        """The bytes at each key (None where missing), fetched concurrently."""

        async def many(keys: list[str]) -> list[bytes | None]:
            return list(await asyncio.gather(*(self._get(k) for k in keys)))

        return _sync(many(list(keys)))

    async def _get(self, key: str) -> bytes | None:
        from zarr.core.buffer import default_buffer_prototype

        buf = await self.zstore.get(key, default_buffer_prototype())
        return None if buf is None else buf.to_bytes()

    def put(self, key: str, data: bytes) -> None:
        """Write (or atomically replace) ``key``."""
        from zarr.core.buffer import default_buffer_prototype

        _sync(self.zstore.set(key, default_buffer_prototype().buffer.from_bytes(data)))

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist; False if it did (nothing is written).

        Exclusive on local disk (a hard link of a complete temporary file), on S3 (a
        conditional PUT, ``If-None-Match: *``) and in memory. Elsewhere (gs://) it is a check
        followed by a write, which two writers can both pass.
        """
        root = self.local_root
        if root is not None:
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
            tmp.write_bytes(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
            return True
        fs = getattr(self.zstore, "fs", None)
        if fs is not None:
            path = f"{self.zstore.path}/{key}"
            try:
                _sync(fs._pipe_file(path, data, mode="create"))
                return True
            except FileExistsError:
                return False
            except TypeError:  # a file system without exclusive creation
                pass
        if self.get(key) is not None:
            return False
        self.put(key, data)
        return True

    def list_dir(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` (keys and sub-prefixes), without the prefix."""

        async def names() -> list[str]:
            return [name async for name in self.zstore.list_dir(prefix)]

        return sorted(set(_sync(names())))

    def delete(self, key: str) -> None:
        _sync(self.zstore.delete(key))

    def remove_empty_folder(self, prefix: str) -> None:
        """Remove the local folder of ``prefix`` if it is empty (object stores have none)."""
        root = self.local_root
        if root is not None:
            try:
                os.rmdir(root / prefix)
            except OSError:
                pass  # not empty, or gone already

    def delete_dir(self, prefix: str) -> None:
        """Delete every key under ``prefix``."""
        _sync(self.zstore.delete_dir(prefix))

    # -- JSON documents -----------------------------------------------------------------

    def get_json(self, key: str) -> Any:
        """The JSON document at ``key``, None if missing; ValueError if it is not JSON."""
        return parse_json(self.get(key))

    def put_json(self, key: str, doc: Any) -> None:
        self.put(key, dump_json(doc))


def parse_json(raw: bytes | None) -> Any:
    """``raw`` decoded as JSON (None stays None); ValueError for anything else."""
    if raw is None:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None


def dump_json(doc: Any) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")


def group_doc(attributes: dict) -> dict:
    """A Zarr v3 group's ``zarr.json`` document with ``attributes``."""
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes}
