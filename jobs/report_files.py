"""Report file names that never collide, and report folders that are never overwritten blindly.

A report writes one file per model pair and metric, so its names come from model and metric
names, which may hold characters a file name cannot (`/`, spaces) or differ only in case (one
file on macOS and Windows). `file_stems` keeps a name as it is when it is safe and distinct,
and otherwise sanitises it and appends a hash of the original name.

`ReportFolder` lists what repscope wrote in `.repscope-report.json` inside the folder; a
later report replaces those files but refuses to replace a file it did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from repscope.errors import ConflictError, InputError

MANIFEST = ".repscope-report.json"
#: Longer names are cut (and hashed): file systems allow 255 bytes for a whole file name,
#: which holds two model names and a metric.
MAX_STEM = 60


def _sanitise(name: str) -> str:
    # "__" separates the parts of a file name (metric__a__vs__b), so no stem holds it nor
    # starts or ends with "_"; no stem starts with "." (hidden files, "..").
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    safe = re.sub(r"_{2,}", "_", safe).strip("_").lstrip(".")
    return safe[:MAX_STEM] or "x"


def _hashed(name: str) -> str:
    return f"{_sanitise(name)}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def file_stems(names: Sequence[str]) -> dict[str, str]:
    """{name: the part of a file name that stands for it}, distinct even on case-insensitive
    file systems: the name itself when it is safe (letters, digits, `_.-`, no `__`, no `_`
    at either end, no leading dot, at most MAX_STEM characters) and no other name equals it
    ignoring case; otherwise its sanitised form plus `-` and 8 hex digits of its SHA-1."""
    unique = list(dict.fromkeys(names))
    stems = {n: n if _sanitise(n) == n else _hashed(n) for n in unique}
    folded = Counter(s.lower() for s in stems.values())
    stems = {n: _hashed(n) if folded[s.lower()] > 1 else s for n, s in stems.items()}
    if len({s.lower() for s in stems.values()}) != len(stems):  # only if SHA-1 prefixes meet
        raise InputError("model or metric names give colliding report file names: "
                         + ", ".join(sorted(unique)))
    return stems


class ReportFolder:
    """A folder of report files: replaces only files that an earlier report wrote."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"report folder {self.path} is a file, not a folder")

    def _manifest(self) -> set[str]:
        try:
            return set(json.loads((self.path / MANIFEST).read_text())["files"])
        except FileNotFoundError:
            return set()
        except (ValueError, KeyError, TypeError):
            raise ConflictError(f"{self.path / MANIFEST} is not a repscope report list; "
                                "choose another report folder") from None

    def claim(self, paths: Iterable[Path]) -> None:
        """Check, before anything is written, that every path is distinct (ignoring case) and
        either new or written by an earlier report; then list them as repscope's.
        ConflictError naming the first file repscope did not write."""
        names = [Path(p).name for p in paths]
        folded = Counter(n.lower() for n in names)
        twice = sorted(n for n in names if folded[n.lower()] > 1)
        if twice:  # file_stems prevents this; a check, so a bug can never overwrite silently
            raise ConflictError(f"report files would share a name: {', '.join(twice)}")
        ours = self._manifest()
        for name in names:
            if name not in ours and (self.path / name).exists():
                raise ConflictError(
                    f"{self.path / name} exists and was not written by repscope report; "
                    "choose another report folder (--out) or move the file")
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f"{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"files": sorted(ours | set(names))}, indent=0))
        os.replace(tmp, self.path / MANIFEST)
