"""Job specs: the YAML a user writes, parsed and checked before any work is done.

```yaml
store: s3://bucket/acts.zarr        # required: a store URL
models: [bert-seed1, bert-seed2]    # optional, default: every model in the store
layers: [layer3, layer7]            # optional, default: every layer; or {model: [layers]}
metrics: [linear_cka, pwcca, procrustes]   # required
metric_options: {rbf_cka: {threshold: 0.5}} # optional parameters of metrics that have them
output: s3://bucket/results/run.zarr       # required: a results store URL
rows: {start: 0, stop: 100000}      # optional subset of rows
storage_options: {}                 # optional fsspec options for store and output
compute: {workers: auto, precision: float32}   # optional
```

Parsing checks only the spec itself (keys, types, metric names, sizes and counts in range).
Names that need the store (models, layers, row counts) are checked by
:func:`jobs.plan.make_plan` against it, still before any work starts.

A spec is small, and parsing keeps it so: a file over 1 MiB, YAML aliases that expand to
more than 100,000 values (a 400-byte "billion laughs" would otherwise fill memory), recursive
aliases and nesting deeper than the parser can follow are each refused with one line, and
an error echoes at most 80 characters of any value.
"""

from __future__ import annotations

import difflib
import math
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from repscope.errors import InputError, NotFoundError, SpecError

TOP_KEYS = ("store", "models", "layers", "metrics", "metric_options", "output", "rows",
            "storage_options", "compute")
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
    "executor",
    "tile_rows",
    "exact_rows",
    "exact_entries",
    "sample_rows",
    "eig_floor",
    "ambiguous_rank",
)
PRECISIONS = ("float32", "float64")
MAX_SPEC_BYTES = 1 << 20
MAX_VALUES = 100_000  # nodes of the spec with every alias expanded
MAX_WORKERS = 1 << 20
MAX_COUNT = 1_000_000  # bootstrap replicates and shards
MIN_MEMORY, MAX_MEMORY = 1 << 10, 1 << 50  # 1 KiB (tests tile tiny jobs) to 1 PiB
SPACES = ("auto", "feature", "sample")
EXECUTORS = ("auto", "process", "ray")
AMBIGUOUS_RANK = ("recompute", "refuse")


def closest(name: str, choices) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(str(name)[:200], [str(c) for c in choices], n=1,
                                      cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
_SHORT.maxlevel = 2


def shown(value: Any, limit: int = 80) -> str:
    """repr of a value from the user, at most ``limit`` characters: errors never echo
    megabytes (an expanded alias, a pasted array)."""
    try:
        text = _SHORT.repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        text = f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    rerun after a crash resumes, losing at most this much of each task's work (a task that
    finishes sooner saves nothing; 0 turns checkpoints off).
    bootstrap: replicates of a row-shard bootstrap that adds 90% confidence bounds to every
    matrix entry (0: none); bootstrap_shards: the row shards it resamples.
    space: "feature" (d x d moments per unit pair, cost n d^2), "sample" (n x n Gram per
    unit, cost n^2 d) or "auto" (the planner picks the cheaper one that fits memory).
    executor: where the tasks run: "process" (this process), "ray" (an embedded instance or
    the cluster of --address/RAY_ADDRESS) or "auto" (a cluster when an address is given,
    else this process for small jobs and memory:// stores, else an embedded Ray instance).
    tile_rows: rows per block of the kernel metrics' row-block tiles (None = from memory).
    exact_rows: up to this many rows the kernel metrics are exact; beyond, estimated on a
    sample of ``sample_rows`` rows, with error bars. exact_entries: up to this many
    pair values in all (units x n(n-1)/2), the median and RSA's ranks are exact; beyond,
    from histograms with error bounds (docs/metrics.md).
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
    executor: str = "auto"
    tile_rows: int | None = None
    exact_rows: int = 100_000
    exact_entries: int = 1 << 25
    sample_rows: int = 4096
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
    # {metric: {parameter: value}}, every parameter of the job's metrics that have any.
    metric_options: dict[str, dict[str, Any]] = field(default_factory=dict)

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
                "executor": c.executor,
                "tile_rows": c.tile_rows,
                "exact_rows": c.exact_rows,
                "exact_entries": c.exact_entries,
                "sample_rows": c.sample_rows,
                "eig_floor": "auto" if c.eig_floor is None else c.eig_floor,
                "ambiguous_rank": c.ambiguous_rank,
            },
            # Only when some metric has parameters: specs without them keep their identity.
            **({"metric_options": self.metric_options} if self.metric_options else {}),
        }

    def identity(self) -> dict[str, Any]:
        """What makes two runs' results comparable: everything but execution settings."""
        d = self.to_dict()
        d["compute"] = {"svcca_threshold": self.compute.svcca_threshold}
        if self.metric_options:  # they change values: part of what reuse must match
            d["compute"]["metric_options"] = d.pop("metric_options")
        return d


