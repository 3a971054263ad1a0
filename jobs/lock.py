"""One writer per output: a lock beside the results store.

Two runs that target the same output must not both write it: the second refuses at once
(ConflictError) instead of waiting behind a job that may take hours. The lock is a small
file (or object) `<output>.lock` created exclusively, holding who took it. A lock left by a
killed run on this host is detected by its dead process id and taken over; on another host,
or on object storage, the message says which file to remove.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import fsspec

from repscope.errors import ConflictError
from repscope.store import redact


def _lock_url(output: str) -> str:
    return output.rstrip("/") + ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(info: dict) -> bool:
    """A lock is stale when it was taken on this host by a process that no longer exists."""
    return info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1)))


@contextmanager
def output_lock(output: str, storage_options: dict | None = None) -> Iterator[None]:
    """Hold `<output>.lock` while the block runs; ConflictError if another run holds it."""
    url = _lock_url(output)
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and not fs.exists(parent):
        fs.makedirs(parent, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(2):
        try:
            with fs.open(path, "xb") as f:  # exclusive create: fails if the lock exists
                f.write(json.dumps(me).encode())
            break
        except FileExistsError:
            try:
                with fs.open(path, "rb") as f:
                    info = json.loads(f.read() or b"{}")
            except (FileNotFoundError, ValueError):
                info = {}
            if info and _stale(info):
                fs.rm(path)
                continue
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info.get("since", 0)))
            raise ConflictError(
                f"output {redact(output)} is being written by another run (pid "
                f"{info.get('pid', '?')} on {info.get('host', '?')} since {since} UTC); wait "
                f"for it to finish, or remove {redact(url)} if that run is gone"
            ) from None
    try:
        yield
    finally:
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass
