"""Capture: the activations of a running torch model, streamed into a store unit by unit.

Forward hooks on named modules (or, for Hugging Face checkpoints, the model's hidden states,
store/hf.py) hand each batch's outputs to :class:`UnitStreams`, which turns them into rows and
appends them to one :class:`~repscope.store.writer.UnitWriter` per unit:

- (batch, tokens, features) outputs with ``pool="none"``: every position that the attention
  mask keeps is a row, example by example, position by position. The store records the row
  -> example map and the padding mask exactly as ingest does for 3-D arrays, so token rows of
  two models align when, and only when, their inputs and masks are the same;
- ``pool`` "mean", "first" or "last": one row per example, the mean over the kept positions
  or the first / last kept position;
- (batch, features) outputs: one row per example; (batch, channels, *spatial) outputs are
  flattened per example (C order), or averaged over the spatial positions with pool "mean".

Trailing positions that no example of a batch keeps are dropped before anything is stored,
so the rows depend on the inputs and masks, not on how the batches were padded.

Memory: one shard buffer per unit (``shard_bytes``) and one batch of outputs, whatever the
number of inputs. Each unit is published only when complete, so an interrupted capture leaves
nothing visible, and an exception aborts every unit not yet published.

torch is imported only when a capture runs: the rest of repscope works without it.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from repscope.errors import InputError, RepscopeError
from repscope.store.activation_store import ActivationStore, UnitInfo
from repscope.store.layout import DEFAULT_CHUNK_BYTES
from repscope.store.sources import to_numpy
from repscope.store.validate import check_name, check_storage_dtype, where
from repscope.store.writer import UnitWriter

POOLS = ("none", "mean", "first", "last")
# Smaller than ingest's default shard: a capture holds one shard buffer per unit at once.
CAPTURE_SHARD_BYTES = 64 << 20
INSTALL = "pip install 'repscope[capture]'"


class MissingExtraError(RepscopeError, ImportError):
    """torch or transformers is missing: the capture extra is not installed."""


def require(module: str) -> Any:
    """Import ``module`` (torch, transformers) or say, in one line, how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"capture needs {module}, which is not installed: {INSTALL}"
        ) from None


def check_pool(pool: object) -> str:
    if pool not in POOLS:
        raise InputError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    return str(pool)


def as_store(store: ActivationStore | str) -> ActivationStore:
    """A store object, creating the store when given a URL."""
    return store if isinstance(store, ActivationStore) else ActivationStore.create(str(store))


# -- which modules ------------------------------------------------------------------------


def resolve_layers(
    model: Any, layers: Iterable[str] | Mapping[str, str] | str, model_name: str
) -> dict[str, str]:
    """{unit name: module path} for ``layers`` (paths, or a mapping unit name -> path).

    Every path must name a module of ``model`` (``dict(model.named_modules())``); unit names
    become store layer names.
    """
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(layers, Mapping):
        paths = {str(unit): str(path) for unit, path in layers.items()}
    else:
        paths = {str(path): str(path) for path in layers}
    if not paths:
        raise InputError(f"{where(model_name)}: no layers to capture; name module paths")
    modules = {name for name, _ in model.named_modules() if name}
    for unit, path in paths.items():
        check_name("layer", unit)
        if path not in modules:
            raise InputError(f"{where(model_name, unit)}: module {path!r} not in the model"
                             f"{module_hint(path, modules)}")
    return paths


def module_hint(path: str, modules: Iterable[str]) -> str:
    """'; did you mean ...? (modules: a, b, ...)' for an unknown module path."""
    names = sorted(modules, key=lambda n: (n.count("."), n))
    close = difflib.get_close_matches(path, names, n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    return f"{hint} (modules: {shown or 'none'})"


def first_tensor(output: Any) -> Any:
    """The tensor a module returned: itself, or the first tensor of a tuple or model output."""
    torch = require("torch")
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):  # transformers' ModelOutput is a mapping
        output = tuple(output.values())
    if isinstance(output, tuple | list):
        return next((value for value in output if isinstance(value, torch.Tensor)), None)
    return None


