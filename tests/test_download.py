"""`medseg download` against a small archive served on 127.0.0.1 (nothing leaves the machine)."""
import hashlib
import http.server
import io
import json
import tarfile
import threading

import pytest

from medseg.cli import main
from medseg.download import download_task, resolve_task
from medseg.errors import MedsegError

TASK = "Task04_Hippocampus"


def make_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        files = {f"{TASK}/dataset.json": json.dumps({"labels": {"0": "background"}}).encode(),
                 f"{TASK}/imagesTr/a.nii.gz": b"x" * 300_000, f"{TASK}/._dataset.json": b"mac junk"}
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def server():
    """Serves ARCHIVE at /Task04_Hippocampus.tar with HTTP Range support; records the ranges asked for."""
    state = {"archive": make_archive(), "ranges": [], "sent": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = state["archive"]
            if self.path != f"/{TASK}.tar":
                self.send_error(404)
                return
            start = 0
            if "Range" in self.headers:
                start = int(self.headers["Range"].split("=")[1].split("-")[0])
                state["ranges"].append(start)
                self.send_response(206)
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])
            state["sent"] += len(data) - start

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}"
    state["md5"] = hashlib.md5(state["archive"]).hexdigest()
    yield state
    httpd.shutdown()


def test_download_verifies_and_unpacks(server, tmp_path):
    target = download_task("hippocampus", tmp_path, server["url"], md5=server["md5"], progress=False)
    assert target == tmp_path / TASK and (target / "dataset.json").exists()
    assert not (target / "._dataset.json").exists() and not list(tmp_path.glob("*.part"))
    sent = server["sent"]
    assert download_task("Task04", tmp_path, server["url"], md5=server["md5"], progress=False) == target
    assert server["sent"] == sent  # already there: nothing fetched again


def test_interrupted_download_resumes(server, tmp_path):
    half = len(server["archive"]) // 2
    (tmp_path / f"{TASK}.tar.part").write_bytes(server["archive"][:half])
    download_task("4", tmp_path, server["url"], md5=server["md5"], progress=False)
    assert server["ranges"] == [half] and server["sent"] == len(server["archive"]) - half
    assert (tmp_path / TASK / "imagesTr" / "a.nii.gz").stat().st_size == 300_000


def test_checksum_mismatch_deletes_the_download(server, tmp_path):
    with pytest.raises(MedsegError, match="checksum mismatch"):
        download_task(TASK, tmp_path, server["url"], md5="0" * 32, progress=False)
    assert not list(tmp_path.iterdir())


def test_offline_is_a_clear_error(tmp_path, capsys):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = main(["download", TASK, "--out", str(tmp_path), "--url", f"http://127.0.0.1:{port}", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot download" in err and "offline" in err and len(err.strip().splitlines()) == 1


def test_task_names():
    assert resolve_task("task09") == "Task09_Spleen" and resolve_task("10") == "Task10_Colon"
    with pytest.raises(MedsegError, match="unknown task"):
        resolve_task("Task11_Kidney")


def test_archive_fetched_by_hand_is_verified_offline(server, tmp_path):
    (tmp_path / f"{TASK}.tar").write_bytes(server["archive"])
    target = download_task(TASK, tmp_path, "http://127.0.0.1:9", md5=server["md5"], progress=False)
    assert (target / "dataset.json").exists() and server["sent"] == 0
    assert not (tmp_path / f"{TASK}.tar").exists()
