"""Work folders that hold a patient's data (the service's uploads and results, the PACS job's series).

Each is private (mode 0700, from `tempfile.mkdtemp`), named `medseg-KIND-*` in the temporary folder and marked with
a file naming the process that made it. A clean stop deletes it; a process killed with SIGKILL or by the OOM
killer cannot, so every start first sweeps the folders of its kind whose marker names a process that is gone.
Only marked folders of the same user are ever deleted: a folder merely named like ours is left alone.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

MARKER = ".medseg-workdir"


def make(kind: str) -> Path:
    """A new marked work folder of `kind` ('serve', 'pacs'), after sweeping the ones dead processes left."""
    sweep(kind)
    folder = Path(tempfile.mkdtemp(prefix=f"medseg-{kind}-"))
    (folder / MARKER).write_text(json.dumps({"pid": os.getpid(), "kind": kind}))
    return folder


def sweep(kind: str) -> list[Path]:
    """Delete the marked `medseg-KIND-*` folders of this user whose process has ended; return them."""
    swept = []
    for folder in Path(tempfile.gettempdir()).glob(f"medseg-{kind}-*"):
        marker = folder / MARKER
        try:
            if folder.is_symlink() or not marker.is_file() or folder.stat().st_uid != os.getuid():
                continue
            pid = int(json.loads(marker.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if pid != os.getpid() and _alive(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        swept.append(folder)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
