"""What repscope may write, replace or delete at a job's output, checked before any work.

The rule: repscope replaces or deletes only what it can prove it wrote. A results store
proves it by its root attribute ``repscope_results`` (the id of the write that made it;
stores written by repscope 0.2 carry ``repscope_version`` and ``directions`` instead) and
by holding nothing but its own Zarr nodes. Anything else at the output (a folder of other
files, a regular file, an activation store, a Zarr store of another tool, the working
folder) is refused with one line, ``--overwrite`` included, and so is an output that is the
job's store, lies inside it or contains it.

Beside an output ``results.zarr`` repscope writes only:

- ``results.zarr.lock``: while a run writes it (jobs/lock.py);
- ``results.zarr.state/``: checkpoints and nightly state (jobs/state.py);
- ``.results.zarr.repscope-<id>/``: a local write in progress (an ``owner.json`` naming it
  and the new result in ``data/``), swapped into place when complete (jobs/results.py);
- ``results.zarr.staging`` and ``results.zarr.commit``: an object-store write in progress.

A killed run can leave the last three behind; :func:`clean_leftovers` (run when the next
run takes the lock) finishes or removes them, again only what carries repscope's marks.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
from pathlib import Path

from repscope.errors import InputError

MARKER = "repscope_results"  # root attribute of every results store: the id of its write
TEMP_OWNER = "repscope-results-temp"  # owner.json of a local write in progress
STATE_KINDS = ("partials", "units", "tiles", "caches", "history")
# Schemes an output may use (memory:// only from Python: a command's memory ends with it).
_OUTPUT_SCHEMES = {"file": None, "memory": None, "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs",
                   "gcs": "gcsfs"}
_TEMP_SUFFIX = ".repscope-"  # .<name>.repscope-<8 hex>
_LONGEST_SIBLING = len(".") + len(_TEMP_SUFFIX) + 8  # the longest name repscope adds


def is_results_attrs(attrs: dict) -> bool:
    """True for the root attributes of a results store repscope wrote."""
    return MARKER in attrs or ("repscope_version" in attrs and "directions" in attrs)


def temp_name(name: str, token: str) -> str:
    """The sibling folder a local write of output ``name`` goes to first."""
    return f".{name}{_TEMP_SUFFIX}{token}"


def temp_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}{re.escape(_TEMP_SUFFIX)}[0-9a-f]{{8}}$")


def _shown(url: str) -> str:
    from repscope.store import redact

    return redact(url)


# --- what is at a path ------------------------------------------------------------------

def read_root_attrs(fs, path: str) -> dict | None:
    """The attributes in ``<path>/zarr.json``; None if there is none; InputError if it is
    not readable JSON (not something repscope can prove it wrote)."""
    try:
        raw = fs.cat_file(f"{path.rstrip('/')}/zarr.json")
    except FileNotFoundError:
        return None
    except (IsADirectoryError, NotADirectoryError):
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        raise InputError(f"{_shown(path)}/zarr.json is not valid JSON") from None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return attrs if isinstance(attrs, dict) else {}


def _entries(fs, path: str) -> list[str]:
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)
                  if p.rstrip("/") != path.rstrip("/"))


def _foreign_entries(fs, path: str) -> list[str]:
    """Entries of a results store that are not its own Zarr nodes."""
    try:
        meta = json.loads(fs.cat_file(f"{path}/zarr.json"))
    except (FileNotFoundError, ValueError):
        meta = {}
    members = (meta.get("consolidated_metadata") or {}).get("metadata")
    foreign = []
    for name in _entries(fs, path):
        if name == "zarr.json":
            continue
        own = (members is None or name in members) and fs.exists(f"{path}/{name}/zarr.json")
        if not own:
            foreign.append(name)
    return foreign


def existing_output(fs, path: str, url: str) -> str:
    """What is at an output path: "absent", "empty" (an empty folder) or "results" (a
    results store repscope wrote, holding nothing else). Anything else: InputError."""
    shown = _shown(url)
    advice = "choose another output, or move it away yourself"
    if not fs.exists(path):
        return "absent"
    if not fs.isdir(path):
        raise InputError(f"output {shown} is an existing file, not a results store; "
                         f"repscope replaces only results stores it wrote: {advice}")
    attrs = read_root_attrs(fs, path)
    if attrs is None:
        entries = _entries(fs, path)
        if not entries:
            return "empty"
        example = ", ".join(repr(e) for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
        count = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
        raise InputError(f"output {shown} is an existing folder that is not a results store "
                         f"(it holds {count}: {example}); repscope replaces only "
                         f"results stores it wrote: {advice}")
    if "repscope" in attrs and not is_results_attrs(attrs):
        raise InputError(f"output {shown} is an activation store (repscope ingest), not a "
                         "results store: give the job an output path of its own")
    if not is_results_attrs(attrs):
        raise InputError(f"output {shown} is a Zarr store that repscope did not write: "
                         f"{advice}")
    foreign = _foreign_entries(fs, path)
    if foreign:
        raise InputError(f"output {shown} is a results store that also holds entries "
                         f"repscope did not write ({', '.join(repr(f) for f in foreign[:3])}); "
                         "move them out before rewriting it")
    return "results"


# --- the pre-flight check ---------------------------------------------------------------

def _norm_remote(url: str) -> str:
    """s3a:// -> s3://, gcs:// -> gs://, no user info, no trailing slash."""
    scheme, rest = url.split("://", 1)
    scheme = {"s3a": "s3", "gcs": "gs"}.get(scheme.lower(), scheme.lower())
    rest = rest.rsplit("@", 1)[-1] if "@" in rest.split("/", 1)[0] else rest
    return f"{scheme}://{rest.strip('/')}"


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _containment(output_key: str, store_key: str, output: str, store: str) -> None:
    if output_key == store_key:
        raise InputError(f"output {_shown(output)} is the job's activation store: results "
                         "need a path of their own (for example results.zarr beside it)")
    if _within(output_key, store_key):
        raise InputError(f"output {_shown(output)} lies inside the activation store "
                         f"{_shown(store)}: choose a path outside it")
    if _within(store_key, output_key):
        raise InputError(f"output {_shown(output)} contains the activation store "
                         f"{_shown(store)}: choose a path that does not hold it")


