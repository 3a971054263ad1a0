"""Activation stores: sharded Zarr v3 groups of (rows x features) arrays, one per unit.

Public API: :class:`ActivationStore` (open, list, read), :class:`UnitInfo`,
:func:`ingest_array` / :func:`ingest_path` (batch ingest), :class:`UnitWriter` (streaming
ingest from a training or evaluation loop) and :func:`redact` (safe printing of URLs).
The layout is documented in docs/store.md.
"""

from repscope.store.activation_store import ActivationStore, UnitInfo
from repscope.store.ingest import ingest_array, ingest_path
from repscope.store.urls import redact
from repscope.store.writer import UnitWriter

__all__ = ["ActivationStore", "UnitInfo", "UnitWriter", "ingest_array", "ingest_path", "redact"]
