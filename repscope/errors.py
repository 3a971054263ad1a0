"""One error hierarchy for all of repscope.

Every error a user can cause derives from :class:`RepscopeError` and also from the builtin
it resembles, so callers can catch either. The CLI turns them into one line on stderr (no
traceback) and the exit code below: 2 for usage and input errors, 1 for runtime failures.
Messages name the offending model, layer, rows, field or URL and, where there is one, the fix.
"""

from __future__ import annotations


class RepscopeError(Exception):
    """Base class of every error repscope raises on purpose."""

    exit_code = 1


class InputError(RepscopeError, ValueError):
    """Bad input: data, names, specs or arguments. Raised before any work is done."""

    exit_code = 2


class NotFoundError(RepscopeError, FileNotFoundError):
    """A store, unit, file, model, layer or results store that does not exist."""

    exit_code = 2


class SpecError(InputError):
    """A malformed or inconsistent job spec."""


class StorageError(RepscopeError, OSError):
    """The storage backend failed (unreachable, refused, timed out) after bounded retries.

    An ``OSError``: such failures are often transient, so executors may retry the task.
    """

    exit_code = 1


class IntegrityError(RepscopeError, RuntimeError):
    """Stored data is missing or damaged: a deleted or truncated shard, a checksum mismatch,
    unreadable metadata. Deliberately not an ``OSError``: a retry reads the same bytes, so
    executors must not retry it. The message names the store, unit, shard and rows.
    """

    exit_code = 1


class ConflictError(RepscopeError, RuntimeError):
    """Another run holds the output, or the output holds results of a different spec."""

    exit_code = 1


class UnitChangedError(ConflictError):
    """The version of a unit that a reader pinned (``UnitInfo.version``) is gone or changed,
    because the unit was ingested again and the old version removed. Not retried: rerun
    the job to read the current version.
    """
