"""The `repscope` command line.

Each subcommand lives beside the code it drives and registers itself here through a
``register(subparsers)`` function; this module only parses, dispatches and turns
:class:`~store.errors.RepscopeError` into one line on stderr and an exit code
(2 usage/input, 1 runtime), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from repscope import __version__
from repscope.errors import RepscopeError

# Modules that define subcommands: each has register(subparsers) -> None, and every parser
# it adds sets `func=callable(args) -> int`.
_COMMAND_MODULES = ("repscope.store.cli", "repscope.jobs.capture", "repscope.jobs.commands")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
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
    try:
        return int(args.func(args) or 0)
    except RepscopeError as exc:
        print(f"repscope {args.command}: error: {exc}", file=sys.stderr)
        # Aborted async storage I/O (s3fs, gcsfs) leaves coroutines that complain when they
        # are collected at exit: the error above says what happened, so keep stderr clean.
        sys.unraisablehook = lambda unraisable: None
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"repscope {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
