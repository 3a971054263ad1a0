"""One writer per output: a lock beside the results store.

Two runs that target the same output must not both write it: the second refuses at once
(ConflictError) instead of waiting behind a job that may take hours. The lock is a small
file (or object) `<output>.lock` created exclusively, holding who took it. A lock left by a
killed run on this host is detected by its dead process id and taken over; on another host,
or on object storage, the message says which file to remove.

Taking the lock is also where a run first touches the output, so :func:`output_lock` first
checks that the output may be written at all (jobs.outputs.check_output_safe: nothing that
repscope did not write is ever replaced) and, once it holds the lock, clears what a killed
run left beside the output (jobs.outputs.clean_leftovers).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

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
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**31:
        return False
    return info.get("host") == socket.gethostname() and not _alive(pid)


@contextmanager
def output_lock(output: str, storage_options: dict | None = None, *, store: str | None = None,
                log: TextIO | None = None) -> Iterator[None]:
    """Hold `<output>.lock` while the block runs; ConflictError if another run holds it.

    Before taking it: InputError if the output may not be written (``store``, the job's
    store URL, lets that check also refuse the store itself). Once it is held: leftovers of
    a killed run are cleared, with one line on ``log`` (default stderr) saying what."""
    from repscope.jobs.outputs import check_output_safe, clean_leftovers

    check_output_safe(output, store, storage_options)
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
            if not isinstance(info, dict):
                info = {}
            if info and _stale(info):
                fs.rm(path)
                continue
            when = info.get("since", 0)
            when = when if isinstance(when, int | float) and 0 <= when < 1e11 else 0
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when))
            raise ConflictError(
                f"output {redact(output)} is being written by another run (pid "
                f"{str(info.get('pid', '?'))[:20]} on {str(info.get('host', '?'))[:64]} since "
                f"{since} UTC); wait "
                f"for it to finish, or remove {redact(url)} if that run is gone"
            ) from None
    try:
        cleaned = clean_leftovers(output, storage_options)
        if cleaned:
            print(f"cleanup: removed or finished {len(cleaned)} leftover(s) of an interrupted "
                  f"run ({', '.join(cleaned[:3])}{', ...' if len(cleaned) > 3 else ''})",
                  file=log or sys.stderr)
        yield
    finally:
        from repscope.jobs.state import StateStore

        StateStore(output, storage_options).prune_empty()  # a failed run's emptied folders
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass
