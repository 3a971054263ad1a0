"""The README's Python section, run as written."""

from __future__ import annotations

import contextlib
import io

from tests.readme import block


def test_the_python_section_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block("## Python", "python"), "README.md", "exec"), {})
    printed = out.getvalue()
    assert "(2, 4)" in printed  # model0's rows of the (4, 4) procrustes matrix
    assert "(4, 4)" in printed and "'pwcca'" in printed
    assert (tmp_path / "api-results.zarr").is_dir()
