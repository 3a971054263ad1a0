"""How messages spell a setting: as the Python keyword (``overwrite=True``) or, while the
command line runs, as its flag (``--overwrite``).

Errors are raised deep inside ingest and the writer, which do not know who called them. The
CLI runs its work inside :func:`cli_spelling`; messages name settings through
:func:`setting`, so each caller reads the spelling it can act on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# setting -> (Python spelling, command-line spelling)
_SPELLINGS = {
    "overwrite": ("overwrite=True", "--overwrite"),
    "layer": ("layer=...", "--layer"),
    "resume": ("resume=True", "--resume"),
}
_CLI: ContextVar[bool] = ContextVar("repscope_cli_spelling", default=False)


def setting(name: str) -> str:
    """How to write setting ``name`` for the caller: ``overwrite=True`` or ``--overwrite``."""
    python, cli = _SPELLINGS[name]
    return cli if _CLI.get() else python


@contextmanager
def cli_spelling() -> Iterator[None]:
    """Within this block, messages spell settings as command-line flags."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)
