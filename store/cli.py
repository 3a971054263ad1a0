"""``repscope ingest`` and ``repscope inspect``: the store's subcommands.

Registered by jobs/cli.py through :func:`register`; errors are raised as RepscopeError and
printed there as one line (exit code 2 for bad input), never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from repscope.errors import InputError
from repscope.store.activation_store import ActivationStore
from repscope.store.hints import cli_spelling
from repscope.store.ingest import ingest_path
from repscope.store.layout import STORAGE_DTYPES, format_bytes


def register(subparsers: Any) -> None:
    """Add the ``ingest`` and ``inspect`` subcommands to ``subparsers``."""
    ingest = subparsers.add_parser(
        "ingest",
        help="write activations (.npy, .npz, directory of <layer>.npy) into a store",
        description="Ingest activations of one model into a store (created if missing). "
        "SOURCE is a .npy file (needs --layer), an .npz file (every key is a layer) or a "
        "directory (every <layer>.npy is a layer).",
    )
    ingest.add_argument("store", metavar="STORE", help="store URL: path, file://, s3://, gs://")
    ingest.add_argument("model", metavar="MODEL", help="model name")
    ingest.add_argument("source", metavar="SOURCE", help=".npy, .npz or directory")
    ingest.add_argument("--layer", help="layer name (required for .npy; selects one otherwise)")
    ingest.add_argument(
        "--dtype", choices=STORAGE_DTYPES, default="float32", help="storage dtype (default float32)"
    )
    again = ingest.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="replace existing units")
    again.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted ingest: keep units whose content equals the source's, "
        "ingest the rest (a unit that differs is refused)",
    )
    storage_option_arg(ingest)
    ingest.set_defaults(func=_ingest)

    inspect = subparsers.add_parser(
        "inspect",
        help="list a store's units, rows, dtypes, sizes and chunking",
        description="Describe a store: models, layers, rows, features, dtype, size, chunking "
        "and row fingerprint.",
    )
    inspect.add_argument("store", metavar="STORE", help="store URL")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    storage_option_arg(inspect)
    inspect.set_defaults(func=_inspect)


def storage_option_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option, repeatable; dotted keys nest "
        "(client_kwargs.endpoint_url=http://...); values true/false/numbers are parsed",
    )


def parse_storage_options(items: list[str]) -> dict:
    """``["a.b=1", "anon=true"]`` -> ``{"a": {"b": 1}, "anon": True}``."""
    options: dict = {}
    for number, item in enumerate(items, 1):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            # The text is not shown: without '=' it may be a bare secret.
            raise InputError(f"--storage-option number {number}: expected KEY=VALUE")
        try:
            value = json.loads(raw) if raw in ("true", "false", "null") or _is_number(raw) else raw
        except ValueError:
            value = raw
        node = options
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"--storage-option {key!r}: {part!r} is both a value and a group")
        node[leaf] = value
    return options


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _ingest(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_option)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with cli_spelling():
        store = ActivationStore.create(args.store, options or None)
        infos = ingest_path(
            store,
            args.model,
            args.source,
            layer=args.layer,
            dtype=args.dtype,
            overwrite=args.overwrite,
            resume=args.resume,
            progress=progress,
        )
    for info in infos:
        converted = "" if info.source_dtype == info.dtype else f" (from {info.source_dtype})"
        print(
            f"{info.model}/{info.layer}: {info.rows} x {info.features} {info.dtype}{converted}, "
            f"{format_bytes(info.nbytes)}"
        )
    return 0


def describe(store: ActivationStore) -> dict:
    """A JSON-ready description of a store (what ``inspect --json`` prints)."""
    units = [asdict(store.unit_info(m, layer)) for m, layer in store.units()]
    rows = store.catalog.rows()
    return {
        "store": store.url,
        "format": store.format,
        "rows": store.n_rows,
        "row_fingerprint": store.row_fingerprint,
        "row_ids": bool(rows and rows.row_ids),
        "example_map": bool(rows and rows.example_map),
        "models": store.models(),
        "units": units,
    }


def _inspect(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_option)
    store = ActivationStore.open(args.store, options or None)
    info = describe(store)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"store {info['store']}")
    print(
        f"rows {info['rows']}  row fingerprint {info['row_fingerprint']}  "
        f"row ids {'yes' if info['row_ids'] else 'no'}  "
        f"token rows {'yes' if info['example_map'] else 'no'}"
    )
    header = ("model", "layer", "rows", "features", "dtype", "source", "size", "chunk", "shard")
    table = [header] + [
        (
            u["model"],
            u["layer"],
            str(u["rows"]),
            str(u["features"]),
            u["dtype"],
            u["source_dtype"],
            format_bytes(u["nbytes"]),
            f"{u['chunk_rows']} rows",
            f"{u['shard_rows']} rows",
        )
        for u in info["units"]
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if not info["units"]:
        print("(no units)")
    return 0
