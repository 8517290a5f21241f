"""Write a benchmark's section of docs/benchmarks.md between its markers, leaving the rest of the page alone."""
from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(name: str, script: str, lines: list[str], heading: str) -> None:
    """Replace the text between `<!-- NAME:START ... -->` and `<!-- NAME:END -->` (or append the section under
    `heading` when the page has no such markers yet)."""
    start, end = f"<!-- {name}:START", f"<!-- {name}:END -->"
    body = "\n".join([f"{start} (written by {script}) -->", *lines, end])
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    if start in text:
        text = text[: text.index(start)] + body + text[text.index(end) + len(end):]
    else:
        text += f"\n## {heading}\n\n{body}\n"
    DOC.write_text(text)