class Hooks:
    """Forward hooks that keep each named module's output of the current forward pass."""

    def __init__(self, model: Any, paths: Mapping[str, str], model_name: str) -> None:
        self._modules = dict(model.named_modules())
        self._paths = dict(paths)
        self._model_name = model_name
        self._handles: list[Any] = []
        self._outputs: dict[str, Any] = {}
        self._calls: dict[str, int] = {}

    def __enter__(self) -> Hooks:
        for unit, path in self._paths.items():
            self._handles.append(
                self._modules[path].register_forward_hook(self._keeper(unit))
            )
        return self

    def _keeper(self, unit: str) -> Callable:
        def keep(module, inputs, output) -> None:
            self._calls[unit] = self._calls.get(unit, 0) + 1
            self._outputs[unit] = first_tensor(output)

        return keep

    def take(self) -> dict[str, Any]:
        """The outputs of the forward pass that just ran, unit by unit; then forget them."""
        for unit, path in self._paths.items():
            calls = self._calls.get(unit, 0)
            problem = None
            if calls == 0:
                problem = "did not run in the forward pass"
            elif calls > 1:
                problem = (f"ran {calls} times in one forward pass (a shared module); "
                           "capture a module that runs once")
            elif self._outputs[unit] is None:
                problem = "returned no tensor"
            if problem:
                raise InputError(f"{where(self._model_name, unit)}: module {path!r} {problem}")
        outputs, self._outputs, self._calls = self._outputs, {}, {}
        return outputs

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# -- rows ---------------------------------------------------------------------------------


def trim(keep: np.ndarray) -> np.ndarray:
    """``keep`` without the trailing positions that no example keeps: (examples, width)."""
    columns = np.flatnonzero(keep.any(axis=0))
    return keep[:, : int(columns[-1]) + 1 if columns.size else 0]


def pooled(arr: np.ndarray, keep: np.ndarray | None, pool: str) -> np.ndarray:
    """One row per example of a (examples, tokens, features) batch: (examples, features).

    ``keep`` (examples, tokens) bool marks the positions that count (None: all). The mean is
    taken in float64 (then stored in the storage dtype).
    """
    if keep is None:
        keep = np.ones(arr.shape[:2], bool)
    if pool == "mean":
        counts = keep.sum(axis=1, keepdims=True)
        return np.einsum("et,etf->ef", keep.astype(np.float64), arr.astype(np.float64)) / counts
    rows = np.arange(arr.shape[0])
    if pool == "first":
        return arr[rows, np.argmax(keep, axis=1)]
    return arr[rows, keep.shape[1] - 1 - np.argmax(keep[:, ::-1], axis=1)]


