"""The README's code blocks, as the tests that run them read them."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def block(section: str, language: str) -> str:
    """The first ```language block after the README's heading ``section``."""
    text = README.read_text()
    start = text.index(f"\n{section}\n")
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    if match is None:
        raise AssertionError(f"README has no {language} block after {section!r}")
    return match.group(1)
