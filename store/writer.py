"""UnitWriter: write one unit shard by shard, and publish it only when it is complete.

How a unit becomes visible (the same on local disk, memory:// and s3://, which has no
rename): the writer asks the store's catalog for a new *version* of the unit, writes the
version's array ``units/<model>/<layer>/<version>`` shard by shard (every chunk, each with its
CRC32C), marks the array complete, and asks the catalog to publish it: the store's rows are
checked (or recorded, for the first unit) and the unit's current version is switched in one
document write. Until then readers see the previous version, or no unit. An interrupted
writer leaves an unfinished version that nobody reads and that the next ingest of that unit
removes.

Memory: one shard buffer (``shard_bytes``) in storage dtype, plus the batch being appended
and the encoded shard while it is written; never the whole unit. Token writers also keep
the (examples, tokens) padding mask, one byte per position.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from repscope.errors import InputError
from repscope.store import layout
from repscope.store.activation_store import ActivationStore, UnitInfo
from repscope.store.catalog import UnitEntry
from repscope.store.hints import setting
from repscope.store.rows import RowSet
from repscope.store.validate import (
    check_name,
    check_padding_mask,
    check_row_ids,
    check_source_dtype,
    check_storage_dtype,
    convert_block,
    where,
)


class UnclosedWriterWarning(UserWarning):
    """A UnitWriter was garbage-collected without close() or abort(): its unit stays invisible."""


class UnitWriter:
    """Streaming writer of one unit (model, layer) of shape (rows, features).

    Append (batch_rows, features) batches from a training or evaluation loop, then
    :meth:`close` to publish (or :meth:`abort`). Best used as a context manager
    (``with store.writer(model, layer) as w:``): the unit becomes visible when the block
    exits normally, and an exception inside it discards everything written. A writer that
    is dropped without close or abort warns (:class:`UnclosedWriterWarning`) and its unit
    stays invisible.

    ``rows`` (optional) is the expected row count: it lets small units get one right-sized
    shard and is checked at close. ``row_ids`` (optional, one per row) identify the rows.
    ``overwrite`` replaces an existing unit: readers keep reading the old version until the
    new one is published, and jobs that pinned it keep it for
    :data:`~repscope.store.layout.SUPERSEDED_GRACE_S` seconds.

    Token activations stream too: append (examples, tokens, features) batches with their
    ``padding_mask`` and every unpadded token becomes a row, example by example, position by
    position; the row -> example map and the padding mask are recorded as :func:`ingest_array`
    records them for 3-D input (batches narrower than the widest are padded in the mask).
    ``example_ids`` (optional, one per example) identify the examples of such a writer.

    ``attributes`` (optional, JSON-serialisable) are recorded with the unit, for the program
    that wrote it (provenance such as a checkpoint digest); read them back with
    :meth:`ActivationStore.unit_attributes`.
    """

    def __init__(
        self,
        store: ActivationStore,
        model: str,
        layer: str,
        *,
        features: int | None = None,
        dtype: str = "float32",
        chunk_bytes: int = layout.DEFAULT_CHUNK_BYTES,
        shard_bytes: int = layout.DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
        rows: int | None = None,
        row_ids: Any = None,
        example_ids: Any = None,
        attributes: Mapping[str, Any] | None = None,
        _row_set: RowSet | None = None,
        _source: object | None = None,
        _source_dtype: str | None = None,
    ) -> None:
        self._done = True  # until set up: nothing to warn about if the checks below fail
        self.model = check_name("model", model)
        self.layer = check_name("layer", layer)
        self._ctx = where(model, layer, _source)
        self.dtype = check_storage_dtype(dtype)
        layout.check_sizes(chunk_bytes, shard_bytes)
        if features is not None and (isinstance(features, bool) or int(features) <= 0):
            raise InputError(f"{self._ctx}: features must be a positive integer, got {features!r}")
        if rows is not None and (isinstance(rows, bool) or int(rows) <= 0):
            raise InputError(f"{self._ctx}: rows must be a positive integer, got {rows!r}")
        self._store = store
        self._catalog = store.catalog
        self.features = None if features is None else int(features)
        self._chunk_bytes = int(chunk_bytes)
        self._shard_bytes = int(shard_bytes)
        self._expected_rows = None if rows is None else int(rows)
        self._row_set = _row_set
        if row_ids is not None and _row_set is None:
            n = self._expected_rows if self._expected_rows is not None else np.shape(row_ids)[0]
            self._row_set = RowSet(n_rows=n, ids=check_row_ids(row_ids, n, "rows", self._ctx))
            self._expected_rows = n
        if self._row_set is not None:
            self._expected_rows = self._row_set.n_rows
        if example_ids is not None and self._row_set is not None:
            raise InputError(f"{self._ctx}: give row_ids or example_ids, not both")
        self._example_ids = (
            None
            if example_ids is None
            else check_row_ids(example_ids, np.shape(example_ids)[0], "examples", self._ctx)
        )
        self._attributes = _checked_attributes(attributes, self._ctx)
        # Token writers: None until the first batch says; then the (examples, tokens) keep
        # mask (True = a row) of every token batch, in order.
        self._tokens: bool | None = None
        self._keeps: list[np.ndarray] = []

        catalog = self._catalog
        catalog.check_writable(self._ctx)
        existing = catalog.entry(model, layer, fresh=True)
        if isinstance(existing, UnitEntry) and not overwrite:
            raise InputError(
                f"{self._ctx}: unit already exists in store {store.url}; pass "
                f"{setting('overwrite')} to replace it"
            )
        # The store's row count, if other units fix it: appends beyond it fail early.
        stored = catalog.rows(fresh=True)
        others = stored is not None and catalog.has_other_unit(model, layer)
        self._row_limit = stored.n_rows if others else None
        if self._row_set is not None:
            catalog.check_rows(self._row_set, model, layer, self._ctx)

        self.source_dtype: str | None = None
        self._recorded_source_dtype = _source_dtype  # a copy keeps its original's
        self._version: str | None = None
        self._array: Any = None
        self._buffer: np.ndarray | None = None
        self._filled = 0  # rows in the buffer
        self._written = 0  # rows flushed to the array
        self._hash: layout.ContentHash | None = None
        self._chunk_rows = 0
        self._shard_rows = 0
        self._done = False

    # -- appending ----------------------------------------------------------------------

    def append(
        self,
        batch: Any,
        *,
        padding_mask: Any = None,
        _describe: Callable[[int], str] | None = None,
    ) -> None:
        """Append a batch: checked for NaN/Inf, converted, buffered.

        ``batch``: (batch_rows, features) rows, or (examples, tokens, features) token
        activations with ``padding_mask`` ((examples, tokens) bool, True = padding; default
        none), whose unpadded tokens become rows. Every batch of a writer is of one kind.
        A refused batch aborts the writer (a unit with a missing batch would be misaligned),
        so the unit stays invisible.
        """
        if self._done:
            raise InputError(f"{self._ctx}: writer is closed")
        try:
            self._add(self._checked(batch, padding_mask, _describe))
        except BaseException:
            self.abort()
            raise

    def _token_rows(
        self, arr: np.ndarray, padding_mask: Any
    ) -> tuple[np.ndarray, Callable[[int], str]]:
        """The kept tokens of an (examples, tokens, features) batch as (rows, features)."""
        examples, tokens, features = arr.shape
        if self._tokens is False or self._row_set is not None:
            raise InputError(
                f"{self._ctx}: token batch of shape {arr.shape} after 2-D rows; every batch "
                "of a unit is (rows, features) or every batch (examples, tokens, features)"
            )
        if padding_mask is None:
            keep = np.ones((examples, tokens), bool)
        else:
            keep = ~check_padding_mask(padding_mask, examples, tokens, self._ctx)
        self._tokens = True
        kept = np.flatnonzero(keep.reshape(-1))
        first_example = sum(k.shape[0] for k in self._keeps)
        offset = self._written + self._filled
        if examples:
            self._keeps.append(keep)

        def describe(i: int) -> str:
            example, token = divmod(int(kept[i]), tokens)
            return f"row {offset + i} (example {first_example + example}, token {token})"

        flat = arr.reshape(examples * tokens, features)
        return (flat if kept.size == flat.shape[0] else flat[kept]), describe

    def _checked(
        self, batch: Any, padding_mask: Any, describe: Callable[[int], str] | None
    ) -> np.ndarray:
        """``batch`` validated against earlier batches and the store, in storage dtype."""
        arr = batch if isinstance(batch, np.ndarray) else _to_numpy(batch)
        source_dtype = check_source_dtype(arr.dtype, self._ctx)
        if arr.ndim == 3:
            arr, describe = self._token_rows(arr, padding_mask)
        elif padding_mask is not None:
            raise InputError(f"{self._ctx}: padding_mask applies to 3-D (examples, tokens, ...) "
                             "batches")
        elif arr.ndim != 2:
            raise InputError(
                f"{self._ctx}: batch of shape {arr.shape} is not 2-D (batch_rows, features) "
                "or 3-D (examples, tokens, features)"
            )
        elif self._tokens:
            raise InputError(
                f"{self._ctx}: 2-D batch of shape {arr.shape} after token batches; every "
                "batch of a unit is (rows, features) or every batch (examples, tokens, features)"
            )
        else:
            if self._example_ids is not None:
                raise InputError(f"{self._ctx}: example_ids apply to token (3-D) batches; "
                                 "pass row_ids for 2-D rows")
            self._tokens = False
        if self.features is None:
            if arr.shape[1] == 0:
                raise InputError(f"{self._ctx}: batch of shape {arr.shape} has no features")
            self.features = int(arr.shape[1])
        if arr.shape[1] != self.features:
            raise InputError(
                f"{self._ctx}: batch has {arr.shape[1]} features, expected {self.features}"
            )
        if self.source_dtype is None:
            self.source_dtype = source_dtype
        elif self.source_dtype != source_dtype:
            raise InputError(
                f"{self._ctx}: batch dtype {source_dtype} differs from earlier batches "
                f"({self.source_dtype})"
            )
        total = self._written + self._filled + arr.shape[0]
        for limit, what in (
            (self._row_limit, "the store's units have"),
            (self._expected_rows, "expected"),
        ):
            if limit is not None and total > limit:
                raise InputError(
                    f"{self._ctx}: {total} rows appended, but {what} {limit} rows; every unit "
                    "of a store must have the same rows"
                )
        offset = self._written + self._filled
        return convert_block(
            arr, self.dtype, self._ctx, describe or (lambda i: f"row {offset + i}")
        )

    def _add(self, block: np.ndarray) -> None:
        if self._buffer is None:
            self._plan(self._expected_rows)
        pos = 0
        while pos < block.shape[0]:
            space = self._shard_rows - self._filled
            piece = block[pos : pos + space]
            if self._filled == 0 and piece.shape[0] == self._shard_rows:
                self._flush(piece)  # a whole shard: write it without copying
            else:
                self._buffer[self._filled : self._filled + piece.shape[0]] = piece
                self._filled += piece.shape[0]
                if self._filled == self._shard_rows:
                    self._flush(self._buffer[: self._filled])
            pos += piece.shape[0]

    def _plan(self, rows: int | None) -> None:
        """Choose chunk and shard rows (for ``rows`` if known) and allocate the shard buffer."""
        itemsize = np.dtype(self.dtype).itemsize
        self._chunk_rows = layout.chunk_rows_for(self.features, itemsize, self._chunk_bytes, rows)
        self._shard_rows = layout.shard_rows_for(
            self.features, itemsize, self._chunk_rows, self._shard_bytes, rows
        )
        buffer_rows = self._shard_rows if rows is None else min(self._shard_rows, rows)
        self._buffer = np.empty((buffer_rows, self.features), dtype=self.dtype)
        self._hash = layout.ContentHash(self.dtype, self.features)

    def _flush(self, block: np.ndarray) -> None:
        """Write ``block`` (at most one shard, starting on a shard boundary) to the array."""
        with self._catalog.errors():
            if self._array is None:
                self._create(max(block.shape[0], self._expected_rows or 0))
            end = self._written + block.shape[0]
            if self._array.shape[0] < end:
                self._array.resize((end, self.features))
            self._array[self._written : end] = block
        self._hash.update(block)
        self._written = end
        self._filled = 0

    def _create(self, rows: int) -> None:
        """Create the array of a new version of the unit (removing unfinished old ones)."""
        import zarr
        from zarr.codecs import Crc32cCodec

        self._version = self._catalog.begin(self.model, self.layer)
        self._array = zarr.create_array(
            self._catalog.zstore,
            name=layout.version_path(self.model, self.layer, self._version),
            shape=(rows, self.features),
            dtype=self.dtype,
            chunks=(self._chunk_rows, self.features),
            shards=(self._shard_rows, self.features),
            # No compression: dense float activations barely compress (a few percent) and
            # codecs cost read throughput. Each chunk carries its CRC32C, so damage is found.
            compressors=[Crc32cCodec()],
            fill_value=0.0,
            # All-zero chunks (dead ReLU units) are data: store them, so that a missing
            # chunk always means lost data, never zeros.
            config={"write_empty_chunks": True},
            dimension_names=("row", "feature"),
            attributes={"complete": False, "source_dtype": self.source_dtype},
        )

    # -- finishing ----------------------------------------------------------------------

    def close(self) -> UnitInfo:
        """Flush the last shard, check the row count, publish the unit and return its info."""
        if self._done:
            raise InputError(f"{self._ctx}: writer is already closed")
        total = self._written + self._filled
        if total == 0:
            self.abort()
            raise InputError(f"{self._ctx}: no rows were appended")
        try:
            if self._array is None and self._expected_rows is None:
                # Everything fits one shard: size chunks and the shard to the real row count.
                buffered = self._buffer[: self._filled].copy()
                self._buffer = None
                self._plan(total)
                self._buffer = buffered
            if self._filled:
                self._flush(self._buffer[: self._filled])
            self._buffer = None
            if self._expected_rows is not None and self._expected_rows != total:
                raise InputError(
                    f"{self._ctx}: {total} rows written, but {self._expected_rows} expected"
                )
            rows = self._row_set or self._token_row_set(total) or RowSet(n_rows=total)
            with self._catalog.errors():
                if self._array.shape[0] != total:
                    self._array.resize((total, self.features))
                # The version is complete (and immutable from here on); publishing makes it
                # the unit's current version.
                self._array.update_attributes(
                    {
                        "complete": True,
                        "source_dtype": self._recorded_source_dtype or self.source_dtype,
                        "fingerprint": self._hash.hexdigest(),
                        "row_fingerprint": rows.fingerprint,
                        **({"attributes": self._attributes} if self._attributes else {}),
                    }
                )
            self._catalog.publish(self.model, self.layer, self._version, rows, self._ctx)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self._store.unit_info(self.model, self.layer)

    def _token_row_set(self, total: int) -> RowSet | None:
        """The rows of a token writer: example map and padding mask; None for 2-D writers."""
        if not self._tokens:
            return None
        examples = sum(k.shape[0] for k in self._keeps)
        width = max(k.shape[1] for k in self._keeps)
        mask = np.ones((examples, width), bool)
        start = 0
        for keep in self._keeps:
            mask[start : start + keep.shape[0], : keep.shape[1]] = ~keep
            start += keep.shape[0]
        self._keeps = []
        ids = self._example_ids
        if ids is not None and ids.shape[0] != examples:
            raise InputError(
                f"{self._ctx}: {ids.shape[0]} example_ids given, but {examples} examples "
                "were appended"
            )
        return RowSet(
            n_rows=total,
            ids=ids,
            ids_level="example",
            example=np.repeat(np.arange(examples, dtype=np.int64), (~mask).sum(axis=1)),
            mask=mask,
        )

    def abort(self) -> None:
        """Discard everything written; the unit stays as it was (its new version is removed)."""
        self._done = True
        self._buffer = None
        if self._array is None:
            return
        self._array = None
        try:
            self._catalog.discard(self.model, self.layer, self._version)
        except Exception:
            # Best effort: an unfinished version left behind is invisible and removed by the
            # next ingest of this unit, so a failed cleanup must not hide the real error.
            pass

    def __enter__(self) -> UnitWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.close()

    def __del__(self) -> None:
        # No I/O here (it may run at interpreter exit): the unfinished version stays, invisible.
        if not getattr(self, "_done", True):
            warnings.warn(
                f"UnitWriter for model {self.model!r}, layer {self.layer!r} was garbage-"
                "collected without close() or abort(); the unit was not published (use "
                "'with store.writer(model, layer) as w:')",
                UnclosedWriterWarning,
                stacklevel=2,
            )


def _checked_attributes(attributes: Mapping[str, Any] | None, ctx: str) -> dict | None:
    """``attributes`` as a plain dict that survives JSON (Zarr stores attributes as JSON)."""
    if attributes is None:
        return None
    try:
        return json.loads(json.dumps(dict(attributes), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{ctx}: attributes must be JSON-serialisable: {exc}") from None


def _to_numpy(obj: Any) -> np.ndarray:
    """A numpy view of a batch: torch tensors (bfloat16 included), dask arrays, array-likes."""
    from repscope.store.sources import to_numpy

    return to_numpy(obj)