class UnitStreams:
    """One streaming writer per unit, fed with each batch's outputs and its attention mask.

    ``example_ids`` (optional, one per example) become the store's row ids: per example for
    token rows, per row for one row per example. ``rows`` (optional) is the row count every
    unit will have, when known, so small units get one right-sized shard. ``attributes``
    maps a unit to what its writer records with it.
    """

    def __init__(
        self,
        store: ActivationStore,
        model_name: str,
        units: Iterable[str],
        *,
        pool: str = "none",
        dtype: str = "float32",
        example_ids: Any = None,
        rows: int | None = None,
        attributes: Mapping[str, Mapping] | None = None,
        overwrite: bool = False,
        shard_bytes: int = CAPTURE_SHARD_BYTES,
    ) -> None:
        self.store = store
        self.model_name = check_name("model", model_name)
        self.units = list(units)
        self.pool = check_pool(pool)
        self.dtype = check_storage_dtype(dtype)
        self._ids = None if example_ids is None else np.asarray(example_ids)
        self._rows = rows
        self._attributes = dict(attributes or {})
        self._overwrite = overwrite
        self._shard_bytes = shard_bytes
        self._writers: dict[str, UnitWriter] = {}
        self._kind: tuple[str, str] | None = None  # ("tokens" | "examples", first unit)
        self.examples = 0
        self.rows = 0

    def add(self, outputs: Mapping[str, Any], keep: np.ndarray | None = None) -> int:
        """Append one batch: ``outputs`` {unit: tensor or ndarray (examples, ...)}, ``keep``
        (examples, tokens) bool, True where the attention mask is 1 (None: every position).
        Returns the rows the batch added to each unit."""
        if keep is not None:
            keep = trim(np.asarray(keep, dtype=bool))
        arrays = {unit: to_numpy(outputs[unit]) for unit in self.units}
        examples = keep.shape[0] if keep is not None else arrays[self.units[0]].shape[0]
        added = 0
        for unit, arr in arrays.items():
            added = self._append(unit, arr, keep, examples)
        self.examples += examples
        self.rows += added
        return added

    def _append(self, unit: str, arr: np.ndarray, keep: np.ndarray | None, examples: int) -> int:
        ctx = where(self.model_name, unit)
        if arr.ndim < 2 or arr.shape[0] != examples:
            raise InputError(f"{ctx}: output of shape {tuple(arr.shape)} does not have the "
                             f"batch's {examples} examples first")
        token_rows = arr.ndim == 3 and self.pool == "none"
        self._check_kind(unit, "tokens" if token_rows else "examples")
        writer = self._writer(unit, token_rows)
        if arr.ndim == 3:
            if keep is not None:
                if arr.shape[1] < keep.shape[1]:
                    raise InputError(
                        f"{ctx}: output has {arr.shape[1]} positions but the attention mask "
                        f"keeps positions up to {keep.shape[1]}"
                    )
                arr = arr[:, : keep.shape[1]]
            if not token_rows:
                writer.append(pooled(arr, keep, self.pool))
                return examples
            writer.append(arr, padding_mask=None if keep is None else ~keep)
            return arr.shape[0] * arr.shape[1] if keep is None else int(keep.sum())
        if arr.ndim > 3 and self.pool in ("first", "last"):
            raise InputError(f"{ctx}: pool {self.pool!r} needs (batch, tokens, features) "
                             f"outputs, got shape {tuple(arr.shape)}; use mean or none")
        if arr.ndim > 3 and self.pool == "mean":
            arr = arr.reshape(*arr.shape[:2], -1).mean(axis=2, dtype=np.float64)
        writer.append(arr.reshape(examples, -1))
        return examples

    def _check_kind(self, unit: str, kind: str) -> None:
        if self._kind is None:
            self._kind = (kind, unit)
        elif self._kind[0] != kind:
            token_unit, row_unit = (unit, self._kind[1]) if kind == "tokens" else (
                self._kind[1], unit)
            raise InputError(
                f"{where(self.model_name, token_unit)}: gives token rows but layer "
                f"{row_unit!r} gives one row per example; every unit of a store has the same "
                "rows: pool the token outputs (pool='mean') or capture them into another store"
            )

    def _writer(self, unit: str, token_rows: bool) -> UnitWriter:
        writer = self._writers.get(unit)
        if writer is None:
            ids = {} if self._ids is None else (
                {"example_ids": self._ids} if token_rows else {"row_ids": self._ids})
            writer = UnitWriter(
                self.store,
                self.model_name,
                unit,
                dtype=self.dtype,
                chunk_bytes=min(DEFAULT_CHUNK_BYTES, self._shard_bytes),
                shard_bytes=self._shard_bytes,
                overwrite=self._overwrite,
                rows=self._rows,
                attributes=self._attributes.get(unit),
                **ids,
            )
            self._writers[unit] = writer
        return writer

    def close(self) -> list[UnitInfo]:
        """Publish every unit, in order; returns their infos."""
        if not self._writers:
            raise InputError(f"{where(self.model_name)}: no batches were captured")
        infos = []
        try:
            for unit in self.units:
                infos.append(self._writers.pop(unit).close())
        except BaseException:
            self.abort()
            raise
        return infos

    def abort(self) -> None:
        """Discard every unit not yet published."""
        for writer in self._writers.values():
            writer.abort()
        self._writers = {}


# -- generic capture ----------------------------------------------------------------------


