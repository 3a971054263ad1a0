"""The `repscope` command line, and its one error boundary.

Each subcommand lives beside the code it drives and registers itself here through a
``register(subparsers)`` function; this module parses, dispatches, and ends every command
that fails in ONE line on stderr naming the culprit, never a traceback:

- exit 2 for what the user gave: a :class:`~repscope.errors.RepscopeError` with exit code 2
  (bad spec, names, rows, an output that may not be written), a usage error, or an OSError
  about a path the user named (permission denied, read-only, not a folder, exists...);
- exit 1 for what the machine did: other RepscopeErrors (storage failures, conflicts), a
  full disk, any other OSError, and unexpected exceptions (their type and message, and
  the hint to set ``REPSCOPE_DEBUG=1`` for the traceback);
- 130 for Ctrl-C.

Every line this boundary prints (errors and warnings) has the storage options' values, the
credentials in the environment and ``user:password@`` in URLs replaced by ``***``. Warnings
(repscope's own and its dependencies') reach the user as one line each,
``repscope run: warning: ...``, each distinct message once.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from repscope import __version__
from repscope.errors import InputError, RepscopeError

# Modules that define subcommands: each has register(subparsers) -> None, and every parser
# it adds sets `func=callable(args) -> int`.
_COMMAND_MODULES = ("repscope.store.cli", "repscope.jobs.capture", "repscope.jobs.commands")
# Commands whose first argument is a job spec (its store and output are checked here too).
_SPEC_COMMANDS = ("run", "nightly", "ground", "submit")
# Environment variables whose values are credentials: never printed.
_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
                     "RAY_AUTH_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS_JSON")
# OSErrors about a path the user named (exit 2), and how to say them; others exit 1.
_USER_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "not a folder",
    errno.EISDIR: "is a folder",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "name too long",
    errno.ENOENT: "no such file or folder",
}
_MACHINE_ERRNOS = {
    errno.ENOSPC: "disk full: free some space and rerun",
    errno.EDQUOT: "disk quota exceeded: free some space and rerun",
}
LINE_LIMIT = 500  # characters of one message line


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (exit 2) instead of usage and error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = _Parser(
        prog="repscope",
        description="Compare neural network representations at scale (CKA, CCA, Procrustes).",
    )
    parser.add_argument("--version", action="version", version=f"repscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = f"repscope {args.command}"
    secrets = _secrets(args)

    def say(kind: str, text: str) -> None:
        print(f"{prefix}: {kind}: {one_line(text, secrets)}", file=sys.stderr, flush=True)

    with _warnings_as_lines(say):
        try:
            refuse_memory_urls(args)
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            print(f"{prefix}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `repscope show ... | head`: the reader has what it wanted
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (closed at exit)
            return 0
        except Exception as exc:
            if os.environ.get("REPSCOPE_DEBUG"):
                traceback.print_exc()
            text, code = describe_error(exc)
            say("error", text)
            # Aborted async storage I/O (s3fs, gcsfs) leaves coroutines that complain when
            # they are collected at exit: the line above says what happened.
            sys.unraisablehook = lambda unraisable: None
            return code


def describe_error(exc: BaseException) -> tuple[str, int]:
    """(message, exit code) for an exception that ends a command (module docs)."""
    exc = _cause(exc)
    if isinstance(exc, RepscopeError):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError) and exc.errno in _USER_ERRNOS | _MACHINE_ERRNOS:
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        what = _USER_ERRNOS.get(exc.errno) or _MACHINE_ERRNOS[exc.errno]
        text = f"{where}: {what}" if where else f"{what} ({exc.strerror or exc})"
        return text, 2 if exc.errno in _USER_ERRNOS else 1
    if isinstance(exc, OSError):
        where = f" at {exc.filename}" if exc.filename else ""
        return f"{type(exc).__name__}{where}: {exc.strerror or exc}", 1
    if isinstance(exc, MemoryError):
        return "out of memory (MemoryError): use fewer rows or a smaller memory_per_worker", 1
    return (f"unexpected {type(exc).__name__}: {exc} (this is a bug in repscope or a "
            "dependency; set REPSCOPE_DEBUG=1 for the traceback)"), 1


def _cause(exc: BaseException) -> BaseException:
    """The exception a task raised, out of Ray's wrappers (RayTaskError keeps it as .cause;
    its own message is the remote traceback)."""
    for _ in range(10):
        cause = getattr(exc, "cause", None)
        if not type(exc).__module__.startswith("ray") or not isinstance(cause, BaseException):
            break
        exc = cause
    return exc


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")


def one_line(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` on one line, at most LINE_LIMIT characters, with every secret value masked
    and every URL redacted (user info, signature and token parameters); the rest of the
    text is left alone (a hint such as KEY=VALUE is not a credential)."""
    from repscope.store import redact

    masked = _URL.sub(lambda m: redact(m.group(0)), str(text))
    # Longest first, so that a secret containing another is masked whole.
    for secret in sorted({v for v in secrets if len(v) >= 4}, key=len, reverse=True):
        masked = masked.replace(secret, "***")
    flat = " ".join(masked.split())
    return flat if len(flat) <= LINE_LIMIT else flat[: LINE_LIMIT - 3] + "..."


