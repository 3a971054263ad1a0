"""Fixtures for job tests: small activation stores with realistic layer structure."""

from __future__ import annotations

import numpy as np


def deep_net_activations(rows: int, widths: list[int], seed: int, input_dim: int = 12):
    """Hidden layers of a random tanh network on shared inputs: list of (rows, width).

    Inputs come from a fixed generator (the same rows for every model); `seed` changes the
    weights only, like models that differ only in their seed."""
    x = np.random.default_rng(1234).standard_normal((rows, input_dim))
    rng = np.random.default_rng(seed)
    out, h = [], x
    for w in widths:
        h = np.tanh(h @ rng.standard_normal((h.shape[1], w)) / np.sqrt(h.shape[1]) + 0.1)
        out.append(h.astype(np.float32))
    return out


def make_store(url: str, models: dict[str, list[int]], rows: int, storage_options=None):
    """A store with one model per entry (its layer widths), layers named layer1, layer2..."""
    from repscope.store import ActivationStore, ingest_array

    store = ActivationStore.create(url, storage_options)
    data = {}
    for k, (model, widths) in enumerate(models.items()):
        for i, acts in enumerate(deep_net_activations(rows, widths, seed=k)):
            ingest_array(store, model, f"layer{i + 1}", acts)
            data[(model, f"layer{i + 1}")] = acts
    return store, data
