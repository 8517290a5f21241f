"""Folders medseg may replace: only those it wrote itself, recognised by a marker file inside.

`train --overwrite` and `evaluate --out` replace a whole folder. A folder is only ever removed when it carries the
marker that medseg writes into every run and evaluation folder it creates, so a mistyped `--out` pointing at a
user's data, home or results refuses with one line instead of deleting them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from medseg.errors import MedsegError
from medseg.io import write_text_atomic

MARKER = ".medseg-folder"


def mark(folder: Path, kind: str) -> None:
    """Mark `folder` as a `kind` ("run", "ensemble", "evaluation") that medseg wrote and may replace."""
    write_text_atomic(folder / MARKER, json.dumps({"written_by": "medseg", "kind": kind}) + "\n")


def is_medsegs(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def check_replaceable(folder: Path, option: str) -> None:
    """Stop, before any work, if `folder` holds something medseg did not write (an empty folder is fine)."""
    if folder.is_file():
        raise MedsegError(f"{folder}: {option} names a file, not a folder; choose another {option}")
    if folder.is_dir() and any(folder.iterdir()) and not is_medsegs(folder):
        raise MedsegError(f"{folder}: not replaced: medseg did not write this folder (it has no {MARKER}; runs "
                          f"from before 2026-11-28 have none either); choose another {option}, or remove it yourself")


def replace_folder(folder: Path, option: str) -> None:
    """Remove `folder` if medseg wrote it (checked again here, just before removing)."""
    check_replaceable(folder, option)
    if folder.exists():
        shutil.rmtree(folder)
