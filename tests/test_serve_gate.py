"""The service's front door (`medseg.gate`): what is decided before an upload's body is read, measured from the
client's side as the bytes it had sent when the answer came (a server that read the body first answers only once
all of it has arrived)."""
import json
import select
import socket
import time

import pytest

from test_serve import start_server

pytest.importorskip("fastapi", reason="medseg serve needs the serve extras (pip install 'medseg[serve]')")

BOUNDARY = "medseggate"


def head(port: int, headers: dict) -> bytes:
    lines = [f"POST /api/v1/segment HTTP/1.1", f"Host: 127.0.0.1:{port}",
             f"Content-Type: multipart/form-data; boundary={BOUNDARY}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def form_start(name: str = "scan.png") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()


def send_until_answered(base: str, total: int, headers: dict | None = None, chunked: bool = False,
                        timeout: float = 60) -> tuple[int, int]:
    """Send an upload of `total` bytes (chunked, or with its Content-Length) without waiting for the server to
    read it; return (HTTP status, bytes of body sent when the answer arrived)."""
    port = int(base.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    framing = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(total)}
    pending, sent, answer = head(port, {**framing, **(headers or {})}), 0, b""
    body = form_start() + b"\0" * (total - len(form_start()))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if (pending or sent < total) else [], [], 0.5)
            if readable:
                data = sock.recv(65536)
                answer += data
                if b"\r\n\r\n" in answer or not data:
                    break
            if writable:
                if not pending and sent < total:
                    piece = body[sent:sent + 65536]
                    pending = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") if chunked else piece
                    sent += len(piece)
                    if chunked and sent >= total:
                        pending += b"0\r\n\r\n"
                try:
                    done = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    break
                pending = pending[done:]
        if b"\r\n\r\n" not in answer:  # the server may have closed after answering
            sock.setblocking(True)
            sock.settimeout(5)
            try:
                answer += sock.recv(65536)
            except OSError:
                pass
    finally:
        sock.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1") else 0
    return status, sent


def test_an_oversize_chunked_upload_is_stopped_as_it_arrives(trained_2d):
    from medseg.serve import Limits

    base, server = start_server(trained_2d, Limits(max_upload_mb=1))
    try:
        status, sent = send_until_answered(base, 64 * 2**20, chunked=True)  # 64 MB, no Content-Length
        assert status == 413 and sent < 16 * 2**20, (status, sent)  # not read to its end
        folder = server.config.app.state.segmenter.folder
        for _ in range(50):  # the received part is deleted once the answer is out
            if not list(folder.iterdir()) or list(folder.iterdir()) == [folder / ".medseg-workdir"]:
                break
            time.sleep(0.02)
        assert [p.name for p in folder.iterdir()] == [".medseg-workdir"]
    finally:
        server.should_exit = True


def test_an_upload_without_the_token_is_answered_before_its_body_is_read(trained_2d):
    from medseg.serve import Limits

    base, server = start_server(trained_2d, Limits(token="s3cret-token", max_upload_mb=100))
    try:
        status, sent = send_until_answered(base, 64 * 2**20)  # 64 MB declared and sent, no token
        assert status == 401 and sent < 16 * 2**20, (status, sent)  # the body never read, never written
        folder = server.config.app.state.segmenter.folder
        assert [p.name for p in folder.iterdir()] == [".medseg-workdir"]
    finally:
        server.should_exit = True


def test_uploads_are_limited_per_client_at_once_and_on_disk(trained_2d):
    from medseg.serve import Limits

    base, server = start_server(trained_2d, Limits(uploads_per_minute=6, max_uploads=2, max_upload_mb=1,
                                                   max_disk_mb=0.2))
    try:
        import urllib.error
        import urllib.request

        def post(data: bytes) -> tuple[int, dict]:
            body = form_start("notes.txt") + data + f"\r\n--{BOUNDARY}--\r\n".encode()
            request = urllib.request.Request(f"{base}/api/v1/segment", data=body, method="POST", headers={
                "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
            try:
                with urllib.request.urlopen(request) as answer:
                    return answer.status, dict(answer.headers)
            except urllib.error.HTTPError as error:
                return error.code, dict(error.headers)

        status, _ = post(b"\0" * 300_000)  # over the 0.2 MB for uploads in progress, under the 1 MB limit
        assert status == 507
        statuses = [post(b"hello")[0] for _ in range(19)]  # a name the service refuses: no job is queued
        assert statuses == [400] * 19  # 20 in a burst pass the gate
        status, headers = post(b"hello")
        assert status == 429 and 9 <= int(headers["retry-after"]) <= 11  # then 6 a minute: one every 10 s
    finally:
        server.should_exit = True
    base, server = start_server(trained_2d, Limits(max_uploads=2))
    try:
        port = int(base.rsplit(":", 1)[1])
        held = []
        for _ in range(2):  # two uploads that have begun and not finished
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(head(port, {"Content-Length": "100000"}) + form_start())
            held.append(sock)
        time.sleep(0.3)
        status, sent = send_until_answered(base, 10_000)
        assert status == 429, status
        for sock in held:
            sock.close()
    finally:
        server.should_exit = True


def test_the_audit_log_records_what_the_gate_refused(trained_2d, tmp_path):
    import uvicorn  # noqa: F401  (the serve extras)

    from medseg.serve import Limits, create_app

    app = create_app(trained_2d, device="cpu", limits=Limits(token="s3cret-token"), audit=tmp_path / "audit.jsonl")
    import threading

    from test_pacs import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    try:
        status, _ = send_until_answered(f"http://127.0.0.1:{port}", 1000)
        assert status == 401
    finally:
        server.should_exit = True
    (line,) = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert line["action"] == "submit" and line["outcome"] == 401 and line["client"] == "127.0.0.1"
    assert set(line) <= {"time", "client", "token_id", "job", "action", "outcome", "bytes_in", "bytes_out", "seconds"}
