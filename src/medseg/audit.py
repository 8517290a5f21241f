"""The service's audit log: one JSON line per API call and per finished job, for a hospital's security review.

Each line holds the time (UTC), the client's address, a hash naming the token presented (`medseg.guard.token_id`),
the job id, the action, the outcome (HTTP status, or done / failed), byte counts and durations, and never a file
name, a DICOM attribute, an error text or a pixel: what it must not hold it is never given.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

FIELDS = ("client", "token_id", "job", "action", "outcome", "bytes_in", "bytes_out", "seconds")


class AuditLog:
    """Appends events to PATH (created 0600); with no path, records nothing."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()

    def record(self, **event) -> None:
        if self.path is None:
            return
        unknown = set(event) - set(FIELDS)
        if unknown:  # a guard against a later change handing it a name or a text
            raise ValueError(f"audit events hold only {FIELDS}, not {sorted(unknown)}")
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **event})
        with self._lock:
            handle = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(handle, (line + "\n").encode())
            finally:
                os.close(handle)


def action_of(path: str) -> tuple[str, str | None]:
    """(action, job id) of an API path: /api/v1/segment -> submit, /api/v1/jobs/ID -> status,
    /api/v1/jobs/ID/FILE -> result, /api/v1/model -> model; anything else -> page."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "jobs"] and len(parts) in (4, 5):
        return ("status" if len(parts) == 4 else "result"), parts[3]
    if parts[:2] == ["api", "v1"] and len(parts) == 3:
        return {"segment": "submit", "model": "model"}.get(parts[2], "other"), None
    return "page", None
