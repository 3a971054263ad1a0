"""The grounding tests' tables: the scores CSV a user gives, and the CSV tables written."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from repscope.errors import InputError, NotFoundError

__all__ = ["read_scores", "write_table", "plain"]


def read_scores(path: str | Path) -> dict[str, float]:
    """A CSV with columns ``model,score`` (header required; larger = better) -> {model: score}."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"scores file {str(path)!r} does not exist")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"model", "score"} <= set(rows[0]):
        raise InputError(f"scores file {str(path)!r} needs a header 'model,score' and rows")
    out: dict[str, float] = {}
    for line, row in enumerate(rows, start=2):
        model = (row["model"] or "").strip()
        try:
            score = float(row["score"])
        except (TypeError, ValueError):
            score = math.nan
        if not model or not math.isfinite(score):
            raise InputError(f"scores file {str(path)!r}, line {line}: need a model name and a "
                             f"finite score, got {row['model']!r}, {row['score']!r}")
        if model in out:
            raise InputError(f"scores file {str(path)!r} lists model {model!r} twice")
        out[model] = score
    return out


def plain(value):
    return None if isinstance(value, float) and math.isnan(value) else float(value)


def write_table(path: Path, header: Sequence[str], rows) -> list[Path]:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return [path]
