"""The service's front door: what is decided about an upload before a byte of its body is read.

FastAPI parses a multipart body (spooling it to disk past 1 MB) before a route's dependencies, the token check
among them, run; and a size limit read from Content-Length misses a chunked upload. So `Gate` wraps the whole
application as plain ASGI and, for `POST /api/v1/segment`, checks in this order, each before the body is read:
the token (401), a declared size over the limit (413), the client's upload rate (429 with Retry-After), uploads in
progress (429), the queue (429). Then it receives the body itself, chunked or not, into a file in the service's
private work folder, counting bytes as they arrive: past the size limit it stops and answers 413, past the disk
cap for all uploads in progress 507; only a complete body under both is handed on to the application. Its own
answers carry the same security headers as every other, and are recorded in the audit log.
"""
from __future__ import annotations

import json
import math
import secrets
import threading
import time
from collections import defaultdict
from pathlib import Path

from medseg.audit import AuditLog
from medseg.guard import SECURITY_HEADERS, authorised, token_id

UPLOAD_PATH = "/api/v1/segment"


class Gate:
    """ASGI middleware around the service. `queue_full()` says whether a job could be queued now; uploads are
    received into `folder`, at most `max_disk_bytes` of them at once."""

    def __init__(self, app, token: str | None, max_body_bytes: int, queue_full, folder: Path,
                 audit: AuditLog | None = None, max_uploads: int = 4, max_disk_bytes: int | None = None,
                 uploads_per_minute: float = 120.0, burst: int = 20):
        self.app, self.token, self.max_body, self.queue_full = app, token, max_body_bytes, queue_full
        self.folder, self.audit = Path(folder), audit or AuditLog(None)
        self.max_uploads, self.max_disk = max_uploads, max_disk_bytes or 2 * max_body_bytes
        self.per_second, self.burst = uploads_per_minute / 60.0, burst
        self.uploading, self.on_disk = 0, 0
        self.buckets: dict[str, tuple[float, float]] = defaultdict(lambda: (float(burst), time.monotonic()))
        self.lock = threading.Lock()
        self.state = getattr(app, "state", None)  # as the wrapped application's (tests and lifespan read it)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != UPLOAD_PATH:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        client = (scope.get("client") or ("unknown", 0))[0]
        refusal = self._refusal(headers, client)
        if refusal:
            return await self._answer(send, *refusal, client, headers)
        with self.lock:
            self.uploading += 1
        spool, size = self.folder / f"upload-{secrets.token_hex(16)}", 0
        try:
            with open(spool, "wb") as out:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    with self.lock:
                        self.on_disk += len(chunk)
                        full = self.on_disk > self.max_disk
                    if size > self.max_body:
                        return await self._answer(send, 413, f"upload over this server's {self.max_body / 2**20:g} "
                                                             "MB limit; stopped as it arrived", {}, client, headers)
                    if full:
                        return await self._answer(send, 507, "the uploads in progress fill this server's disk "
                                                             "allowance; try again shortly", {"Retry-After": "10"},
                                                  client, headers)
                    out.write(chunk)
                    if not message.get("more_body", False):
                        break
            with open(spool, "rb") as source:
                done = False

                async def replay():  # the received body, then whatever the client sends next (a disconnect)
                    nonlocal done
                    if done:
                        return await receive()
                    chunk = source.read(2**20)
                    done = source.tell() >= size
                    return {"type": "http.request", "body": chunk, "more_body": not done}

                await self.app(scope, replay, send)
        finally:
            spool.unlink(missing_ok=True)
            with self.lock:
                self.uploading -= 1
                self.on_disk -= size

    def _refusal(self, headers: dict, client: str) -> tuple[int, str, dict] | None:
        if not authorised(headers.get("authorization"), self.token):
            return 401, ("this server needs its token: Authorization: Bearer TOKEN (in the browser, open the page "
                         "as /#token=TOKEN)"), {"WWW-Authenticate": "Bearer"}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return 413, f"upload of {int(declared) / 2**20:.0f} MB, over this server's {self.max_body / 2**20:g} MB " \
                        "limit", {}
        wait = self._take(client)
        if wait:
            return 429, "too many uploads from this client; try again shortly", {"Retry-After": str(math.ceil(wait))}
        with self.lock:
            busy = self.uploading >= self.max_uploads
        if busy:
            return 429, f"{self.max_uploads} uploads are arriving already; try again shortly", {"Retry-After": "2"}
        if self.queue_full():
            return 429, "the queue of jobs is full; try again shortly", {"Retry-After": "5"}
        return None

    def _take(self, client: str) -> float:
        """Take one upload from the client's token bucket; 0, or the seconds until one is there."""
        with self.lock:
            tokens, then = self.buckets[client]
            now = time.monotonic()
            tokens = min(self.burst, tokens + (now - then) * self.per_second)
            if tokens < 1:
                self.buckets[client] = (tokens, now)
                return (1 - tokens) / self.per_second
            self.buckets[client] = (tokens - 1, now)
            return 0.0

    async def _answer(self, send, status: int, detail: str, extra: dict, client: str, headers: dict) -> None:
        body = json.dumps({"detail": detail}).encode()
        fields = {"content-type": "application/json", "content-length": str(len(body)), **SECURITY_HEADERS, **extra}
        self.audit.record(client=client, token_id=token_id(headers.get("authorization")), action="submit",
                          outcome=status, bytes_in=None, bytes_out=len(body), seconds=0.0)  # before it is answered
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in fields.items()]})
        await send({"type": "http.response.body", "body": body})
