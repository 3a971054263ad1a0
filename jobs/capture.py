"""`repscope capture`: checkpoints to an activation store, one Ray task per checkpoint.

The command line or a capture spec (jobs/capture_spec.py) names the store, the checkpoints
and the inputs. Everything is checked on the driver before any work: every checkpoint is a
model, the inputs are not empty, every layer exists, every tokenizer gives the same tokens
(else rows would not align), the store's rows match. Each unit records its checkpoint and
inputs digests (unit attribute ``capture``); a rerun skips units complete for the same
checkpoint, inputs and pool, and captures the rest. Two or more checkpoints run as Ray tasks
(one GPU each when the cluster has GPUs; on the embedded default one or two at a time, by
memory); a failed checkpoint is reported and the others' units are kept. The work of one
checkpoint (:func:`capture_checkpoint`) is plain code, run in this process or as a task.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from repscope import __version__
from repscope.errors import InputError, NotFoundError, RepscopeError
from repscope.jobs.capture_spec import DEVICES, CaptureSpec, load_capture_spec, spec_from_dict
from repscope.store.activation_store import ActivationStore
from repscope.store.capture import POOLS, check_pool
from repscope.store.cli import parse_storage_options, storage_option_arg
from repscope.store.layout import STORAGE_DTYPES, format_bytes
from repscope.store.validate import where

TASK_RETRIES = 1  # a worker lost to a node failure or OOM kill; our own errors never retry


# -- planning: everything checked before any work -------------------------------------------


@dataclass(frozen=True)
class CheckpointTask:
    """One checkpoint's capture, everything a Ray task needs (plain data)."""

    checkpoint: Any  # repscope.store.hf.Checkpoint
    inputs: Any  # repscope.store.hf.TokenInputs
    units: tuple[str, ...]
    attributes: dict[str, dict]
    pool: str
    batch_size: int
    dtype: str
    device: str
    memory: int  # bytes the task is expected to hold at most
    threads: int | None = None


@dataclass
class Plan:
    store: ActivationStore | None  # None: no store yet (created when the work starts)
    tasks: list[CheckpointTask]
    skipped: list[str]  # models whose units are all complete for the same checkpoint + inputs


def _provenance(digest: str, inputs: Any, pool: str, unit: str, hidden: list[str]) -> dict:
    source = f"hidden_states[{hidden.index(unit)}]" if unit in hidden else f"module {unit}"
    return {"capture": {"checkpoint": digest, "inputs": inputs.digest, "pool": pool,
                        "output": source, "repscope": __version__}}


def _differs(recorded: dict | None, wanted: dict) -> str | None:
    """Why a complete unit is not the one this capture would write (None: it is)."""
    if not recorded:
        return "was not written by capture"
    for key, what in (("checkpoint", "another checkpoint"), ("inputs", "other inputs"),
                      ("pool", f"pool {recorded.get('pool')!r}"), ("output", "another output")):
        if recorded.get(key) != wanted[key]:
            return f"was captured from {what}"
    return None


def _open_store(spec: CaptureSpec) -> ActivationStore | None:
    try:
        return ActivationStore.open(spec.store, spec.storage_options or None)
    except NotFoundError:
        return None


def _memory_estimate(checkpoint: Any, inputs: Any, units: int, spec: CaptureSpec) -> int:
    """Bytes a checkpoint's task holds at most: weights (twice, while they load), one batch
    of outputs (a few copies), one shard buffer per unit, and the runtime."""
    from repscope.store.capture import CAPTURE_SHARD_BYTES
    from repscope.store.hf import WEIGHTS

    folder = Path(checkpoint.path)
    weights = sum(p.stat().st_size for pattern in WEIGHTS for p in folder.glob(pattern))
    width = checkpoint.hidden_size or 1024
    batch = spec.batch_size * inputs.input_ids.shape[1] * width * 4 * (checkpoint.layers + 1)
    shard = min(CAPTURE_SHARD_BYTES, inputs.rows(spec.pool) * width * 4)
    return 2 * weights + 4 * batch + units * shard + (1 << 30)


