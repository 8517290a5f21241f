"""What medseg prints for people: progress bars only on a terminal, one-time notices on reading rules."""
from __future__ import annotations

import sys

_said: set[str] = set()


def show_bars(progress: bool) -> bool:
    """Progress bars only when asked for and stderr is a terminal: a log file gets no carriage-return noise."""
    return progress and sys.stderr.isatty()


def notice(message: str) -> None:
    """Print a line on a reading rule the user should know (e.g. grey-level masks thresholded) once per process,
    however many files it applies to."""
    if message not in _said:
        _said.add(message)
        print(f"medseg: {message}", file=sys.stderr, flush=True)
