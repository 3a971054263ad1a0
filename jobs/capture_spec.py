"""Capture specs: the YAML that names a capture's store, checkpoints and inputs.

```yaml
store: acts.zarr                  # required: a store URL (created if missing)
checkpoints:                      # required: model name -> checkpoint folder
  bert-seed1: ckpts/seed1         #   (or a list of folders, each named by its folder)
  bert-seed2: ckpts/seed2
text: probes.txt                  # one example per line; or ids: probes.npz (input_ids,
                                  #   attention_mask, optional token_type_ids)
layers: [embeddings, layer6]      # optional, default: every hidden state
pool: none                        # none (token rows) | mean | first | last
max_length: 128                   # optional, default: the shortest maximum of the models
batch_size: 32
device: auto                      # auto | cpu | cuda
dtype: float32                    # storage dtype: float32 | float16
storage_options: {}               # fsspec options for the store
```

Relative paths are relative to the spec's folder. Parsing checks the spec itself; whether the
checkpoints, inputs and layers exist is checked by jobs/capture.py's planning, still before
any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from repscope.errors import InputError, NotFoundError, SpecError
from repscope.jobs.spec import closest
from repscope.store.capture import POOLS
from repscope.store.layout import STORAGE_DTYPES
from repscope.store.validate import check_name

SPEC_KEYS = ("store", "checkpoints", "text", "ids", "layers", "pool", "max_length",
             "batch_size", "device", "dtype", "storage_options")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class CaptureSpec:
    """A parsed capture spec: which checkpoints, which inputs, into which store."""

    store: str
    checkpoints: tuple[tuple[str, str], ...]  # (model name, checkpoint folder)
    text: str | None = None
    ids: str | None = None
    layers: tuple[str, ...] | None = None
    pool: str = "none"
    max_length: int | None = None
    batch_size: int = 32
    device: str = "auto"
    dtype: str = "float32"
    storage_options: dict[str, Any] = field(default_factory=dict)


def _positive(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _choice(value: Any, key: str, choices: tuple[str, ...], source: str) -> str:
    if value not in choices:
        raise SpecError(f"{source}: {key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _checkpoints(value: Any, source: str, base: Path) -> tuple[tuple[str, str], ...]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        pairs = [(Path(str(p)).name, str(p)) for p in value]
    elif isinstance(value, dict):
        pairs = [(str(name), str(path)) for name, path in value.items()]
    else:
        raise SpecError(f"{source}: checkpoints must map model names to checkpoint folders")
    if not pairs:
        raise SpecError(f"{source}: checkpoints is empty")
    seen: set[str] = set()
    for name, _ in pairs:
        try:
            check_name("model", name)
        except InputError as exc:
            raise SpecError(f"{source}: checkpoints: {exc}") from None
        if name in seen:
            raise SpecError(f"{source}: checkpoints name model {name!r} twice")
        seen.add(name)
    return tuple((name, str(base / Path(path).expanduser())) for name, path in pairs)


def spec_from_dict(
    raw: Any, source: str = "<capture spec>", base: Path | None = None
) -> CaptureSpec:
    """Check a capture spec given as plain data; relative paths are taken from ``base``."""
    base = base or Path(".")
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a capture spec is a mapping of keys {', '.join(SPEC_KEYS)}")
    for key in raw:
        if key not in SPEC_KEYS:
            raise SpecError(f"{source}: unknown key {key!r}{closest(key, SPEC_KEYS)}")
    for key in ("store", "checkpoints"):
        if raw.get(key) in (None, "", [], {}):
            raise SpecError(f"{source}: missing required key {key!r}")
    if (raw.get("text") is None) == (raw.get("ids") is None):
        raise SpecError(f"{source}: give exactly one of text (one example per line) or ids "
                        "(an .npz of input_ids and attention_mask)")
    store = str(raw["store"])
    if "://" not in store:
        store = str(base / Path(store).expanduser())
    layers = raw.get("layers")
    if layers is not None:
        if isinstance(layers, str):
            layers = [layers]
        if not isinstance(layers, list) or not layers or not all(
                isinstance(n, str) for n in layers):
            raise SpecError(f"{source}: layers must be a non-empty list of layer names")
        if len(set(layers)) != len(layers):
            raise SpecError(f"{source}: layers lists a layer more than once")
    options = raw.get("storage_options") or {}
    if not isinstance(options, dict):
        raise SpecError(f"{source}: storage_options must be a mapping")
    max_length = raw.get("max_length")
    return CaptureSpec(
        store=store,
        checkpoints=_checkpoints(raw["checkpoints"], source, base),
        text=None if raw.get("text") is None else str(base / Path(str(raw["text"])).expanduser()),
        ids=None if raw.get("ids") is None else str(base / Path(str(raw["ids"])).expanduser()),
        layers=None if layers is None else tuple(layers),
        pool=_choice(raw.get("pool", "none"), "pool", POOLS, source),
        max_length=None if max_length is None else _positive(max_length, "max_length", source),
        batch_size=_positive(raw.get("batch_size", 32), "batch_size", source),
        device=_choice(raw.get("device", "auto"), "device", DEVICES, source),
        dtype=_choice(raw.get("dtype", "float32"), "dtype", STORAGE_DTYPES, source),
        storage_options=dict(options),
    )


def read_spec_file(path: str | Path) -> Any:
    path = Path(path).expanduser()
    if not path.is_file():
        raise NotFoundError(f"capture spec {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}: malformed YAML: {problem}") from None


def load_capture_spec(path: str | Path) -> CaptureSpec:
    """Read and check a capture spec file (YAML)."""
    path = Path(path).expanduser()
    return spec_from_dict(read_spec_file(path), str(path), path.resolve().parent)


def is_capture_spec(path: str | Path) -> bool:
    """True for a capture spec (it lists checkpoints), False for a job spec."""
    raw = read_spec_file(path)
    return isinstance(raw, dict) and "checkpoints" in raw