def _max_length(spec: CaptureSpec, checkpoints: list, tokenizers: dict) -> int | None:
    """Tokens per example: the spec's, or the shortest maximum of the checkpoints."""
    from repscope.store import hf

    limits = {c.model: hf.max_length_for(c, tokenizers.get(c.model)) for c in checkpoints}
    for c in checkpoints:
        limit = limits[c.model]
        if spec.max_length is not None and limit is not None and spec.max_length > limit:
            raise InputError(f"{where(c.model)} (checkpoint {c.path}): max_length "
                             f"{spec.max_length} is longer than the {limit} tokens it takes")
    known = [limit for limit in limits.values() if limit is not None]
    return spec.max_length or (min(known) if known else None)


def _inputs(spec: CaptureSpec, checkpoints: list, warn) -> dict[str, Any]:
    """{model: TokenInputs}: the text tokenized once per distinct tokenizer, or the ids."""
    from repscope.store import hf

    if spec.ids:
        _max_length(spec, checkpoints, {})  # refuses a max_length longer than a model takes
        shared = hf.read_ids(spec.ids)
        if spec.max_length is not None and shared.longest > spec.max_length:
            raise InputError(f"{shared.source}: examples have up to {shared.longest} tokens, "
                             f"longer than max_length {spec.max_length}: shorten them")
        return {c.model: shared for c in checkpoints}
    tokenizers = {c.model: hf.load_tokenizer(c) for c in checkpoints}
    max_length = _max_length(spec, checkpoints, tokenizers)
    texts, lines = hf.read_text(spec.text)
    warned: set[str] = set()

    def warn_once(text: str) -> None:
        if text not in warned:
            warned.add(text)
            warn(text)

    by_tokenizer: dict[str, Any] = {}
    inputs = {}
    for c in checkpoints:
        key = hf.tokenizer_digest(c.path)
        if key not in by_tokenizer:
            by_tokenizer[key] = hf.tokenize(tokenizers[c.model], texts, lines, spec.text,
                                            max_length or (1 << 62), warn_once)
        inputs[c.model] = by_tokenizer[key]
    return inputs


def _check_rows(spec: CaptureSpec, checkpoints: list, inputs: dict,
                store: ActivationStore | None) -> None:
    """Every checkpoint's tokens the same, and the same rows as the store's units."""
    first = checkpoints[0]
    rows = inputs[first.model].row_fingerprint(spec.pool)
    for c in checkpoints[1:]:
        if inputs[c.model].row_fingerprint(spec.pool) != rows:
            difference = inputs[c.model].first_difference(inputs[first.model])
            raise InputError(
                f"{where(c.model)} (checkpoint {c.path}): its tokenizer gives other tokens "
                f"than that of {first.model!r} ({difference}): rows would not align; capture "
                "it into another store"
            )
    if store is not None and store.units() and store.row_fingerprint != rows:
        raise InputError(
            f"{where(first.model)}: these inputs ({spec.text or spec.ids}, pool {spec.pool}) give "
            f"other rows than the store's units (row fingerprint {rows[:12]} against "
            f"{str(store.row_fingerprint)[:12]}): they were captured from other inputs, another "
            "tokenizer or pool; capture into another store"
        )


def _todo(store: ActivationStore | None, checkpoint: Any, units: list[str], inputs: Any,
          spec: CaptureSpec, overwrite: bool) -> dict[str, dict]:
    """{unit: attributes to record} for the units of a checkpoint that need capturing:
    absent or incomplete, or complete from another checkpoint or inputs (with overwrite)."""
    from repscope.store import hf

    digest = hf.checkpoint_digest(checkpoint.path)
    existing = set(store.units()) if store is not None else set()
    todo = {}
    for unit in units:
        wanted = _provenance(digest, inputs, spec.pool, unit, checkpoint.units)
        if (checkpoint.model, unit) in existing:
            info = store.unit_info(checkpoint.model, unit)
            why = _differs(store.unit_attributes(checkpoint.model, unit).get("capture"),
                           wanted["capture"])
            if why is None and info.dtype != spec.dtype:
                why = f"is stored as {info.dtype}"
            if why is None:
                continue  # complete, same checkpoint and inputs: nothing to do
            if not overwrite:
                raise InputError(f"{where(checkpoint.model, unit)}: unit already exists in "
                                 f"store {store.url} and {why}; pass --overwrite to replace it")
        todo[unit] = wanted
    return todo


