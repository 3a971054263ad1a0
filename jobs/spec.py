"""Job specs: the YAML a user writes, parsed and checked before any work is done.

```yaml
store: s3://bucket/acts.zarr        # required: a store URL
models: [bert-seed1, bert-seed2]    # optional, default: every model in the store
layers: [layer3, layer7]            # optional, default: every layer; or {model: [layers]}
metrics: [linear_cka, pwcca, procrustes]   # required
output: s3://bucket/results/run.zarr       # required: a results store URL
rows: {start: 0, stop: 100000}      # optional subset of rows
storage_options: {}                 # optional fsspec options for store and output
compute: {workers: auto, precision: float32}   # optional
```

Parsing checks only the spec itself (keys, types, metric names). Names that need the store
(models, layers, row counts) are checked by :func:`jobs.plan.make_plan` against it, still
before any work starts.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from repscope.errors import InputError, NotFoundError, SpecError

TOP_KEYS = ("store", "models", "layers", "metrics", "output", "rows", "storage_options", "compute")
COMPUTE_KEYS = (
    "workers",
    "precision",
    "memory_per_worker",
    "block_rows",
    "svcca_threshold",
    "space",
    "checkpoint_seconds",
    "bootstrap",
    "bootstrap_shards",
    "eig_floor",
    "ambiguous_rank",
)
PRECISIONS = ("float32", "float64")
SPACES = ("auto", "feature", "sample")
AMBIGUOUS_RANK = ("recompute", "refuse")


def closest(name: str, choices) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


@dataclass(frozen=True)
class Compute:
    """Execution settings.

    workers: parallel tasks (None = one per CPU of the cluster).
    precision: GEMM dtype of the accumulation; sums and merges are float64 either way.
    memory_per_worker: bytes one task may hold for its statistics (None = derive from
    the machine); wider jobs are split into column-group tiles to respect it.
    block_rows: rows multiplied per GEMM inside a task (None = derive from widths).
    svcca_threshold: fraction of variance SVCCA keeps per side.
    checkpoint_seconds: how often a task saves its progress beside the output, so that a
    rerun after a crash resumes (0 turns checkpoints off).
    bootstrap: replicates of a row-shard bootstrap that adds 90% confidence bounds to every
    matrix entry (0: none); bootstrap_shards: the row shards it resamples.
    space: "feature" (d x d moments per unit pair, cost n d^2), "sample" (n x n Gram per
    unit, cost n^2 d) or "auto" (the planner picks the cheaper one that fits memory).
    eig_floor: None ("auto": each unit's rank cut follows from the precision of its
    statistics, docs/metrics.md) or a relative cut in [0, 1): eigenvalues <= eig_floor *
    the largest are dropped by every metric that whitens.
    ambiguous_rank: what to do with a unit whose float32 statistics cannot decide its rank
    (no clear gap between signal and rounding noise): "recompute" its statistics in float64
    (default: correct numbers at the cost of that unit's float64 pass), or "refuse" (an
    error naming the unit).
    """

    workers: int | None = None
    precision: str = "float32"
    memory_per_worker: int | None = None
    block_rows: int | None = None
    svcca_threshold: float = 0.99
    checkpoint_seconds: float = 120.0
    bootstrap: int = 0
    bootstrap_shards: int = 20
    space: str = "auto"
    eig_floor: float | None = None
    ambiguous_rank: str = "recompute"


@dataclass(frozen=True)
class JobSpec:
    """A parsed, self-consistent job spec (store contents not yet checked)."""

    store: str
    metrics: tuple[str, ...]
    output: str
    models: tuple[str, ...] | None = None
    layers: tuple[str, ...] | dict[str, tuple[str, ...]] | None = None
    rows: tuple[int, int | None] = (0, None)
    storage_options: dict[str, Any] = field(default_factory=dict)
    compute: Compute = field(default_factory=Compute)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data, without storage_options (they may hold secrets)."""
        layers: Any = self.layers
        if isinstance(layers, dict):
            layers = {m: list(ls) for m, ls in layers.items()}
        elif layers is not None:
            layers = list(layers)
        c = self.compute
        return {
            "store": self.store,
            "models": list(self.models) if self.models is not None else None,
            "layers": layers,
            "metrics": list(self.metrics),
            "output": self.output,
            "rows": {"start": self.rows[0], "stop": self.rows[1]},
            "compute": {
                "workers": c.workers,
                "precision": c.precision,
                "memory_per_worker": c.memory_per_worker,
                "block_rows": c.block_rows,
                "svcca_threshold": c.svcca_threshold,
                "space": c.space,
                "checkpoint_seconds": c.checkpoint_seconds,
                "bootstrap": c.bootstrap,
                "bootstrap_shards": c.bootstrap_shards,
                "eig_floor": "auto" if c.eig_floor is None else c.eig_floor,
                "ambiguous_rank": c.ambiguous_rank,
            },
        }

    def identity(self) -> dict[str, Any]:
        """What makes two runs' results comparable: everything but execution settings."""
        d = self.to_dict()
        d["compute"] = {"svcca_threshold": self.compute.svcca_threshold}
        return d


def load_spec(path: str | Path) -> JobSpec:
    """Read and check a YAML job spec file. SpecError names the field; NotFoundError the file."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"job spec {str(path)!r} does not exist")
    return parse_spec(path.read_text(), source=str(path))


def parse_spec(text: str, source: str = "<spec>") -> JobSpec:
    """Parse YAML text into a JobSpec. YAML is loaded safely: a spec is data, never code."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{source}: malformed YAML{where}: {problem}") from None
    return spec_from_dict(raw, source=source)


def spec_from_dict(raw: Any, source: str = "<spec>") -> JobSpec:
    """Check a spec given as plain data (the YAML's top-level mapping)."""
    from repscope.cluster.registry import check_metrics

    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a job spec is a mapping of keys {', '.join(TOP_KEYS)}")
    for key in raw:
        if key not in TOP_KEYS:
            raise SpecError(f"{source}: unknown key {key!r}{closest(key, TOP_KEYS)}")
    for key in ("store", "metrics", "output"):
        if raw.get(key) in (None, "", []):
            raise SpecError(f"{source}: missing required key {key!r}")
    store = _url(raw["store"], "store", source)
    output = _url(raw["output"], "output", source)
    metrics = _names(raw["metrics"], "metrics", source)
    try:
        metrics = tuple(check_metrics(metrics))
    except InputError as exc:
        raise SpecError(f"{source}: metrics: {exc}") from None
    models = _names(raw["models"], "models", source) if raw.get("models") is not None else None
    layers = _layers(raw.get("layers"), source)
    return JobSpec(
        store=store,
        metrics=metrics,
        output=output,
        models=models,
        layers=layers,
        rows=_rows(raw.get("rows"), source),
        storage_options=_mapping(raw.get("storage_options"), "storage_options", source),
        compute=_compute(raw.get("compute"), source),
    )


def _url(value: Any, key: str, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{source}: {key!r} must be a URL or path string, got {value!r}")
    return value.strip()


def _names(value: Any, key: str, source: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise SpecError(f"{source}: {key!r} must be a non-empty list of names")
    out = []
    for item in value:
        if not isinstance(item, str | int) or isinstance(item, bool) or str(item) == "":
            raise SpecError(f"{source}: {key!r} holds {item!r}, not a name")
        out.append(str(item))
    dupes = sorted({n for n in out if out.count(n) > 1})
    if dupes:
        raise SpecError(f"{source}: {key!r} lists {dupes[0]!r} more than once")
    return tuple(out)


def _layers(value: Any, source: str):
    if value is None:
        return None
    if isinstance(value, dict):
        if not value:
            raise SpecError(f"{source}: 'layers' mapping is empty")
        return {str(m): _names(ls, f"layers.{m}", source) for m, ls in value.items()}
    return _names(value, "layers", source)


def _mapping(value: Any, key: str, source: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{source}: {key!r} must be a mapping")
    return dict(value)


def _int(value: Any, key: str, source: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{source}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _rows(value: Any, source: str) -> tuple[int, int | None]:
    if value is None:
        return (0, None)
    if not isinstance(value, dict):
        raise SpecError(f"{source}: 'rows' must be a mapping {{start: N, stop: M}}")
    for key in value:
        if key not in ("start", "stop"):
            raise SpecError(f"{source}: unknown key 'rows.{key}'{closest(key, ('start', 'stop'))}")
    start = _int(value.get("start", 0), "rows.start", source)
    stop = value.get("stop")
    if stop is not None:
        stop = _int(stop, "rows.stop", source)
        if stop <= start:
            raise SpecError(
                f"{source}: rows.stop ({stop}) must be greater than rows.start ({start})"
            )
    return (start, stop)


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_bytes(value: Any, key: str = "size", source: str = "<spec>") -> int:
    """'2GiB', '512 MB', 1048576 -> bytes (binary multiples)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("kmgib")
        unit = text[len(number):]
        try:
            amount = float(number)
        except ValueError:
            amount = math.nan
        if unit in _UNITS and amount > 0:
            return int(amount * _UNITS[unit])
    raise SpecError(f"{source}: {key} must be a size such as '2GiB' or a byte count, got {value!r}")


def _compute(value: Any, source: str) -> Compute:
    if value is None:
        return Compute()
    if not isinstance(value, dict):
        raise SpecError(f"{source}: 'compute' must be a mapping")
    for key in value:
        if key not in COMPUTE_KEYS:
            raise SpecError(f"{source}: unknown key 'compute.{key}'{closest(key, COMPUTE_KEYS)}")
    workers = value.get("workers", "auto")
    workers = None if workers in ("auto", None) else _int(workers, "compute.workers", source, 1)
    precision = value.get("precision", "float32")
    if precision not in PRECISIONS:
        raise SpecError(
            f"{source}: compute.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    memory = value.get("memory_per_worker")
    if memory in (None, "auto"):
        memory = None
    else:
        memory = parse_bytes(memory, "compute.memory_per_worker", source)
    block_rows = value.get("block_rows")
    block_rows = None if block_rows is None else _int(block_rows, "compute.block_rows", source, 1)
    threshold = value.get("svcca_threshold", 0.99)
    number = isinstance(threshold, int | float) and not isinstance(threshold, bool)
    if not number or not 0 < threshold <= 1:
        raise SpecError(f"{source}: compute.svcca_threshold must be in (0, 1], got {threshold!r}")
    space = value.get("space", "auto")
    if space not in SPACES:
        raise SpecError(
            f"{source}: compute.space must be one of {', '.join(SPACES)}, got {space!r}"
        )
    every = value.get("checkpoint_seconds", 120.0)
    if isinstance(every, bool) or not isinstance(every, int | float) or every < 0:
        raise SpecError(
            f"{source}: compute.checkpoint_seconds must be a number >= 0, got {every!r}"
        )
    bootstrap = _int(value.get("bootstrap", 0), "compute.bootstrap", source)
    if bootstrap == 1:
        raise SpecError(f"{source}: compute.bootstrap needs at least 2 replicates (or 0)")
    shards = _int(value.get("bootstrap_shards", 20), "compute.bootstrap_shards", source, 2)
    floor = value.get("eig_floor", "auto")
    if floor in ("auto", None):
        floor = None
    elif isinstance(floor, bool) or not isinstance(floor, int | float) or not 0 <= floor < 1:
        raise SpecError(f"{source}: compute.eig_floor must be 'auto' or a number in [0, 1), "
                        f"got {floor!r}")
    ambiguous = value.get("ambiguous_rank", "recompute")
    if ambiguous not in AMBIGUOUS_RANK:
        raise SpecError(f"{source}: compute.ambiguous_rank must be one of "
                        f"{', '.join(AMBIGUOUS_RANK)}, got {ambiguous!r}")
    return Compute(
        bootstrap=bootstrap,
        bootstrap_shards=shards,
        workers=workers,
        precision=precision,
        memory_per_worker=memory,
        block_rows=block_rows,
        svcca_threshold=float(threshold),
        checkpoint_seconds=float(every),
        space=space,
        eig_floor=None if floor is None else float(floor),
        ambiguous_rank=ambiguous,
    )
