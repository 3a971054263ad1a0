"""Copy a format-1 store into a new format-2 store: ``python -m repscope.store.upgrade OLD NEW``.

Format 1 (repscope 0.2) is read but not written by this version. The copy keeps every unit's
values, dtype, source dtype, chunking and fingerprint (so incremental runs see no change),
and the rows (ids, token layout). It streams shard by shard; the old store is not modified.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from repscope.errors import InputError, RepscopeError
from repscope.store.activation_store import ActivationStore
from repscope.store.rows import RowSet
from repscope.store.writer import UnitWriter


def upgrade(
    source: str,
    target: str,
    storage_options: dict | None = None,
    target_options: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> ActivationStore:
    """Copy store ``source`` (any readable format) into a new store at ``target``.

    ``target`` must not hold units yet. ``target_options`` default to ``storage_options``.
    Returns the new store.
    """
    old = ActivationStore.open(source, storage_options)
    new = ActivationStore.create(target, storage_options if target_options is None
                                 else target_options)
    if new.units():
        raise InputError(f"{new.url} already holds units; upgrade into a new location")
    units = old.units()
    rows = None
    if units:
        meta = old.catalog.rows()
        rows = RowSet(
            n_rows=meta.n_rows,
            ids=old.row_ids(),
            ids_level=meta.row_ids_level,
            example=old.example_index(),
            mask=old.padding_mask(),
        )
    for model, layer in units:
        info = old.unit_info(model, layer)
        row_bytes = info.features * (2 if info.dtype == "float16" else 4)
        if progress is not None:
            progress(f"copying {model}/{layer} ({info.rows} x {info.features} {info.dtype})")
        writer = UnitWriter(
            new, model, layer, features=info.features, dtype=info.dtype,
            chunk_bytes=info.chunk_rows * row_bytes, shard_bytes=info.shard_rows * row_bytes,
            _row_set=rows, _source_dtype=info.source_dtype,
        )
        with writer:
            for start in range(0, info.rows, info.shard_rows):
                stop = min(info.rows, start + info.shard_rows)
                writer.append(old.read(model, layer, start, stop, version=info.version))
        copied = new.unit_info(model, layer)
        if old.format == 1 and info.fingerprint and copied.fingerprint != info.fingerprint:
            raise RepscopeError(f"model {model!r}, layer {layer!r}: copy differs from source")
    return new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m repscope.store.upgrade",
        description="Copy an activation store (format 1) into a new format-2 store.",
    )
    parser.add_argument("source", metavar="OLD", help="store to copy (not modified)")
    parser.add_argument("target", metavar="NEW", help="new store location")
    args = parser.parse_args(argv)
    try:
        new = upgrade(args.source, args.target, progress=lambda line: print(line, file=sys.stderr))
    except RepscopeError as exc:
        print(f"upgrade: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{new.url}: {len(new.units())} units, format {new.format}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