def plan_capture(spec: CaptureSpec, *, overwrite: bool = False, warn=None) -> Plan:
    """Check everything and decide what each checkpoint captures; nothing is written."""
    from repscope.store import hf

    warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr))
    check_pool(spec.pool)
    checkpoints = [hf.inspect_checkpoint(path, model) for model, path in spec.checkpoints]
    units = {c.model: c.check_units(list(spec.layers or c.units)) for c in checkpoints}
    inputs = _inputs(spec, checkpoints, warn)
    for c in checkpoints:
        hf.check_inputs(c, inputs[c.model])
    store = _open_store(spec)
    _check_rows(spec, checkpoints, inputs, store)
    tasks, skipped = [], []
    for c in checkpoints:
        todo = _todo(store, c, units[c.model], inputs[c.model], spec, overwrite)
        if not todo:
            skipped.append(c.model)
            continue
        tasks.append(CheckpointTask(
            checkpoint=c, inputs=inputs[c.model], units=tuple(todo), attributes=todo,
            pool=spec.pool, batch_size=spec.batch_size, dtype=spec.dtype, device=spec.device,
            memory=_memory_estimate(c, inputs[c.model], len(todo), spec),
        ))
    return Plan(store=store, tasks=tasks, skipped=skipped)


# -- the work of one checkpoint: plain code, run in-process or as a Ray task -------------------


