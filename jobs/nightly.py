"""Incremental ("nightly") runs: results grow as checkpoints land, instead of restarting.

A nightly run is the job pipeline (:mod:`repscope.jobs.pipeline`) with "which pairs" set to
those involving a new or changed unit. Each unit is identified by a key over its content (the
store's row fingerprint, the unit's content fingerprint, its width and the rows used). The
stored value of every pair whose two units are unchanged is reused from the output (written
by ``repscope run`` or an earlier nightly run of the same metrics, rows and store); only pairs
that involve a new or changed unit are computed. The unchanged units' own moments (mean, X'X)
come from ``<output>.state/units/`` when an earlier nightly run saved them (then their data
is read only for the cross products), else their own statistics are computed again. Every
nightly result is also kept as a dated snapshot in ``<output>.state/history/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from repscope.cluster.moments import UnitMoments
from repscope.errors import ConflictError, NotFoundError
from repscope.jobs.plan import Selection
from repscope.jobs.results import open_results, to_zarr
from repscope.jobs.spec import JobSpec
from repscope.jobs.state import StateStore, digest
from repscope.store import redact

__all__ = ["nightly_job", "unit_keys", "reuse_identity", "Previous", "previous_result"]


def reuse_identity(spec: JobSpec) -> str:
    """What must match for stored values to be reused: the store, metrics, rows and the
    settings that change values; not the models or layers, which are expected to grow."""
    d = spec.identity()
    keep = {k: d[k] for k in ("store", "metrics", "rows", "compute")}
    return json.dumps({"reuse": keep}, sort_keys=True)


def unit_keys(sel: Selection) -> list[str]:
    """A content key per unit: same key, same data over the same rows."""
    return [digest(sel.row_fingerprint, u.fingerprint, u.features, list(sel.rows))
            for u in sel.units]


@dataclass(frozen=True)
class Previous:
    """What a nightly run reuses: the previous values (matrices and bounds, (U, U) in the
    job's unit order, NaN where a pair is to be computed), the fresh units (new or changed)
    and the moments of unchanged units saved by an earlier nightly run."""

    matrices: dict[str, np.ndarray]
    bounds: dict[str, tuple[np.ndarray, np.ndarray]]
    fresh: frozenset[int]
    known: dict[int, UnitMoments]


def previous_result(spec: JobSpec, sel: Selection, keys: list[str], state: StateStore,
                    overwrite: bool) -> Previous | None:
    """The reusable part of the output's current result; None when there is none (or with
    ``overwrite``, when it holds another spec's results). ConflictError otherwise."""
    try:
        ds = open_results(spec.output, spec.storage_options)
    except NotFoundError:
        return None
    if ds.attrs.get("reuse_identity") != reuse_identity(spec) or "key_x" not in ds.coords:
        if not overwrite:
            raise ConflictError(
                f"output {redact(spec.output)} holds results of a different job spec (store, "
                "metrics, rows or compute settings differ); choose another output or pass "
                "--overwrite to start it anew"
            )
        return None
    index = {k: i for i, k in enumerate(ds["key_x"].values.tolist())}
    count = len(keys)
    stale = [i for i, k in enumerate(keys) if k in index]
    fresh = frozenset(i for i in range(count) if keys[i] not in index)
    take = np.ix_(stale, stale)
    source = np.ix_([index[keys[i]] for i in stale], [index[keys[i]] for i in stale])

    def aligned(name: str) -> np.ndarray:
        out = np.full((count, count), np.nan)
        out[take] = ds[name].values[source]
        return out

    matrices = {m: aligned(m) for m in spec.metrics if m in ds}
    bounds = {m: (aligned(f"{m}_lower"), aligned(f"{m}_upper")) for m in spec.metrics
              if f"{m}_lower" in ds and f"{m}_upper" in ds}
    known = {}
    for i in stale:
        moments = state.get("units", keys[i], UnitMoments)
        if moments is not None:
            known[i] = moments
    return Previous(matrices, bounds, fresh, known)


def fill_reused(stats, previous: Previous) -> None:
    """Entries of pairs of two unchanged units, from the previous result (in place)."""
    for m, old in previous.matrices.items():
        reuse = np.isfinite(old)
        stats.matrices[m][reuse] = old[reuse]
    if previous.bounds and stats.bounds is not None:
        for m, (lower, upper) in previous.bounds.items():
            reuse = np.isfinite(lower)
            stats.bounds[m][0][reuse] = lower[reuse]
            stats.bounds[m][1][reuse] = upper[reuse]


def snapshot(results: dict, spec: JobSpec, state: StateStore) -> str:
    """Keep a dated copy of a nightly result (jobs.results.build_results' dict) in the
    state's history; returns its stamp."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S.%fZ")
    to_zarr(results, state.history_url(stamp), spec.storage_options)
    return stamp


def nightly_job(spec: JobSpec, *, address: str | None = None, overwrite: bool = False,
                log=None):
    """``repscope nightly``: update the results of ``spec`` with what changed since the
    output was written. Returns the run's summary."""
    from repscope.jobs.pipeline import execute_job

    return execute_job(spec, address=address, overwrite=overwrite, incremental=True,
                       log=log)[0]
