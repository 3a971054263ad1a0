"""Progress output: a live bar on a terminal, one line per stage elsewhere."""

from __future__ import annotations

import io

from repscope.jobs.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_terminal_shows_rows_rate_eta():
    out = Terminal()
    p = Progress(1000, "accumulate", stream=out)
    p(250.0)
    p(250.0)
    text = out.getvalue()
    assert "\r" in text and "500/1,000 rows" in text and "rows/s" in text and "ETA" in text
    p.close()
    assert out.getvalue().splitlines()[-1].startswith("accumulate: 500 rows in")


def test_progress_quiet_when_not_a_terminal():
    out = io.StringIO()
    p = Progress(1000, "accumulate", stream=out)
    for _ in range(4):
        p(250.0)
    assert out.getvalue() == ""
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("accumulate: 1,000 rows in")