def _secrets(args: argparse.Namespace) -> list[str]:
    """Values that must never be printed: storage options given on the command line or in
    the spec, and credentials in the environment."""
    from repscope.jobs.spec import secret_values, url_userinfo
    from repscope.store.cli import parse_storage_options
    from repscope.store.urls import option_values

    values = [os.environ[name] for name in _SECRET_VARIABLES if os.environ.get(name)]
    try:
        values += option_values(parse_storage_options(getattr(args, "storage_option", None)
                                                      or []))
    except InputError:
        pass
    for name in ("store", "results"):
        url = getattr(args, name, None)
        values += url_userinfo(url) if isinstance(url, str) else []
    spec = getattr(args, "spec", None)
    if args.command in _SPEC_COMMANDS and isinstance(spec, str):
        values += secret_values(spec)
    return values


def refuse_memory_urls(args: argparse.Namespace) -> None:
    """memory:// lives inside one process: a command can neither find a memory:// store
    made by another nor leave one behind. Refused at once (the Python API, which runs in
    one process, accepts it)."""
    from repscope.store import redact
    from repscope.store.urls import scheme_of

    def check(url, role: str) -> None:
        if not isinstance(url, str) or scheme_of(url) != "memory":
            return
        if args.command == "submit":
            why = ("the cluster cannot read this process's memory (memory:// lives inside "
                   "one process)")
        elif role == "read":
            why = "it is empty in a new command (memory:// lives inside one process)"
        else:
            why = (f"what `repscope {args.command}` writes there would vanish when it exits "
                   "(memory:// lives inside one process)")
        raise InputError(f"{redact(url)}: {why}; use a local path or s3://, or memory:// "
                         "from Python")

    writes = args.command == "ingest"
    check(getattr(args, "store", None), "write" if writes else "read")
    check(getattr(args, "results", None), "read")
    if args.command in _SPEC_COMMANDS and isinstance(getattr(args, "spec", None), str):
        from repscope.jobs.capture_spec import is_capture_spec, load_capture_spec
        from repscope.jobs.spec import load_spec

        if args.command == "submit" and is_capture_spec(args.spec):
            check(load_capture_spec(args.spec).store, "write")
            return
        spec = load_spec(args.spec)
        check(spec.store, "read")
        check(spec.output, "write")


@contextmanager
def _warnings_as_lines(say: Callable[[str, str], None]) -> Iterator[None]:
    """Show each distinct warning once, as one line through ``say``."""
    seen: set[str] = set()
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        if category is not UserWarning:
            text = f"{category.__name__}: {text}"
        if text not in seen:
            seen.add(text)
            say("warning", text)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


if __name__ == "__main__":
    sys.exit(main())