def refuse_existing(
    store: ActivationStore, model_name: str, units: Iterable[str], overwrite: bool
) -> None:
    """Refuse, before any work, units that exist already (unless ``overwrite``)."""
    if overwrite:
        return
    existing = set(store.units())
    for unit in units:
        if (model_name, unit) in existing:
            raise InputError(
                f"{where(model_name, unit)}: unit already exists in store {store.url}; pass "
                "overwrite=True (--overwrite) to replace it"
            )


def _on_device(value: Any, device: Any) -> Any:
    torch = require("torch")
    return value.to(device) if isinstance(value, torch.Tensor) and device is not None else value


def call_arguments(batch: Any, device: Any, mask_key: str) -> tuple[list, dict, np.ndarray | None]:
    """(args, kwargs, keep) for one batch: a tensor is ``model(batch)``, a tuple or list
    ``model(*batch)``, a mapping ``model(**batch)`` whose ``mask_key`` entry (if any) is the
    attention mask (1 = a real position)."""
    if isinstance(batch, Mapping):
        kwargs = {key: _on_device(value, device) for key, value in batch.items()}
        mask = batch.get(mask_key)
        keep = None if mask is None else to_numpy(mask).astype(bool)
        return [], kwargs, keep
    if isinstance(batch, tuple | list):
        return [_on_device(value, device) for value in batch], {}, None
    return [_on_device(batch, device)], {}, None


def model_device(model: Any) -> Any:
    """The device of the model's first parameter or buffer (None for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


def capture(
    model: Any,
    batches: Iterable[Any],
    store: ActivationStore | str,
    model_name: str,
    *,
    layers: Iterable[str] | Mapping[str, str] | str,
    pool: str = "none",
    dtype: str = "float32",
    example_ids: Any = None,
    attributes: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    mask_key: str = "attention_mask",
    shard_bytes: int = CAPTURE_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> list[UnitInfo]:
    """Run ``model`` on ``batches`` and store the outputs of ``layers`` as units of ``model_name``.

    ``model``: any ``torch.nn.Module`` (put in eval mode while capturing, then restored).
    ``batches``: an iterable of inputs, read once: a tensor (``model(batch)``), a tuple
    (``model(*batch)``) or a mapping (``model(**batch)``), moved to the model's device; a
    mapping's ``mask_key`` entry, (examples, tokens) with 1 at real positions, decides which
    positions of (batch, tokens, features) outputs are rows. ``layers``: module paths
    (``dict(model.named_modules())`` keys), or a mapping unit name -> module path. ``pool``:
    "none" (token rows), "mean", "first" or "last" (one row per example). ``example_ids``
    (optional, one unique id per example) are recorded as the store's row ids, so stores and
    models can be checked for alignment by id; ``attributes`` (JSON) are recorded with every
    unit. ``progress(examples, rows)`` is called after each batch with what it added.

    Returns the :class:`UnitInfo` of every unit, in the order of ``layers``.

    Memory: one shard buffer per unit plus one batch of outputs, never the whole probe set.
    """
    torch = require("torch")
    check_name("model", model_name)
    pool = check_pool(pool)
    store = as_store(store)
    paths = resolve_layers(model, layers, model_name)
    refuse_existing(store, model_name, paths, overwrite)
    device = model_device(model)
    streams = UnitStreams(
        store,
        model_name,
        paths,
        pool=pool,
        dtype=dtype,
        example_ids=example_ids,
        attributes={unit: attributes for unit in paths} if attributes else None,
        overwrite=overwrite,
        shard_bytes=shard_bytes,
    )
    was_training = model.training
    model.eval()
    try:
        with Hooks(model, paths, model_name) as hooks, torch.inference_mode():
            for batch in batches:
                args, kwargs, keep = call_arguments(batch, device, mask_key)
                model(*args, **kwargs)
                before = streams.examples
                rows = streams.add(hooks.take(), keep)
                if progress is not None:
                    progress(streams.examples - before, rows)
        return streams.close()
    except BaseException:
        streams.abort()
        raise
    finally:
        model.train(was_training)