def load_spec(path: str | Path) -> JobSpec:
    """Read and check a YAML job spec file. SpecError names the field; NotFoundError the file."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"job spec {str(path)!r} does not exist")
    if not path.is_file():
        raise SpecError(f"job spec {str(path)!r} is not a file")
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"job spec {str(path)!r} is {size / (1 << 20):.1f} MiB; a spec is a "
                        f"small YAML file (at most {MAX_SPEC_BYTES >> 20} MiB)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"job spec {str(path)!r} is not UTF-8 text (byte {exc.start})") from None
    return parse_spec(text, source=str(path))


def secret_values(path: str | Path) -> list[str]:
    """Every value in a spec file's ``storage_options`` and the user info of its URLs
    (secrets to keep out of messages), whatever else is wrong with the spec; [] if it
    cannot be read."""
    from repscope.store.urls import option_values

    try:
        text = Path(path).read_text(encoding="utf-8")[:MAX_SPEC_BYTES]
        loader = _SpecLoader(text)
        loader.source = str(path)
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except (OSError, ValueError, yaml.YAMLError, RecursionError):
        return []
    if not isinstance(raw, dict):
        return []
    urls = [raw.get(key) for key in ("store", "output")]
    return option_values(raw.get("storage_options")) + [
        part for url in urls if isinstance(url, str) for part in url_userinfo(url)]


def url_userinfo(url: str) -> list[str]:
    """The user and password of ``scheme://user:password@host/...`` (none if absent)."""
    match = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/@\s]*)@", url)
    return [part for part in match.group(1).split(":", 1) if part] if match else []


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only), refusing documents whose aliases expand to
    more than MAX_VALUES values or refer to themselves."""

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node, self.source)
        return node


def _expanded_size(root, source: str) -> int:
    """How many values a composed document holds with every alias expanded; an alias
    shares its node, so each node is sized once (memo) and the walk stays small."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise SpecError(f"{source}: a YAML alias refers to the value that contains it")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        open_nodes.discard(key)
        if total > MAX_VALUES:
            raise SpecError(f"{source}: YAML aliases expand this spec to more than "
                            f"{MAX_VALUES:,} values; write it out without aliases")
        sizes[key] = total
        return total

    return size(root) if root is not None else 0


