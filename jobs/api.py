"""The Python API: the job of ``repscope run`` and the results store, as functions.

Exported from the package root: ``repscope.compare``, ``repscope.open_results``,
``repscope.compare_arrays`` (and ``repscope.open_store`` from :mod:`repscope.store`).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from repscope.errors import InputError
from repscope.jobs.pipeline import execute_job, to_results
from repscope.jobs.results import open_results as _open_results
from repscope.jobs.results import to_dataset
from repscope.jobs.spec import spec_from_dict

__all__ = ["compare", "open_results", "DEFAULT_METRICS"]

#: The metrics of :func:`compare` when none are named: the seed paper's pair (CKA beside
#: PWCCA) and Procrustes.
DEFAULT_METRICS = ("linear_cka", "pwcca", "procrustes")


def _rows(rows: Any) -> dict | None:
    if rows is None:
        return None
    if isinstance(rows, Mapping):
        return dict(rows)
    if isinstance(rows, slice):
        if rows.step not in (None, 1):
            raise InputError(f"rows must be a contiguous range, got a slice with step {rows.step}")
        return {"start": rows.start or 0, "stop": rows.stop}
    if isinstance(rows, Sequence) and not isinstance(rows, str) and len(rows) == 2:
        return {"start": rows[0], "stop": rows[1]}
    raise InputError(f"rows must be (start, stop), a slice or {{start, stop}}, got {rows!r}")


def compare(
    store,
    *,
    models: Iterable[str] | None = None,
    layers: Iterable[str] | Mapping[str, Iterable[str]] | None = None,
    metrics: Iterable[str] = DEFAULT_METRICS,
    rows: Any = None,
    output: str | None = None,
    address: str | None = None,
    storage_options: dict | None = None,
    compute: dict | None = None,
    overwrite: bool = False,
    verbose: bool = False,
):
    """Similarity of every pair of units of a store: the job of ``repscope run``.

    Parameters
    ----------
    store : str or ActivationStore
        The activation store (a URL: path, ``s3://``, ``gs://``, ``memory://``; or an open
        store, whose URL and storage options are used).
    models : model names (None: every model of the store, or the keys of a ``layers`` mapping).
    layers : layer names for every model, or a mapping ``{model: [layers]}`` (only the models
        it names), or None (every layer).
    metrics : metric names (:data:`repscope.cluster.registry.METRICS`).
    rows : the rows to use: ``(start, stop)``, ``slice(start, stop)`` or None (all).
    output : a results store URL to write (as ``repscope run`` does), or None.
    address : Ray cluster address (None: RAY_ADDRESS, else this process for small jobs and an
        embedded Ray instance otherwise).
    storage_options : fsspec options for the store and the output (credentials are never
        written to results or messages).
    compute : the spec's ``compute`` settings, e.g. ``{"precision": "float64"}``.
    overwrite : replace an ``output`` holding results of another spec.
    verbose : print the job's stage lines (plan, progress) on stderr.

    Returns
    -------
    xarray.Dataset
        One variable per metric with dims ``("x", "y")`` over the job's U units (float64,
        entry [i, j] = metric(unit i, unit j); PWCCA weighted by unit i), coordinates
        ``model_x``, ``layer_x``, ``model_y``, ``layer_y`` (loaded in memory, so
        ``ds.where(ds.model_x == "a", drop=True)`` selects model a's rows), attributes as in
        a results store (docs/jobs.md).

    Raises
    ------
    repscope.errors.InputError, NotFoundError
        Bad names, rows or settings, refused before any work, with the culprit named.
    """
    url = getattr(store, "_raw_url", store)
    if storage_options is None:
        storage_options = getattr(store, "_options", None)
    if not isinstance(url, str):
        raise InputError(f"store must be a URL or an ActivationStore, got {type(store).__name__}")
    if isinstance(metrics, str):
        metrics = [metrics]
    raw: dict[str, Any] = {
        "store": url,
        "output": output or "unwritten.zarr",  # never touched without an output
        "metrics": list(metrics),
        "models": None if models is None else list(models),
        "layers": layers if layers is None or isinstance(layers, Mapping) else list(layers),
        "rows": _rows(rows),
        "storage_options": storage_options,
        "compute": compute,
    }
    if isinstance(layers, Mapping):
        raw["layers"] = {m: list(ls) for m, ls in layers.items()}
    spec = spec_from_dict({k: v for k, v in raw.items() if v is not None}, source="compare()")
    log = sys.stderr if verbose else io.StringIO()
    _, stats = execute_job(spec, address=address, overwrite=overwrite,
                           write=output is not None, log=log)
    if output is not None:
        return open_results(output, storage_options)
    return to_dataset(to_results(spec, stats))


def open_results(url: str, storage_options: dict | None = None):
    """A results store as an xarray Dataset, loaded in memory from one complete version.

    Parameters
    ----------
    url : the results store (a path or an object-store URL).
    storage_options : fsspec options for object stores.

    Returns
    -------
    xarray.Dataset with one (U, U) float64 variable per metric (dims ``("x", "y")``), bounds
    ``<metric>_lower``/``<metric>_upper`` when the job had a bootstrap, and coordinates
    ``model_x``, ``layer_x``, ``model_y``, ``layer_y`` (and ``key_x``/``key_y``, the units'
    content keys).

    Raises
    ------
    repscope.errors.NotFoundError when there is no results store at ``url``.
    """
    return _open_results(url, storage_options)
