"""Baseline (c): pytorch-cka's all-layer-pairs CKA (cka_from_features), run as a child process
so its memory is measured alone: `python -m bench.peer STORE ROWS` prints a JSON line."""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import numpy as np
    import torch
    from cka.cka import cka_from_features

    from repscope.store import ActivationStore

    url, rows = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(2)
    store = ActivationStore.open(url)
    t0 = time.perf_counter()
    feats = []
    for m in store.models():
        for layer in store.layers(m):
            x = store.read(m, layer, 0, rows)
            feats.append(torch.from_numpy(x - x.mean(axis=0, dtype=np.float64).astype(np.float32)))
    with torch.no_grad():
        matrix = cka_from_features(feats, feats).numpy()
    seconds = time.perf_counter() - t0
    np.save(sys.argv[3], matrix)
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