def parse_spec(text: str, source: str = "<spec>") -> JobSpec:
    """Parse YAML text into a JobSpec. YAML is loaded safely: a spec is data, never code."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: a spec is a small YAML file (at most "
                        f"{MAX_SPEC_BYTES >> 20} MiB), this one has {len(text):,} characters")
    loader = _SpecLoader(text)
    loader.source = source
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{source}: malformed YAML{where}: {shown(problem, 200)}") from None
    except RecursionError:
        raise SpecError(f"{source}: the YAML is nested too deeply to be a job spec") from None
    except SpecError:
        raise
    except ValueError as exc:  # a constructor's refusal, e.g. an int of 5,000 digits
        raise SpecError(f"{source}: malformed YAML: {str(exc)[:200]}") from None
    finally:
        loader.dispose()
    try:
        return spec_from_dict(raw, source=source)
    except RecursionError:
        raise SpecError(f"{source}: the YAML is nested too deeply to be a job spec") from None


def spec_from_dict(raw: Any, source: str = "<spec>") -> JobSpec:
    """Check a spec given as plain data (the YAML's top-level mapping)."""
    from repscope.cluster.registry import check_metrics, metric_options

    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a job spec is a mapping of keys {', '.join(TOP_KEYS)}")
    for key in raw:
        if key not in TOP_KEYS:
            raise SpecError(f"{source}: unknown key {shown(key)}{closest(key, TOP_KEYS)}")
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
    options = _mapping(raw.get("metric_options"), "metric_options", source)
    for name, given in options.items():
        if name not in metrics:
            raise SpecError(f"{source}: metric_options names {name!r}, which metrics does not "
                            f"list{closest(name, metrics)}")
        if not isinstance(given, dict):
            raise SpecError(f"{source}: metric_options.{name} must be a mapping of parameters")
    try:
        resolved = {m: metric_options(m, options.get(m)) for m in metrics
                    if metric_options(m)}
    except InputError as exc:
        raise SpecError(f"{source}: metric_options: {exc}") from None
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
        metric_options=resolved,
    )


def _url(value: Any, key: str, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{source}: {key!r} must be a URL or path string, got {shown(value)}")
    return value.strip()


def _names(value: Any, key: str, source: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise SpecError(f"{source}: {shown(key)} must be a non-empty list of names")
    out = []
    for item in value:
        if not isinstance(item, str | int) or isinstance(item, bool) or str(item) == "":
            raise SpecError(f"{source}: {shown(key)} holds {shown(item)}, not a name")
        out.append(str(item))
    dupes = sorted({n for n in out if out.count(n) > 1})
    if dupes:
        raise SpecError(f"{source}: {shown(key)} lists {shown(dupes[0])} more than once")
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


def _int(value: Any, key: str, source: str, minimum: int = 0,
         maximum: int | None = None) -> int:
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or (maximum is not None and value > maximum)):
        bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum:,}"
        raise SpecError(f"{source}: {key} must be an integer {bound}, got {shown(value)}")
    return value


def _rows(value: Any, source: str) -> tuple[int, int | None]:
    if value is None:
        return (0, None)
    if not isinstance(value, dict):
        raise SpecError(f"{source}: 'rows' must be a mapping {{start: N, stop: M}}")
    for key in value:
        if key not in ("start", "stop"):
            raise SpecError(
                f"{source}: unknown key 'rows.{str(key)[:60]}'{closest(key, ('start', 'stop'))}")
    start = _int(value.get("start", 0), "rows.start", source, 0, 1 << 62)
    stop = value.get("stop")
    if stop is not None:
        stop = _int(stop, "rows.stop", source, 0, 1 << 62)
        if stop <= start:
            raise SpecError(
                f"{source}: rows.stop ({stop}) must be greater than rows.start ({start})"
            )
    return (start, stop)


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40, "p": 1 << 50, "pb": 1 << 50,
          "pib": 1 << 50}


def parse_bytes(value: Any, key: str = "size", source: str = "<spec>",
                minimum: int = 1, maximum: int = MAX_MEMORY) -> int:
    """'2GiB', '512 MB', 1048576 -> bytes (binary multiples), from ``minimum`` to
    ``maximum``; infinite, NaN, negative and absurd sizes are refused naming ``key``."""
    amount = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        amount = float(value) if math.isfinite(value) else math.nan
    elif isinstance(value, str) and len(value) < 64:
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("kmgtpib")
        unit = text[len(number):]
        try:
            amount = float(number) * _UNITS[unit]
        except (ValueError, KeyError):
            amount = math.nan
    if math.isfinite(amount) and minimum <= amount <= maximum:
        return int(amount)
    raise SpecError(f"{source}: {key} must be a size from {_size(minimum)} to "
                    f"{_size(maximum)} such as '2GiB' or a byte count, got {shown(value)}")


