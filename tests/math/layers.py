"""Rank-deficient layers of the kinds real networks produce, for the numerics tests.

Each model sees the same inputs; its seed changes the weights. Activations are float32, as
in a store. The true ranks are known by construction (``RANKS``).
"""

from __future__ import annotations

import numpy as np

#: (kind, width, rank) of the four layers of :func:`model_layers`.
LAYERS = (
    ("relu, 40 of 128 units dead", 128, 88),
    ("rank 40 of width 96 (a linear layer widening its input)", 96, 40),
    ("64 tanh units and 16 duplicated columns", 80, 64),
    ("full rank", 50, 50),
)
RANKS = tuple(rank for _, _, rank in LAYERS)


def model_layers(seed: int, rows: int = 3000) -> list[np.ndarray]:
    """The four layers of one model over ``rows`` shared inputs: float32 (rows, width)."""
    h0 = np.random.default_rng(1234).standard_normal((rows, 32))
    rng = np.random.default_rng(seed)
    bias = rng.standard_normal(128) * 0.1
    bias[rng.choice(128, 40, replace=False)] = -1e3  # never active: all-zero columns
    relu = np.maximum(h0 @ rng.standard_normal((32, 128)) / np.sqrt(32) + bias, 0)
    low = (relu @ rng.standard_normal((128, 40)) / np.sqrt(128)) @ rng.standard_normal((40, 96))
    tanh = np.tanh(low @ rng.standard_normal((96, 64)) / np.sqrt(96) + 0.1)
    dup = np.hstack([tanh, tanh[:, rng.choice(64, 16, replace=False)]])
    full = np.tanh(dup @ rng.standard_normal((80, 50)) / np.sqrt(80))
    return [a.astype(np.float32) for a in (relu, low, dup, full)]


def low_rank(rows: int, width: int, rank: int, seed: int, offset: float = 3.0) -> np.ndarray:
    """A float32 (rows, width) layer of exact rank ``rank`` (before rounding), with means."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, width))
    return (x + offset * rng.standard_normal(width)).astype(np.float32)
