"""The README's walk-through, run as written after `make demo` (issue 16: a clean clone and
the README's commands, run in order, all succeed as written)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr

from tests.readme import block


def test_the_walk_through_runs_as_written(demo_output):
    pytest.importorskip("transformers", reason="the capture extra is not installed: "
                        "pip install 'repscope[capture]'")
    repo = demo_output.parent
    venv = Path(sys.executable).parent.parent
    if not (repo / ".venv").exists():
        (repo / ".venv").symlink_to(venv)  # what `. .venv/bin/activate` finds in a clone
    script = block("## Use", "sh")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=repo,
                            capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-4000:]
    scratch = repo / "scratch"
    out = result.stdout
    assert "done: 6 units, 21 of 21 pairs computed" in out  # run: 2 models x 3 layers
    assert "done: 9 units, 24 of 45 pairs computed (21 reused)" in out  # nightly, as said
    assert (scratch / "report" / "report.html").is_file()
    ds = xr.open_zarr(scratch / "results.zarr")
    assert set(ds.model_x.values) == {"tiny-bert-seed0", "tiny-bert-seed1", "tiny-bert-seed2"}
    assert "linear_cka_lower" in xr.open_zarr(scratch / "ground" / "results.zarr")
    assert (scratch / "ground-report" / "report.html").is_file()
    assert (scratch / "mine.zarr").is_dir()
