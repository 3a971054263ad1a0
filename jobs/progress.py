"""Progress of a job's long stages on stderr: a live bar on a terminal, a line per stage
elsewhere (logs of submitted jobs, CI)."""

from __future__ import annotations

import math
import sys
import time

__all__ = ["Progress"]


class Progress:
    """Rows (or other ``unit``s of work) done, rate and ETA on stderr: a live bar on a
    terminal, a line per stage elsewhere."""

    def __init__(self, total_rows: int, label: str = "accumulate", stream=None,
                 unit: str = "rows"):
        self.total = max(1, total_rows)
        self.unit = unit
        self.closed = False
        self.done = 0.0
        self.label = label
        self.stream = stream or sys.stderr
        self.live = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = time.perf_counter()

    def __call__(self, rows: float) -> None:
        # Tasks report fractions of rows (their rows spread over the tiles): round at the end.
        self.done = min(self.total, self.done + rows)
        if not self.live:
            return
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        frac = self.done / self.total
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        eta_s = f"{eta:5.0f}s" if math.isfinite(eta) else "    ?"
        self.stream.write(
            f"\r{self.label} [{bar}] {int(self.done):,}/{self.total:,} {self.unit} "
            f"{rate:,.{0 if rate >= 10 else 2}f} {self.unit}/s ETA {eta_s}"
        )
        self.stream.flush()

    def close(self) -> None:
        """The stage's summary line (once; later calls do nothing)."""
        if self.closed:
            return
        self.closed = True
        elapsed = time.perf_counter() - self.t0
        if self.live:
            self.stream.write("\n")
        self.stream.write(f"{self.label}: {round(self.done):,} {self.unit} in {elapsed:.1f} s\n")
        self.stream.flush()