def check_output_safe(output: str, store_url: str | None = None,
                      storage_options: dict | None = None) -> None:
    """Refuse, with one line (InputError, exit 2), an output that a run could not write
    without moving or deleting something repscope did not write, or could not write at all:

    - an unsupported URL scheme, or one whose backend is not installed;
    - anything at the output but an empty folder or a results store repscope wrote
      (module docs), whatever ``--overwrite`` says;
    - the job's store (``store_url``), a path inside it or a path that contains it; a path
      inside any Zarr store; the working folder or a folder that holds it;
    - a local path below a file, in a folder that cannot be written (read-only file system,
      no permission), or with a name too long for the file system once repscope's
      siblings (``.state``, ``.lock``, a temporary copy) are added.

    Cheap (a few metadata reads); it writes nothing. Storage failures: StorageError (exit 1).
    """
    from repscope.store import urls

    scheme = urls.scheme_of(output)
    if scheme not in _OUTPUT_SCHEMES:
        raise InputError(f"unsupported output URL {_shown(output)}: supported are local "
                         "paths, file://, s3://, gs://")
    module = _OUTPUT_SCHEMES[scheme]
    if module is not None:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            extra = "s3" if module == "s3fs" else "gcs"
            raise InputError(f"output {_shown(output)} needs the '{module}' package: "
                             f"pip install 'repscope[{extra}]'")
    store_local = None
    if store_url is not None and urls.scheme_of(store_url) == "file":
        store_local = os.path.realpath(urls.local_path(store_url))
    if scheme == "file":
        _check_local(output, urls.local_path(output), store_url, store_local)
        return
    if store_url is not None and store_local is None:
        _containment(_norm_remote(output), _norm_remote(store_url), output, store_url)
    with urls.storage_errors(output, storage_options):
        fs, path = _fs(output, storage_options)
        path = path.rstrip("/")
        existing_output(fs, path, output)
        staging = f"{path}.staging"
        if fs.exists(staging) and not fs.exists(f"{path}.commit"):
            attrs = read_root_attrs(fs, staging) if fs.isdir(staging) else None
            if attrs is None or not is_results_attrs(attrs):
                raise InputError(f"{_shown(output)}.staging exists and is not repscope's "
                                 "staging copy: move it away")


