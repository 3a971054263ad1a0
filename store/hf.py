"""Hugging Face checkpoints from local folders: inputs, hidden states, units.

A checkpoint is a folder written by ``save_pretrained`` (config.json and weights, plus the
tokenizer's files for text input). Nothing is downloaded: every load is
``local_files_only``. The units of a checkpoint with N layers are ``embeddings``, ``layer1``
.. ``layerN``: the model's hidden states (``output_hidden_states``) in the order the seed
paper (Ding, Denain & Steinhardt 2021) compares them; a module path of the model (such as
``encoder.layer.0.attention``) is a unit too, captured with a forward hook.

Inputs are tokenized once, right-padded to the longest example, and carry one id per example,
``"<index>:<digest of its token ids>"``. The ids become the store's row ids, so the row
fingerprint says which tokens the rows are: two checkpoints whose tokenizers disagree on the
inputs cannot be put in one store.
"""

from __future__ import annotations

import difflib
import hashlib
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from repscope.errors import InputError, NotFoundError
from repscope.store import layout
from repscope.store.activation_store import ActivationStore, UnitInfo
from repscope.store.capture import (
    CAPTURE_SHARD_BYTES,
    Hooks,
    UnitStreams,
    check_pool,
    require,
    trim,
)
from repscope.store.validate import where

WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
# A tokenizer's model_max_length above this means "no limit" (transformers' sentinel is 1e30).
_NO_LIMIT = 1 << 24


def hidden_state_units(layers: int) -> list[str]:
    """Unit names of the N + 1 hidden states: embeddings, layer1 .. layerN."""
    return ["embeddings"] + [f"layer{i}" for i in range(1, layers + 1)]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars and warnings off while we load (we report ourselves)."""
    logging = require("transformers").utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


# -- checkpoints --------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint folder holds, read from its config (no weights loaded)."""

    model: str  # the model name in the store
    path: str
    model_type: str
    layers: int  # transformer layers: hidden states are layers + 1
    max_positions: int | None  # longest input the model takes (None: no limit known)
    vocab_size: int | None
    hidden_size: int | None
    modules: frozenset[str] = field(repr=False)

    @property
    def units(self) -> list[str]:
        return hidden_state_units(self.layers)

    def check_units(self, units: list[str]) -> list[str]:
        """``units`` if each is a hidden state or a module path of this model; else one line
        naming the unit and the ones that exist."""
        known = self.units
        for unit in units:
            if unit not in known and unit not in self.modules:
                listed = f"{known[0]}, {known[1]} .. {known[-1]}" if len(known) > 3 else (
                    ", ".join(known))
                close = difflib.get_close_matches(unit, known + sorted(self.modules), n=3)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                # A module of a layer (encoder.layer.0, h.0.attn) says what a path looks like.
                example = min(self.modules, default="",
                              key=lambda name: (name.count(".") != 2, len(name), name))
                raise InputError(
                    f"{where(self.model, unit)}: no such layer in checkpoint {self.path}: its "
                    f"layers are {listed}, or a module path such as {example!r}{hint}"
                )
        return units


def _int_attr(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def inspect_checkpoint(path: str | Path, model: str) -> Checkpoint:
    """Read a checkpoint folder's config and module tree, refusing what is not a model."""
    transformers = require("transformers")
    torch = require("torch")
    folder = Path(path).expanduser()
    ctx = f"{where(model)} (checkpoint {folder})"
    if not folder.is_dir():
        raise NotFoundError(f"{ctx}: no such folder")
    if not (folder / "config.json").is_file():
        raise InputError(f"{ctx}: not a Hugging Face checkpoint: no config.json (expected a "
                         "folder written by save_pretrained)")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHTS):
        raise InputError(f"{ctx}: no weights (*.safetensors or pytorch_model.bin) in the folder")
    try:
        with quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
            with torch.device("meta"):  # the module tree only: no memory, no weights
                skeleton = transformers.AutoModel.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{ctx}: not a model transformers can load: {first}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise InputError(f"{ctx}: {config.model_type} is an encoder-decoder model; capture "
                         "supports encoder-only and decoder-only models")
    layers = _int_attr(config, "num_hidden_layers", "n_layer", "num_layers")
    if layers is None:
        raise InputError(f"{ctx}: config.json gives no layer count (num_hidden_layers)")
    return Checkpoint(
        model=model,
        path=str(folder),
        model_type=str(config.model_type),
        layers=layers,
        max_positions=_int_attr(config, "max_position_embeddings", "n_positions"),
        vocab_size=_int_attr(config, "vocab_size"),
        hidden_size=_int_attr(config, "hidden_size", "n_embd", "d_model"),
        modules=frozenset(name for name, _ in skeleton.named_modules() if name),
    )