def _size(nbytes: int) -> str:
    for unit, scale in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30),
                        ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} bytes"


def _choice(compute: dict, key: str, choices: tuple[str, ...], source: str) -> str:
    """``compute[key]``, one of ``choices`` (default: the first)."""
    got = compute.get(key, choices[0])
    if got not in choices:
        raise SpecError(f"{source}: compute.{key} must be one of {', '.join(choices)}, got "
                        f"{shown(got)}")
    return got


def _compute(value: Any, source: str) -> Compute:
    if value is None:
        return Compute()
    if not isinstance(value, dict):
        raise SpecError(f"{source}: 'compute' must be a mapping")
    for key in value:
        if key not in COMPUTE_KEYS:
            raise SpecError(
                f"{source}: unknown key 'compute.{str(key)[:60]}'{closest(key, COMPUTE_KEYS)}")
    workers = value.get("workers", "auto")
    workers = None if workers in ("auto", None) else _int(workers, "compute.workers", source, 1,
                                                          MAX_WORKERS)
    precision = _choice(value, "precision", PRECISIONS, source)
    memory = value.get("memory_per_worker")
    if memory in (None, "auto"):
        memory = None
    else:
        memory = parse_bytes(memory, "compute.memory_per_worker", source, MIN_MEMORY)
    block_rows = value.get("block_rows")
    block_rows = None if block_rows is None else _int(block_rows, "compute.block_rows", source,
                                                      1, 1 << 31)
    threshold = value.get("svcca_threshold", 0.99)
    number = isinstance(threshold, int | float) and not isinstance(threshold, bool)
    if not number or not 0 < threshold <= 1:
        raise SpecError(
            f"{source}: compute.svcca_threshold must be in (0, 1], got {shown(threshold)}")
    space = _choice(value, "space", SPACES, source)
    every = value.get("checkpoint_seconds", 120.0)
    if (isinstance(every, bool) or not isinstance(every, int | float)
            or not math.isfinite(every) or every < 0):
        raise SpecError(f"{source}: compute.checkpoint_seconds must be a finite number >= 0 "
                        f"(0 turns checkpoints off), got {shown(every)}")
    bootstrap = _int(value.get("bootstrap", 0), "compute.bootstrap", source, 0, MAX_COUNT)
    if bootstrap == 1:
        raise SpecError(f"{source}: compute.bootstrap needs at least 2 replicates (or 0)")
    shards = _int(value.get("bootstrap_shards", 20), "compute.bootstrap_shards", source, 2,
                  MAX_COUNT)
    executor = _choice(value, "executor", EXECUTORS, source)
    tile_rows = value.get("tile_rows")
    tile_rows = None if tile_rows is None else _int(tile_rows, "compute.tile_rows", source, 2)
    floor = value.get("eig_floor", "auto")
    if floor in ("auto", None):
        floor = None
    elif isinstance(floor, bool) or not isinstance(floor, int | float) or not 0 <= floor < 1:
        raise SpecError(f"{source}: compute.eig_floor must be 'auto' or a number in [0, 1), "
                        f"got {shown(floor)}")
    ambiguous = _choice(value, "ambiguous_rank", AMBIGUOUS_RANK, source)
    return Compute(
        tile_rows=tile_rows,
        exact_rows=_int(value.get("exact_rows", 100_000), "compute.exact_rows", source, 3),
        exact_entries=_int(value.get("exact_entries", 1 << 25), "compute.exact_entries",
                           source, 0),
        sample_rows=_int(value.get("sample_rows", 4096), "compute.sample_rows", source, 16),
        executor=executor,
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