def _fs(url: str, storage_options: dict | None):
    import fsspec

    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def _check_local(output: str, path: Path, store_url: str | None, store_local: str | None):
    import fsspec

    shown = _shown(output)
    absolute = Path(os.path.abspath(path))
    real = os.path.realpath(absolute)
    cwd = os.path.realpath(os.getcwd())
    if _within(cwd, real):
        what = "is" if cwd == real else "holds"
        raise InputError(f"output {shown} {what} the working folder: results need a path "
                         "of their own (for example results.zarr)")
    if store_local is not None:
        _containment(real, store_local, output, store_url)
    # Every component must fit, and the output's name with repscope's longest sibling.
    parts = absolute.parts[1:]
    for k, part in enumerate(parts):
        limit = 255 - (_LONGEST_SIBLING if k == len(parts) - 1 else 0)
        if len(os.fsencode(part)) > limit:
            raise InputError(f"output {shown}: the name {part[:40]!r}... is "
                             f"{len(os.fsencode(part))} bytes; file systems allow 255, and "
                             f"repscope adds up to {_LONGEST_SIBLING} to the output's name "
                             f"(so at most {limit})")
    # The nearest existing folder above (or at) the output: a folder we may write.
    above = Path(real).parent
    while not os.path.lexists(above):
        above = above.parent
    if not os.path.isdir(above):
        raise InputError(f"output {shown}: {above} is a file, not a folder")
    # An output inside any Zarr store would become part of it: name the store's root.
    zarr_roots = [p for p in (above, *above.parents) if (p / "zarr.json").is_file()]
    if zarr_roots:
        raise InputError(f"output {shown} lies inside the Zarr store {zarr_roots[-1]}: "
                         "choose a path outside it")
    fs = fsspec.filesystem("file")
    existing_output(fs, real, output)
    if not os.access(above, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(above) else "permission denied"
        raise InputError(f"output {shown}: cannot write in {above} ({reason}); choose an "
                         "output you can write")
    state = Path(f"{absolute}.state")  # beside the output as named (jobs.state)
    if os.path.lexists(state):
        extra = sorted(set(os.listdir(state)) - set(STATE_KINDS)) if state.is_dir() else [""]
        if extra:
            raise InputError(f"{shown}.state exists and is not repscope's state folder "
                             f"(it holds {extra[0]!r}): move it away")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# --- leftovers of killed runs -----------------------------------------------------------

def clean_leftovers(output: str, storage_options: dict | None = None) -> list[str]:
    """Finish or remove what a killed run left beside ``output``; call it only while
    holding the output's lock. Removes only what carries repscope's marks (module docs):
    temporary write folders (an interrupted swap is finished first), the version folders of
    repscope 0.2's layout, a staging copy that never reached its commit marker (one that
    did is rolled forward), half-written temporary state files and history snapshots.
    Returns what it removed or finished, for one line on the log."""
    from repscope.store import urls

    done: list[str] = []
    if urls.scheme_of(output) == "file":
        path = Path(os.path.abspath(urls.local_path(output)))
        done += _clean_local(path)
    else:
        from repscope.jobs import results

        with urls.storage_errors(output, storage_options):
            fs, path = _fs(output, storage_options)
            path = path.rstrip("/")
            if fs.exists(f"{path}.commit"):
                results.roll_forward(output, storage_options)
                done.append(f"{_shown(output)}: finished an interrupted commit")
            elif fs.exists(f"{path}.staging"):
                attrs = read_root_attrs(fs, f"{path}.staging")
                if attrs is not None and is_results_attrs(attrs):
                    fs.rm(f"{path}.staging", recursive=True)
                    done.append(f"{_shown(output)}.staging")
    from repscope.jobs.state import StateStore

    done += StateStore(output, storage_options).clean_leftovers()
    return done


def read_owner(folder: Path) -> dict | None:
    """owner.json of a local temporary write folder, or None if it is not repscope's."""
    try:
        owner = json.loads((folder / "owner.json").read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and owner.get("repscope") == TEMP_OWNER else None


def _clean_local(path: Path) -> list[str]:
    parent, name = path.parent, path.name
    if not parent.is_dir():
        return []
    done = []
    pattern = temp_pattern(name)
    for entry in sorted(parent.iterdir()):
        if not pattern.match(entry.name) or not entry.is_dir() or entry.is_symlink():
            continue
        owner = read_owner(entry)
        if owner is None or owner.get("output") != name:
            continue
        # A swap without RENAME_EXCHANGE is two renames: a crash between them leaves no
        # output, the previous result in old/ and the complete new one in data/.
        if not os.path.lexists(path):
            for sub in ("data", "old"):
                if (entry / sub).is_dir() and (sub == "old" or owner.get("complete")):
                    os.rename(entry / sub, path)
                    done.append(f"{path}: restored from an interrupted write")
                    break
        shutil.rmtree(entry)
        done.append(str(entry))
    done += remove_legacy_versions(path)
    return done


def legacy_link(path: Path) -> bool:
    """True if ``path`` is repscope 0.2's layout: a link into ``.<name>.versions/``."""
    if not path.is_symlink():
        return False
    target = Path(os.path.normpath(path.parent / os.readlink(path)))
    return target.parent == path.parent / f".{path.name}.versions"


def remove_legacy_versions(path: Path) -> list[str]:
    """Remove repscope 0.2's ``.<name>.versions/`` folder once ``path`` no longer links into
    it: its results stores and stray ``.<name>.link-*`` links; anything else is kept."""
    if legacy_link(path):
        return []
    versions = path.parent / f".{path.name}.versions"
    done = []
    for link in path.parent.glob(f".{glob.escape(path.name)}.link-*"):
        if link.is_symlink():
            link.unlink()
            done.append(str(link))
    if not versions.is_dir() or versions.is_symlink():
        return done
    import fsspec

    fs = fsspec.filesystem("file")
    for entry in sorted(versions.iterdir()):
        try:
            attrs = read_root_attrs(fs, str(entry)) if entry.is_dir() else None
        except InputError:
            attrs = None
        if attrs is not None and is_results_attrs(attrs) and not entry.is_symlink():
            shutil.rmtree(entry)
            done.append(str(entry))
    try:
        versions.rmdir()
    except OSError as exc:  # kept: it holds something repscope cannot prove it wrote
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    return done