def capture_checkpoint(
    store: ActivationStore, task: CheckpointTask, inputs: Any = None, progress=None
) -> dict:
    """Load one checkpoint and capture its units into ``store``; returns a summary dict.

    ``inputs`` replaces ``task.inputs`` (Ray tasks get them from the object store, put once
    for every checkpoint that shares them); ``progress(examples, rows)`` after each batch."""
    from repscope.store import hf
    from repscope.store.capture import require

    torch = require("torch")
    if task.threads:
        torch.set_num_threads(task.threads)
    device = hf.resolve_device(task.device)
    start = time.perf_counter()
    model = hf.load_model(task.checkpoint, device)
    loaded = time.perf_counter()
    inputs = task.inputs if inputs is None else inputs
    infos = hf.capture_hidden_states(
        model, task.checkpoint, inputs, store, list(task.units), pool=task.pool,
        batch_size=task.batch_size, dtype=task.dtype, attributes=task.attributes,
        overwrite=True,  # planning decided which complete units may be replaced
        progress=progress,
    )
    seconds = time.perf_counter() - loaded
    return {
        "model": task.checkpoint.model,
        "checkpoint": task.checkpoint.path,
        "units": [info.layer for info in infos],
        "rows": infos[0].rows,
        "tokens": inputs.tokens,
        "bytes": sum(info.nbytes for info in infos),
        "load_seconds": round(loaded - start, 3),
        "seconds": round(seconds, 3),
        "tokens_per_second": round(inputs.tokens / seconds, 1) if seconds > 0 else None,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


@functools.cache
def _remote_capture():
    import ray

    return ray.remote(max_retries=TASK_RETRIES)(capture_checkpoint)


def _failure(exc: BaseException) -> str:
    """One line for a checkpoint that failed: our own message, or the error's first line."""
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        if isinstance(cause, RepscopeError):
            return str(cause)
        if cause is not None:
            exc = cause
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"


def _run_on_ray(plan: Plan, address: str | None, out: TextIO) -> tuple[list[dict], dict]:
    """One Ray task per checkpoint; returns (results, {model: failure})."""
    import ray

    from repscope.cluster.execute import connect

    cpus = connect(address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    embedded = not (address or os.environ.get("RAY_ADDRESS"))
    if gpus:
        options = {"num_gpus": 1, "num_cpus": 1}
        threads = None
    else:
        # Two at a time when two fit in memory, else one: each task gets its share of CPUs.
        memory = ray.available_resources().get("memory", 0)
        largest = max(task.memory for task in plan.tasks)
        parallel = 2 if embedded and len(plan.tasks) > 1 and 2 * largest <= memory else 1
        if not embedded:
            parallel = max(1, min(len(plan.tasks), cpus // 2))
        largest_node = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes()
                            if n.get("Alive")), default=1)
        threads = max(1, min(largest_node, cpus // parallel))
        options = {"num_cpus": threads}
    remote = _remote_capture()
    store_ref = ray.put(plan.store)
    inputs_refs: dict[int, Any] = {}  # checkpoints that share a tokenizer share their inputs
    refs = {}
    for task in plan.tasks:
        key = id(task.inputs)
        if key not in inputs_refs:
            inputs_refs[key] = ray.put(task.inputs)
        light = dataclasses.replace(task, threads=threads, inputs=None)
        ref = remote.options(**options).remote(store_ref, light, inputs_refs[key])
        refs[ref] = task.checkpoint.model
    results, failures = [], {}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        model = refs[done[0]]
        try:
            result = ray.get(done[0])
        except Exception as exc:  # a failed checkpoint must not lose the others
            failures[model] = _failure(exc)
            print(f"{model}: failed: {failures[model]}", file=out, flush=True)
            continue
        results.append(result)
        _report(result, out)
    return results, failures


def _report(result: dict, out: TextIO) -> None:
    print(f"{result['model']}: {_count(len(result['units']), 'unit')} x {result['rows']:,} rows "
          f"({format_bytes(result['bytes'])}) in {result['seconds']:.1f} s after "
          f"{result['load_seconds']:.1f} s loading, {result['tokens_per_second'] or 0:,.0f} "
          f"tokens/s on {result['device']}", file=out, flush=True)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def run_capture(
    spec: CaptureSpec,
    *,
    address: str | None = None,
    overwrite: bool = False,
    out: TextIO | None = None,
) -> dict:
    """Plan, then capture every checkpoint that has work; returns a summary dict with
    ``captured`` (one dict per checkpoint), ``skipped`` and ``failed`` ({model: reason})."""
    out = out or sys.stderr
    start = time.perf_counter()
    local = not (address or os.environ.get("RAY_ADDRESS"))
    if local:
        from repscope.store.hf import resolve_device

        resolve_device(spec.device)  # a cluster's tasks check their own devices
    plan = plan_capture(spec, overwrite=overwrite)
    if plan.store is None and plan.tasks:
        plan.store = ActivationStore.create(spec.store, spec.storage_options or None)
    for model in plan.skipped:
        print(f"{model}: skipped, every unit is complete for the same checkpoint and inputs",
              file=out, flush=True)
    results: list[dict] = []
    failures: dict[str, str] = {}
    if len(plan.tasks) == 1 and local:
        # One checkpoint here: in this process, with a live progress bar.
        from repscope.jobs.progress import Progress

        task = plan.tasks[0]
        bar = Progress(task.inputs.examples, label=f"capture {task.checkpoint.model}",
                       stream=out, unit="examples")
        try:
            results.append(capture_checkpoint(plan.store, task,
                                              progress=lambda n, rows: bar(n)))
        finally:
            bar.close()
        _report(results[0], out)
    elif plan.tasks:
        results, failures = _run_on_ray(plan, address, out)
    return {
        "store": plan.store.url if plan.store is not None else spec.store,
        "captured": results,
        "skipped": plan.skipped,
        "failed": failures,
        "seconds": round(time.perf_counter() - start, 3),
    }


# -- submission to a cluster ---------------------------------------------------------------


def prepare_submission(spec_path: str | Path, workdir: Path, *, overwrite: bool = False) -> str:
    """Put a capture spec (and its local inputs file) in ``workdir`` for the Ray Jobs API;
    returns the entrypoint. The store and checkpoint paths are kept as the spec resolves
    them: they must be reachable from the cluster (a shared filesystem or a store URL)."""
    spec = load_capture_spec(spec_path)
    inputs = Path(spec.text or spec.ids)
    if not inputs.is_file():
        raise NotFoundError(f"inputs file not found: {inputs}")
    shutil.copyfile(inputs, workdir / inputs.name)
    raw = {
        "store": spec.store,
        "checkpoints": dict(spec.checkpoints),
        ("text" if spec.text else "ids"): inputs.name,
        "pool": spec.pool, "batch_size": spec.batch_size, "device": spec.device,
        "dtype": spec.dtype, "storage_options": spec.storage_options,
    }
    if spec.layers is not None:
        raw["layers"] = list(spec.layers)
    if spec.max_length is not None:
        raw["max_length"] = spec.max_length
    (workdir / "capture.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return "repscope capture --spec capture.yaml --json" + (" --overwrite" if overwrite else "")


# -- the command line ------------------------------------------------------------------------


def spec_from_args(args) -> CaptureSpec:
    """The capture spec that ``repscope capture`` arguments describe."""
    given = [name for name in ("store", "model", "hf", "text", "ids", "layers", "pool",
                               "max_length", "batch_size", "device", "dtype")
             if getattr(args, name) not in (None, [])]
    if args.spec:
        if given or args.storage_option:
            flag = given[0].replace("_", "-") if given else "storage-option"
            raise InputError(f"--spec describes the whole capture; {flag} goes into the spec")
        return load_capture_spec(args.spec)
    if not args.store or not args.hf:
        raise InputError("give STORE and --hf CHECKPOINT_DIR (or --spec FILE)")
    if args.model is not None and len(args.hf) > 1:
        raise InputError(f"MODEL names one checkpoint, but --hf is given {len(args.hf)} times; "
                         "name each with --hf NAME=DIR instead")
    checkpoints = {}
    for item in args.hf:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = args.model or Path(item).expanduser().resolve().name, item
        checkpoints[name] = path
    if len(checkpoints) != len(args.hf):
        raise InputError("two --hf checkpoints have the same model name; name them NAME=DIR")
    raw = {"store": args.store, "checkpoints": checkpoints, "text": args.text, "ids": args.ids,
           "storage_options": parse_storage_options(args.storage_option)}
    if args.layers:
        raw["layers"] = [name.strip() for name in args.layers.split(",") if name.strip()]
    for name in ("pool", "max_length", "batch_size", "device", "dtype"):
        if getattr(args, name) is not None:
            raw[name] = getattr(args, name)
    return spec_from_dict({k: v for k, v in raw.items() if v is not None}, "command line")


def _cmd_capture(args) -> int:
    spec = spec_from_args(args)
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # Ray prints cluster events to stdout: keep it for the summary
    try:
        summary = run_capture(spec, address=args.address, overwrite=args.overwrite)
    finally:
        ray = sys.modules.get("ray")  # imported only when checkpoints ran as tasks
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        sys.stdout = real_stdout
    if args.json:
        print(json.dumps(summary))
    else:
        units = sum(len(r["units"]) for r in summary["captured"])
        print(f"done: {_count(len(summary['captured']), 'checkpoint')} captured "
              f"({_count(units, 'unit')}), {len(summary['skipped'])} skipped, "
              f"{len(summary['failed'])} failed, {summary['seconds']:.1f} s -> {summary['store']}")
    if summary["failed"]:
        model, reason = next(iter(summary["failed"].items()))
        raise RepscopeError(
            f"{len(summary['failed'])} of {len(spec.checkpoints)} checkpoints failed "
            f"(first: {model}: {reason}); the others' units are in the store, and a rerun "
            "captures only what is missing"
        )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "capture",
        help="run Hugging Face checkpoints on inputs and store their hidden states",
        description="Capture the hidden states (embeddings, layer1 .. layerN) of local "
        "Hugging Face checkpoints on one set of inputs into a store (created if missing). "
        "Several checkpoints run as Ray tasks; a rerun skips units already complete for the "
        "same checkpoint and inputs.",
    )
    p.add_argument("store", nargs="?", metavar="STORE", help="store URL: path, s3://, gs://")
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="model name (one --hf; default: the checkpoint folder's name)")
    p.add_argument("--hf", action="append", default=[], metavar="[NAME=]DIR",
                   help="checkpoint folder written by save_pretrained; repeatable")
    p.add_argument("--spec", help="capture spec (YAML) instead of STORE, MODEL and --hf")
    p.add_argument("--text", help="inputs: a UTF-8 text file, one example per line")
    p.add_argument("--ids", help="inputs: an .npz of input_ids, attention_mask "
                   "(optional) and token_type_ids (optional), (examples, tokens) each")
    p.add_argument("--layers", help="comma-separated units (default: every hidden state): "
                   "embeddings, layer1 .., or module paths")
    p.add_argument("--pool", choices=POOLS, help="none: a row per token (default); mean, "
                   "first, last: a row per example")
    p.add_argument("--max-length", type=int, help="tokens per example; longer text is "
                   "truncated with a warning (default: the model's maximum)")
    p.add_argument("--batch-size", type=int, help="examples per forward pass (default 32)")
    p.add_argument("--device", choices=DEVICES, help="default auto: CUDA when visible")
    p.add_argument("--dtype", choices=STORAGE_DTYPES, help="storage dtype (default float32)")
    p.add_argument("--address", help="Ray cluster (HOST:6379 or ray://...; default "
                   "RAY_ADDRESS, else an embedded local instance for several checkpoints)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace units captured from another checkpoint or inputs")
    p.add_argument("--json", action="store_true", help="last line of stdout: a JSON summary")
    storage_option_arg(p)
    p.set_defaults(func=_cmd_capture)