def checkpoint_digest(path: str | Path) -> str:
    """Hex digest of a checkpoint's config and weight files (names and bytes)."""
    folder = Path(path).expanduser()
    files = sorted({p for pattern in ("config.json", *WEIGHTS) for p in folder.glob(pattern)})
    h = hashlib.blake2b(digest_size=16)
    for file in files:
        h.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as fp:
            while chunk := fp.read(8 << 20):
                h.update(chunk)
    return h.hexdigest()


# The files a tokenizer is made of (tokenizer.json, vocab.txt, merges.txt, spiece.model ...).
TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges*", "special_tokens*", "added_tokens*",
                   "spiece*", "sentencepiece*")


def tokenizer_digest(path: str | Path) -> str:
    """Hex digest of a checkpoint's tokenizer files: equal digests tokenize alike."""
    folder = Path(path).expanduser()
    h = hashlib.blake2b(digest_size=16)
    for file in sorted({p for pattern in TOKENIZER_FILES for p in folder.glob(pattern)}):
        h.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return h.hexdigest()


def load_model(checkpoint: Checkpoint, device: Any) -> Any:
    """The checkpoint's model with its weights, float32, in eval mode, on ``device``."""
    transformers = require("transformers")
    torch = require("torch")
    try:
        with quiet_transformers():
            model = transformers.AutoModel.from_pretrained(
                checkpoint.path, local_files_only=True, dtype=torch.float32
            )
    except Exception as exc:  # safetensors, torch and transformers each raise their own
        first = (str(exc).splitlines() or [""])[0]
        raise InputError(f"{where(checkpoint.model)} (checkpoint {checkpoint.path}): cannot "
                         f"load its weights: {type(exc).__name__}: {first}") from None
    return model.to(device).eval()


def load_tokenizer(checkpoint: Checkpoint) -> Any:
    transformers = require("transformers")
    try:
        with quiet_transformers():
            return transformers.AutoTokenizer.from_pretrained(
                checkpoint.path, local_files_only=True
            )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{where(checkpoint.model)} (checkpoint {checkpoint.path}): no "
                         f"tokenizer for text input ({first}); give --ids instead") from None


def resolve_device(device: str) -> Any:
    """``auto`` (CUDA when visible, else CPU), ``cpu`` or ``cuda`` as a torch device."""
    torch = require("torch")
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda: no CUDA device is visible to torch; use --device cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


