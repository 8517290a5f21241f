"""What medseg prints for people: progress bars only on a terminal, and notices on reading rules, one line per
kind however many files a rule applies to."""
from __future__ import annotations

import atexit
import sys
import time

_said: set[str] = set()
_notes: dict[str, dict] = {}  # kind -> {"text", "files": set, "example"}, until flush_notes prints them


def show_bars(progress: bool) -> bool:
    """Progress bars only when asked for and stderr is a terminal: a log file gets no carriage-return noise."""
    return progress and sys.stderr.isatty()


LINE_EVERY = 30.0  # seconds between progress lines where no bar is shown


def progress(items: list, what: str, bars: bool, prefix: str = ""):
    """Iterate over `items` with a bar on a terminal; elsewhere (--quiet, a log file) with a line every LINE_EVERY
    seconds ("reading training cases: 12 of 40, 0.9 min"), so that a long load never looks like a hang."""
    from tqdm import tqdm

    if bars:
        yield from tqdm(items, desc=what, leave=False)
        return
    started = last = time.monotonic()
    for n, item in enumerate(items):
        if time.monotonic() - last > LINE_EVERY:
            last = time.monotonic()
            print(f"{prefix}{what}: {n} of {len(items)}, {(last - started) / 60:.1f} min", flush=True)
        yield item


def notice(message: str) -> None:
    """Print a line the user should know (a reading rule, a plan made for another split) once per process."""
    if message not in _said:
        _said.add(message)
        print(f"medseg: {message}", file=sys.stderr, flush=True)


def note(kind: str, text: str, path) -> None:
    """Remember that the rule `kind` (said as `text`) applied to the file `path`; `flush_notes` prints one line
    per kind with the number of files, so a folder of 200 grey-level masks gets one line, not 200."""
    entry = _notes.setdefault(kind, {"text": text, "files": set(), "example": str(path)})
    entry["files"].add(str(path))


def flush_notes() -> None:
    """Print each pending note once, with how many files it applied to (called when a stage has read its files)."""
    for entry in _notes.values():
        count = len(entry["files"])
        files = f"{count} files, e.g. {entry['example']}" if count > 1 else entry["example"]
        notice(f"{entry['text']} ({files})")
    _notes.clear()


atexit.register(flush_notes)  # a note is never lost, even where no stage flushed it
