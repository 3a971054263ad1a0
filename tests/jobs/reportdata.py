"""Results stores for the report tests, made by the real pipeline: `repscope run` (with a
bootstrap, for bounds), `repscope nightly` (key coordinates, a series) and `repscope ground`."""

from __future__ import annotations

import json
from pathlib import Path

from repscope.jobs.cli import main
from tests.jobs.conftest import make_store

METRICS = ["linear_cka", "pwcca", "procrustes"]
#: Models whose names differ only in a character a file name drops, and one more.
MODELS = {"a b": [6, 5, 4], "a_b": [6, 5, 4], "c": [6, 5, 4]}
ROWS = 600
#: Series for nightly runs: numbered out of numeric order in the store.
CHECKPOINTS = ["ckpt0", "ckpt10", "ckpt2"]

_BUILT: dict[str, Path] = {}


def shared(tmp_path_factory, build) -> Path:
    """`build(folder)` once per test session (each run starts Ray: seconds), shared by the
    report test modules; its files live in pytest's session temporary folder."""
    if build.__name__ not in _BUILT:
        _BUILT[build.__name__] = build(tmp_path_factory.mktemp(build.__name__))
    return _BUILT[build.__name__]


def write_spec(root: Path, store: str, output: Path, compute: dict, name: str) -> Path:
    spec = root / name
    spec.write_text(f"store: {store}\noutput: {output}\nmetrics: {json.dumps(METRICS)}\n"
                    f"compute: {json.dumps(compute)}\n")
    return spec


def bootstrap_results(root: Path, models: dict = MODELS) -> Path:
    """`repscope run` with `compute: {bootstrap: 20}`: results with 90% bounds."""
    store = str(root / "acts.zarr")
    make_store(store, models, rows=ROWS)
    out = root / "boot.zarr"
    spec = write_spec(root, store, out, {"precision": "float64", "bootstrap": 20,
                                         "bootstrap_shards": 10}, "boot.yaml")
    assert main(["run", str(spec)]) == 0
    return out


def nightly_results(root: Path, names: list[str] = CHECKPOINTS) -> Path:
    """`repscope nightly` over models `names` (layer widths 5, 4, 3): results with key_x."""
    store = str(root / "series.zarr")
    make_store(store, {n: [5, 4, 3] for n in names}, rows=300)
    out = root / "nightly.zarr"
    spec = write_spec(root, store, out, {"precision": "float64"}, "nightly.yaml")
    assert main(["nightly", str(spec)]) == 0
    return out


def ground_output(root: Path) -> Path:
    """`repscope ground` on the store of the bootstrap job in `root` (every model scored)."""
    scores = root / "scores.csv"
    scores.write_text("model,score\n" + "".join(
        f"{m},{0.9 - 0.1 * k}\n" for k, m in enumerate(MODELS)))
    out = root / "ground"
    args = ["ground", str(root / "boot.yaml"), "--scores", str(scores), "--out", str(out),
            "--bootstrap", "0", "--permutations", "0", "--pc-fractions", "0,0.5", "--json"]
    assert main(args) == 0
    return out