# -- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenInputs:
    """Tokenized inputs: (examples, tokens) ``input_ids`` right-padded, ``keep`` (True at
    real positions: the attention mask), optional ``token_type_ids``; ``lines`` the source
    line of each example (1-based; None for pre-tokenized input)."""

    input_ids: np.ndarray
    keep: np.ndarray
    source: str
    token_type_ids: np.ndarray | None = None
    lines: np.ndarray | None = None

    @property
    def examples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.keep.sum())

    @property
    def longest(self) -> int:
        return int(self.keep.sum(axis=1).max())

    def name(self, example: int) -> str:
        """How messages name an example: its line in the text file, or its index."""
        if self.lines is not None:
            return f"line {int(self.lines[example])} of {self.source}"
        return f"example {example} of {self.source}"

    @cached_property
    def example_ids(self) -> np.ndarray:
        """One id per example: ``"<index>:<16 hex digits of its token ids>"``."""
        ids = []
        for i in range(self.examples):
            tokens = np.ascontiguousarray(self.input_ids[i][self.keep[i]], dtype="<i8")
            ids.append(f"{i}:{hashlib.blake2b(tokens.tobytes(), digest_size=8).hexdigest()}")
        return np.array(ids)

    @cached_property
    def digest(self) -> str:
        """Hex digest of the token ids, masks and token types: same digest, same inputs."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.input_ids.shape}\n".encode())
        h.update(np.where(self.keep, self.input_ids, -1).astype("<i8").tobytes())
        if self.token_type_ids is not None:
            h.update(np.where(self.keep, self.token_type_ids, -1).astype("<i8").tobytes())
        return h.hexdigest()

    def rows(self, pool: str) -> int:
        """Rows of every unit: one per kept token (pool none) or one per example."""
        return self.tokens if pool == "none" else self.examples

    def row_fingerprint(self, pool: str) -> str:
        """The store's row fingerprint once these inputs are captured with ``pool``."""
        if pool != "none":
            return layout.row_fingerprint(self.examples, self.example_ids)
        mask = ~trim(self.keep)  # as the writer records it: no all-padding columns at the end
        example = np.repeat(np.arange(self.examples, dtype=np.int64), self.keep.sum(axis=1))
        return layout.row_fingerprint(self.tokens, self.example_ids, example, mask)

    def first_difference(self, other: TokenInputs) -> str:
        """Where two tokenizations of the same text first differ, for messages."""
        if self.examples != other.examples:
            return f"{self.examples} examples against {other.examples}"
        for i in range(self.examples):
            a, b = self.input_ids[i][self.keep[i]], other.input_ids[i][other.keep[i]]
            if a.shape != b.shape or not np.array_equal(a, b):
                return f"{self.name(i)}: {a.size} tokens against {b.size}" if (
                    a.size != b.size) else f"{self.name(i)}: different token ids"
        return "same token ids, different token types"

    def batches(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """(input_ids, keep, token_type_ids) of ``size`` examples at a time, each trimmed to
        its longest example."""
        for start in range(0, self.examples, size):
            keep = self.keep[start : start + size]
            width = int(np.flatnonzero(keep.any(axis=0))[-1]) + 1
            types = self.token_type_ids
            yield (
                self.input_ids[start : start + size, :width],
                keep[:, :width],
                None if types is None else types[start : start + size, :width],
            )


def read_text(path: str | Path) -> tuple[list[str], np.ndarray]:
    """The examples of a text file (one per line; blank lines are skipped) and their lines."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise NotFoundError(f"text file not found: {file}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"text file {file} is not UTF-8 (byte {exc.start})") from None
    examples, lines = [], []
    # Lines end at "\n" only: splitlines() would also split at form feeds and U+2028, and
    # then example numbers would not be the lines an editor shows.
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if line.strip():
            examples.append(line)
            lines.append(number)
    if not examples:
        raise InputError(f"text file {file} holds no examples (one example per line)")
    return examples, np.array(lines, dtype=np.int64)


_TOKENIZE_CHUNK = 8192  # examples tokenized at a time: Python lists of ints are ~30 B a token


def tokenize(
    tokenizer: Any,
    texts: list[str],
    lines: np.ndarray,
    source: str,
    max_length: int,
    warn: Callable[[str], None] | None = None,
) -> TokenInputs:
    """Tokenize ``texts`` (special tokens added), truncating what is longer than
    ``max_length`` tokens with one warning that says how many and which first."""
    chunks, truncated = [], []
    with quiet_transformers():
        for start in range(0, len(texts), _TOKENIZE_CHUNK):
            part = texts[start : start + _TOKENIZE_CHUNK]
            encoded = tokenizer(part, add_special_tokens=True, truncation=False)["input_ids"]
            long = [i for i, ids in enumerate(encoded) if len(ids) > max_length]
            if long:
                truncated += [(start + i, len(encoded[i])) for i in long]
                again = tokenizer([part[i] for i in long], add_special_tokens=True,
                                  truncation=True, max_length=max_length)["input_ids"]
                for i, ids in zip(long, again, strict=True):
                    encoded[i] = ids
            chunks.append(_padded(encoded, getattr(tokenizer, "pad_token_id", None) or 0,
                                  lines[start : start + _TOKENIZE_CHUNK], source))
    if truncated:
        first, length = truncated[0]
        message = (f"{len(truncated)} of {len(texts)} examples of {source} are longer than "
                   f"{max_length} tokens and were truncated (first: line {lines[first]}, "
                   f"{length} tokens)")
        (warn or (lambda text: warnings.warn(text, stacklevel=3)))(message)
    width = max(ids.shape[1] for ids, _ in chunks)
    input_ids = np.zeros((len(texts), width), dtype=np.int64)
    keep = np.zeros((len(texts), width), dtype=bool)
    start = 0
    for ids, kept in chunks:
        input_ids[start : start + len(ids), : ids.shape[1]] = ids
        keep[start : start + len(ids), : ids.shape[1]] = kept
        start += len(ids)
    return TokenInputs(input_ids, keep, source, lines=lines)


def _padded(encoded: list[list[int]], pad: int, lines: np.ndarray, source: str):
    """(input_ids, keep) arrays of token lists, right-padded to the longest."""
    width = max(len(ids) for ids in encoded)
    input_ids = np.full((len(encoded), width), pad, dtype=np.int64)
    keep = np.zeros((len(encoded), width), dtype=bool)
    for i, ids in enumerate(encoded):
        if not ids:
            raise InputError(f"line {lines[i]} of {source}: the tokenizer gives no tokens")
        input_ids[i, : len(ids)] = ids
        keep[i, : len(ids)] = True
    return input_ids, keep


def read_ids(path: str | Path) -> TokenInputs:
    """Pre-tokenized inputs from an .npz: ``input_ids`` (examples, tokens) integers, and
    optionally ``attention_mask`` (1 = a real position; default all) and ``token_type_ids``."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise NotFoundError(f"ids file not found: {file}")
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise InputError(f"ids file {file}: not a readable .npz file: {exc}") from None
    if "input_ids" not in arrays:
        raise InputError(f"ids file {file}: no 'input_ids' array (keys: "
                         f"{', '.join(arrays) or 'none'})")
    ids = arrays["input_ids"]
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or 0 in ids.shape:
        raise InputError(f"ids file {file}: input_ids must be a non-empty (examples, tokens) "
                         f"integer array, got {ids.dtype} of shape {ids.shape}")
    keep = np.ones(ids.shape, bool)
    if "attention_mask" in arrays:
        mask = arrays["attention_mask"]
        if mask.shape != ids.shape or not np.isin(mask, (0, 1)).all():
            raise InputError(f"ids file {file}: attention_mask must be 0/1 of the shape of "
                             f"input_ids {ids.shape}, got {mask.dtype} of shape {mask.shape}")
        keep = mask.astype(bool)
        empty = np.flatnonzero(~keep.any(axis=1))
        if empty.size:
            raise InputError(f"ids file {file}: attention_mask keeps no token of example "
                             f"{int(empty[0])} ({empty.size} such examples)")
    types = arrays.get("token_type_ids")
    if types is not None and types.shape != ids.shape:
        raise InputError(f"ids file {file}: token_type_ids has shape {types.shape}, expected "
                         f"{ids.shape}")
    return TokenInputs(ids.astype(np.int64), keep, str(file),
                       None if types is None else types.astype(np.int64))


def check_inputs(checkpoint: Checkpoint, inputs: TokenInputs) -> None:
    """Refuse inputs the model cannot take: ids past its vocabulary, too many tokens."""
    ctx = f"{where(checkpoint.model)} (checkpoint {checkpoint.path})"
    if checkpoint.vocab_size is not None:
        high = int(np.where(inputs.keep, inputs.input_ids, 0).max())
        if high >= checkpoint.vocab_size or int(inputs.input_ids[inputs.keep].min()) < 0:
            raise InputError(f"{ctx}: {inputs.source} has token ids up to {high}, but the "
                             f"vocabulary has {checkpoint.vocab_size} tokens")
    limit = checkpoint.max_positions
    if limit is not None and inputs.longest > limit:
        longest = int(np.argmax(inputs.keep.sum(axis=1)))
        raise InputError(f"{ctx}: {inputs.name(longest)} has {inputs.longest} tokens; the model "
                         f"takes at most {limit}: shorten the inputs")


def max_length_for(checkpoint: Checkpoint, tokenizer: Any | None) -> int | None:
    """The longest input the model and its tokenizer take (None: no limit known)."""
    limits = [checkpoint.max_positions]
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and tokenizer_limit < _NO_LIMIT:
        limits.append(tokenizer_limit)
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


# -- capture ------------------------------------------------------------------------------


def capture_hidden_states(
    model: Any,
    checkpoint: Checkpoint,
    inputs: TokenInputs,
    store: ActivationStore,
    units: list[str],
    *,
    pool: str = "none",
    batch_size: int = 32,
    dtype: str = "float32",
    attributes: Mapping[str, Mapping] | None = None,
    overwrite: bool = False,
    shard_bytes: int = CAPTURE_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> list[UnitInfo]:
    """Run ``model`` (loaded from ``checkpoint``) on ``inputs`` and store ``units``.

    Hidden-state units (embeddings, layer1 ..) come from ``output_hidden_states``; module
    paths from forward hooks. Rows as in :mod:`repscope.store.capture`; the row ids are
    ``inputs.example_ids``. ``progress(examples, rows)`` after each batch.
    """
    torch = require("torch")
    pool = check_pool(pool)
    checkpoint.check_units(units)
    hidden = {unit: i for i, unit in enumerate(checkpoint.units) if unit in units}
    hooked = {unit: unit for unit in units if unit not in hidden}
    device = next(model.parameters()).device
    streams = UnitStreams(
        store, checkpoint.model, units, pool=pool, dtype=dtype,
        example_ids=inputs.example_ids, rows=inputs.rows(pool), attributes=attributes,
        overwrite=overwrite, shard_bytes=shard_bytes,
    )
    try:
        with Hooks(model, hooked, checkpoint.model) as hooks, torch.inference_mode():
            for ids, keep, types in inputs.batches(batch_size):
                kwargs = {
                    "input_ids": torch.from_numpy(ids).to(device),
                    "attention_mask": torch.from_numpy(keep.astype(np.int64)).to(device),
                }
                if types is not None:
                    kwargs["token_type_ids"] = torch.from_numpy(types).to(device)
                out = model(**kwargs, output_hidden_states=bool(hidden), return_dict=True)
                outputs = hooks.take() if hooked else {}
                if hidden:
                    states = out.hidden_states
                    outputs.update({unit: states[i] for unit, i in hidden.items()})
                rows = streams.add(outputs, keep)
                if progress is not None:
                    progress(ids.shape[0], rows)
        return streams.close()
    except BaseException:
        streams.abort()
        raise
