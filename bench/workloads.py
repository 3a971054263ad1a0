"""Generated workloads: hidden layers of random deep tanh networks, float32, in a cached store.

Every model sees the same inputs; models differ in their weights (seeds), like checkpoints of
one architecture. Stores are written once under the cache folder and reused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Workload:
    name: str
    models: int
    layers: int
    width: int
    rows: int
    metrics: tuple[str, ...]
    note: str = ""

    @property
    def units(self) -> int:
        return self.models * self.layers

    @property
    def pairs(self) -> int:
        return self.units * (self.units + 1) // 2

    def key(self) -> str:
        return f"{self.models}x{self.layers}x{self.width}-{self.rows}"


FULL = {
    "W1": Workload("W1", 2, 13, 768, 100_000, ("linear_cka", "pwcca", "procrustes"), "seed pair"),
    "W2": Workload("W2", 10, 6, 256, 50_000, ("linear_cka", "procrustes"), "many checkpoints"),
    "W3": Workload("W3", 2, 13, 768, 400_000, ("linear_cka", "pwcca", "procrustes"),
                   "memory: W1 with 4x rows"),
    "W4": Workload("W4", 4, 16, 2048, 4_000, ("linear_cka", "linear_cka_debiased"),
                   "few inputs, wide layers"),
    # Sample-space kernel metrics in row-block tiles (bench/kernels.py).
    "K1": Workload("K1", 4, 8, 512, 20_000, ("rbf_cka", "mutual_knn"), "kernel tiles"),
}
# The quick variant: same structure, sizes that run in minutes on 2 cores.
QUICK = {
    "W1": replace(FULL["W1"], width=256, rows=20_000),
    "W2": replace(FULL["W2"], width=128, rows=20_000),
    "W3": replace(FULL["W1"], name="W3", width=256, rows=80_000, note="memory: W1 with 4x rows"),
    "W4": replace(FULL["W4"], layers=4),
    "K1": replace(FULL["K1"], layers=2, rows=6_000),
}


def layer_activations(rows: int, width: int, layers: int, seed: int, input_dim: int = 64):
    """Yield each hidden layer (rows, width) float32 of a random tanh network."""
    x = np.random.default_rng(1234).standard_normal((rows, input_dim), dtype=np.float32)
    rng = np.random.default_rng(seed)
    h = x
    for _ in range(layers):
        w = rng.standard_normal((h.shape[1], width), dtype=np.float32) / np.sqrt(h.shape[1])
        h = np.tanh(h @ w + np.float32(0.1) + rng.standard_normal(width, dtype=np.float32) * 0.3)
        yield h


def build_store(w: Workload, cache: str) -> str:
    """The workload's store under ``cache`` (written once): its URL."""
    from repscope.store import ActivationStore, ingest_array

    url = os.path.join(cache, f"{w.key()}.zarr")
    done = url + ".complete"
    if os.path.exists(done):
        return url
    if os.path.exists(url):
        import shutil

        shutil.rmtree(url)
    store = ActivationStore.create(url)
    for m in range(w.models):
        for i, acts in enumerate(layer_activations(w.rows, w.width, w.layers, seed=m)):
            ingest_array(store, f"model{m}", f"layer{i + 1:02d}", acts)
    open(done, "w").close()
    return url
