"""The rows of a store: the row set a writer brings, the one a store holds, and how they compare.

Every unit of a store has the same rows in the same order. The first unit to be published
fixes them; later units must be compatible. A :class:`RowSet` is what a writer brings (row
count, optional ids, for token input the example map and padding mask); a :class:`RowMeta` is
what the store records about its rows (docs/store.md, "rows/zarr.json"). The record holds a
digest of each part, so a writer is checked without reading the store's row arrays (they are
read only to point at the first differing id).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from repscope.errors import IntegrityError
from repscope.store import layout


@dataclass(frozen=True)
class RowSet:
    """The rows of an ingest: count, optional ids, and for token input the example map.

    ``ids`` has one entry per row (2-D input) or per example (3-D input, ``ids_level``
    "example"); ``example`` is the (rows,) int64 row -> example map, ``mask`` the
    (examples, tokens) bool padding mask (True = padded, dropped) of 3-D input.
    """

    n_rows: int
    ids: np.ndarray | None = None
    ids_level: str = "row"
    example: np.ndarray | None = None
    mask: np.ndarray | None = None

    @property
    def fingerprint(self) -> str:
        return layout.row_fingerprint(self.n_rows, self.ids, self.example, self.mask)

    def ids_digest(self) -> str | None:
        return None if self.ids is None else layout.ids_digest(self.ids, self.ids_level)

    def tokens_digest(self) -> str | None:
        return None if self.example is None else layout.tokens_digest(self.example, self.mask)

    def record(self, model: str, layer: str, at: float) -> dict:
        """The ``repscope_rows`` record of this row set, set by unit (model, layer) at ``at``."""
        return {
            "n_rows": int(self.n_rows),
            "row_fingerprint": self.fingerprint,
            "row_ids": self.ids is not None,
            "row_ids_level": self.ids_level,
            "ids_digest": self.ids_digest(),
            "example_map": self.example is not None,
            "padding_mask": self.mask is not None,
            "tokens_digest": self.tokens_digest(),
            "set_by": [model, layer],
            "set_at": float(at),
        }


@dataclass(frozen=True)
class RowMeta:
    """What a store records about its rows (format 2: ``rows/zarr.json``; format 1: the root)."""

    n_rows: int
    row_fingerprint: str
    row_ids: bool = False
    row_ids_level: str = "row"
    example_map: bool = False
    padding_mask: bool = False
    ids_digest: str | None = None  # None in format 1 (compare the arrays instead)
    tokens_digest: str | None = None
    set_by: tuple[str, str] | None = None
    set_at: float | None = None

    @classmethod
    def parse(cls, record: object, where: str) -> RowMeta | None:
        """The record found at ``where``, validated; None when no rows are set yet.

        A record that is not what repscope writes (a non-numeric row count, a missing
        fingerprint) is an :class:`IntegrityError` naming ``where``.
        """
        if not isinstance(record, dict) or "n_rows" not in record:
            if isinstance(record, dict) or record is None:
                return None
            raise IntegrityError(f"{where}: row metadata is damaged (not an object)")
        n = record.get("n_rows")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise IntegrityError(
                f"{where}: row metadata is damaged: n_rows is {_short(n)}, not a row count"
            )
        fingerprint = record.get("row_fingerprint")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise IntegrityError(f"{where}: row metadata is damaged: no row_fingerprint")
        flags = {}
        for key in ("row_ids", "example_map", "padding_mask"):
            value = record.get(key, False)
            if not isinstance(value, bool):
                raise IntegrityError(
                    f"{where}: row metadata is damaged: {key} is {_short(value)}, not true/false"
                )
            flags[key] = value
        level = record.get("row_ids_level", "row")
        set_by = record.get("set_by")
        set_at = record.get("set_at")
        return cls(
            n_rows=n,
            row_fingerprint=fingerprint,
            row_ids_level=level if level in ("row", "example") else "row",
            ids_digest=_str_or_none(record.get("ids_digest")),
            tokens_digest=_str_or_none(record.get("tokens_digest")),
            set_by=tuple(set_by) if _is_name_pair(set_by) else None,
            set_at=float(set_at) if isinstance(set_at, int | float) else None,
            **flags,
        )


def incompatibility(
    stored: RowMeta,
    given: RowSet,
    ctx: str,
    stored_ids: Callable[[], np.ndarray | None],
) -> str | None:
    """Why rows ``given`` cannot join a store whose rows are ``stored``, or None if they can.

    Rows join when the count matches and, for each part the writer gives (ids, token
    layout), the store has the same part. A writer that gives no ids may join a store with
    ids (its rows are then taken to be those). ``stored_ids`` loads the store's ids, only
    to name the first difference.
    """
    if stored.n_rows != given.n_rows:
        return (
            f"{ctx}: {given.n_rows} rows, but the store's units have {stored.n_rows} rows; "
            "every unit of a store must have the same rows in the same order"
        )
    if given.ids is not None:
        if not stored.row_ids:
            return (
                f"{ctx}: row_ids given, but the store's units were ingested without row ids; "
                "ingest without row_ids or into a new store"
            )
        if stored.row_ids_level != given.ids_level or stored.ids_digest != given.ids_digest():
            ids = stored_ids()
            diff = "" if ids is None else " " + first_difference(ids, given.ids)
            return f"{ctx}: row_ids differ from the store's{diff}"
    if given.example is not None:
        if not stored.example_map:
            return (
                f"{ctx}: token (3-D) input, but the store's rows are not token rows of "
                "examples; ingest 2-D (rows, features) arrays into this store"
            )
        if stored.tokens_digest != given.tokens_digest():
            return (
                f"{ctx}: token layout (example map or padding mask) differs from the "
                "store's; every unit must have the same examples and tokens"
            )
    return None


def first_difference(a: np.ndarray, b: np.ndarray) -> str:
    """Where two id arrays first differ, for messages."""
    if a.shape != b.shape:
        return f"({a.shape[0]} stored, {b.shape[0]} given)"
    sa, sb = a.astype(str), b.astype(str)
    i = int(np.argmax(sa != sb))
    return f"(first difference at index {i}: stored {str(sa[i])!r}, given {str(sb[i])!r})"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _is_name_pair(value: object) -> bool:
    return isinstance(value, list | tuple) and len(value) == 2 and all(
        isinstance(v, str) for v in value
    )
