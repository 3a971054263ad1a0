"""Activation stores: sharded Zarr v3 groups of (rows x features) arrays, one per unit.

Public API: :func:`open_store` and :class:`ActivationStore` (open, list, read, write through
``store.writer(model, layer)``), :class:`UnitInfo`, :func:`ingest_array` /
:func:`ingest_path` (batch ingest), :class:`UnitWriter` (streaming ingest from a training or
evaluation loop) and :func:`redact` (safe printing of URLs). The layout is documented in
docs/store.md.
"""

from repscope.store.activation_store import ActivationStore, UnitInfo, open_store
from repscope.store.ingest import ingest_array, ingest_path
from repscope.store.urls import redact
from repscope.store.writer import UnclosedWriterWarning, UnitWriter

__all__ = [
    "ActivationStore",
    "UnclosedWriterWarning",
    "UnitInfo",
    "UnitWriter",
    "ingest_array",
    "ingest_path",
    "open_store",
    "redact",
]
