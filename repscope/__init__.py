"""repscope: compare the internal representations of neural networks at scale.

The Python API (each function documents its shapes and units)::

    import repscope

    store = repscope.open_store("acts.zarr", mode="a")     # an activation store
    with store.writer("model-a", "layer1") as w:            # stream a unit into it
        w.append(batch)                                     # (rows, features) blocks
    ds = repscope.compare(store, metrics=["linear_cka", "pwcca"])  # xarray.Dataset (U, U)
    ds = repscope.open_results("results.zarr")              # a results store
    values = repscope.compare_arrays(x, y)                  # two in-memory arrays
    repscope.capture(model, batches, store, "bert", layers=["encoder.layer.3"])  # torch hooks

The package maps the project's top-level folders into one namespace: ``repscope.store``
(activation stores), ``repscope.cluster`` (streaming statistics, metrics and their execution)
and ``repscope.jobs`` (specs, planning, the pipeline, results, the CLI). Names are imported
on first use, so ``import repscope`` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

# Public name -> the module that defines it.
_API = {
    "open_store": "repscope.store",
    "compare": "repscope.jobs.api",
    "open_results": "repscope.jobs.api",
    "compare_arrays": "repscope.cluster.compare",
    "capture": "repscope.store.capture",  # needs the capture extra (torch) when called
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'repscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
