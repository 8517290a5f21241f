"""`medseg serve` as a hospital IT team would probe it: a token, size and type limits, a bounded queue, uploads
deleted after each job, no identifiers in what the server prints, unguessable job ids, and a load test."""
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import shared_dataset
from test_serve import browser, downloads, start_server, upload_and_wait  # noqa: F401  (browser: a fixture)

pytest.importorskip("fastapi", reason="medseg serve needs the serve extras (pip install 'medseg[serve]')")
ROOT = Path(__file__).resolve().parents[1]


def form(name: str, data: bytes) -> tuple[bytes, dict]:
    boundary = "medsegsafety"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def request(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request, errors included."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers or {},
                                                           method="POST" if data else "GET")) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def upload(base: str, name: str, data: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    body, form_headers = form(name, data)
    status, answer_headers, reply = request(f"{base}/api/v1/segment", body, {**form_headers, **(headers or {})})
    return status, answer_headers, json.loads(reply)


def reached(base: str, job_id: str, *statuses: str, headers: dict | None = None) -> dict:
    """The job once its status is one of `statuses` (polled for up to 30 s)."""
    for _ in range(600):
        job = json.loads(request(f"{base}/api/v1/jobs/{job_id}", headers=headers)[2])
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {' or '.join(statuses)}")


def finished(base: str, job_id: str, headers: dict | None = None) -> dict:
    return reached(base, job_id, "done", "failed", headers=headers)


@pytest.fixture
def png(phantoms_2d) -> Path:
    return phantoms_2d / "imagesTr" / "phantom_000.png"


def test_a_token_guards_every_call_results_included(trained_2d, png):
    from medseg.serve import Limits

    base, server = start_server(trained_2d, Limits(token="s3cret-token"))
    good = {"Authorization": "Bearer s3cret-token"}
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                        {"Authorization": "Basic s3cret-token"}, {"Authorization": "Bearer s3cret-token extra"}):
            status, answer, _ = request(f"{base}/api/v1/model", headers=headers)
            assert status == 401 and answer["www-authenticate"] == "Bearer", headers  # a bare token is not one
            assert upload(base, png.name, png.read_bytes(), headers)[0] == 401
        assert request(f"{base}/api/v1/model", headers={"Authorization": "bearer  s3cret-token"})[0] == 200  # RFC 6750
        status, _, job = upload(base, png.name, png.read_bytes(), good)
        assert status == 202 and len(job["id"]) == 32  # 128 random bits, hex
        assert request(f"{base}/api/v1/jobs/{job['id']}")[0] == 401
        done = finished(base, job["id"], good)
        assert done["status"] == "done"
        assert request(base + done["results"]["mask.png"])[0] == 401  # the id alone no longer opens results
        assert request(base + done["results"]["mask.png"], headers=good)[0] == 200
        assert request(f"{base}/api/v1/jobs/{'0' * 32}/mask.png", headers=good)[0] == 404
        assert request(f"{base}/api/v1/jobs/{'0' * 32}", headers=good)[0] == 404
    finally:
        server.should_exit = True


def test_every_answer_carries_the_security_headers_and_other_hosts_are_turned_away(trained_2d):
    from medseg.serve import Limits

    base, server = start_server(trained_2d, Limits(token="s3cret-token"))
    try:
        for path in ("/", "/app.js", "/app.css", "/api/v1/model", "/openapi.json", "/docs", "/api/v1/jobs/x",
                     "/healthz"):
            status, headers, body = request(base + path)
            assert headers["cache-control"] == "no-store" and headers["x-content-type-options"] == "nosniff", path
            assert headers["referrer-policy"] == "no-referrer" and headers["x-frame-options"] == "DENY"
            policy = headers["content-security-policy"]
            assert "frame-ancestors 'none'" in policy and "'unsafe-inline'" not in policy
            assert "script-src 'self' 'wasm-unsafe-eval';" in policy and "style-src 'self';" in policy
        assert request(base + "/docs")[0] == 404  # FastAPI's page would load Swagger UI from a CDN
        page = request(base + "/")[2].decode()
        assert "<style" not in page and "<script>" not in page  # nothing inline: the policy would block it
        rebound = {"Host": "attacker.example"}  # a page of another site whose name now points here
        assert request(base + "/api/v1/model", headers={**rebound, "Authorization": "Bearer s3cret-token"})[0] == 400
        assert request(base + "/", headers={"Host": "localhost:1"})[0] == 200
        assert json.loads(request(base + "/healthz")[2]) == {"worker": "alive", "queued": 0}
        import threading as threads

        server.config.app.state.segmenter.worker = threads.Thread(target=lambda: None)  # one that has stopped
        assert request(base + "/healthz")[0] == 503
    finally:
        server.should_exit = True


def test_a_server_open_to_anyone_is_refused_in_one_line(trained_2d, capsys, monkeypatch):
    from medseg.cli import main

    assert main(["serve", str(trained_2d), "--host", "0.0.0.0"]) == 2
    assert "needs a token of at least 128 bits" in capsys.readouterr().err
    assert main(["serve", str(trained_2d), "--host", "0.0.0.0", "--token", "short"]) == 2
    assert "at least 128 bits" in capsys.readouterr().err
    monkeypatch.setenv("MEDSEG_TOKEN", "")
    assert main(["serve", str(trained_2d)]) == 2  # an empty token would admit requests with no header
    assert "the token is empty" in capsys.readouterr().err
    monkeypatch.delenv("MEDSEG_TOKEN")
    assert main(["serve", str(trained_2d), "--tls-cert", "cert.pem"]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err


def test_uploads_over_the_limit_get_413_and_files_that_lie_about_their_type_415(trained_2d, png, tmp_path):
    from medseg.serve import Limits

    base, server = start_server(trained_2d, Limits(max_upload_mb=0.05))
    try:
        status, _, reply = upload(base, "big.png", png.read_bytes() + b"\0" * 200_000)
        assert status == 413 and "limit" in reply["detail"]
        assert upload(base, "image.nii.gz", png.read_bytes())[0] == 415  # a PNG named as NIfTI
        assert upload(base, "scan.png", b"%PDF-1.7 not an image")[0] == 415
        assert upload(base, "series.zip", png.read_bytes())[0] == 415
        for name in ("scan.jpg", "scan.jpeg", "scan.tif", "scan.tiff", "scan.bmp", "image.nii"):
            assert upload(base, name, png.read_bytes())[0] == 415, name  # a PNG under another format's name
        assert upload(base, "notes.txt", b"hello")[0] == 400
        import nibabel as nib

        volume = np.zeros((8, 8, 8), np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
        nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii")
        nib.save(nib.Nifti2Image(volume, np.eye(4)), tmp_path / "v2.nii.gz")
        for name in ("v.nii.gz", "v.nii", "v2.nii.gz"):  # NIfTI-1, uncompressed and NIfTI-2 are what they say
            assert upload(base, name, (tmp_path / name).read_bytes())[0] == 202, name
    finally:
        server.should_exit = True


def test_a_full_queue_answers_429_with_retry_after(trained_2d, png):
    from medseg.serve import Limits

    base, server = start_server(trained_2d, Limits(max_queued=1))
    segmenter = server.config.app.state.segmenter
    gate, real = threading.Event(), segmenter._segment
    segmenter._segment = lambda job: (gate.wait(30), real(job))  # the worker is busy until the gate opens
    try:
        statuses = [upload(base, png.name, png.read_bytes())]
        reached(base, statuses[0][2]["id"], "running")  # the worker holds the first: the queue is empty again
        statuses += [upload(base, png.name, png.read_bytes()) for _ in range(3)]
        codes = [s[0] for s in statuses]
        assert codes[:2] == [202, 202] and codes[2:] == [429, 429]  # one running, one waiting, the rest refused
        assert statuses[2][1]["retry-after"] == "5"
        gate.set()
        assert all(finished(base, s[2]["id"])["status"] == "done" for s in statuses[:2])
        assert upload(base, png.name, png.read_bytes())[0] == 202  # room again
    finally:
        gate.set()
        server.should_exit = True


def test_a_finished_job_keeps_only_its_results_which_expire(trained_2d, png):
    from medseg.serve import Limits

    base, server = start_server(trained_2d, Limits(keep_minutes=60))
    segmenter = server.config.app.state.segmenter
    try:
        job = finished(base, upload(base, png.name, png.read_bytes())[2]["id"])
        folder = segmenter.jobs[job["id"]].folder
        assert [p.name for p in folder.iterdir()] == ["results"]  # the upload is gone
        segmenter.jobs[job["id"]].finished -= 3601
        segmenter._expire()
        assert not folder.exists() and request(f"{base}/api/v1/jobs/{job['id']}")[0] == 404
    finally:
        server.should_exit = True
    for _ in range(100):
        if not segmenter.folder.exists():
            break
        time.sleep(0.05)
    assert not segmenter.folder.exists()  # everything goes with the server


def test_zip_slip_and_zip_bombs_are_refused_at_upload_and_write_nothing_outside(trained_2d, tmp_path):
    base, server = start_server(trained_2d)
    try:
        slip = tmp_path / "slip.zip"
        with zipfile.ZipFile(slip, "w") as z:
            z.writestr("../../../escaped.dcm", b"x")
        status, _, answer = upload(base, "slip.zip", slip.read_bytes())
        assert status == 422 and "outside the archive" in answer["detail"]
        bomb = tmp_path / "bomb.zip"
        with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("zeros.dcm", b"\0" * 20_000_000)  # 20 MB that packs into 20 kB
        from medseg import io

        limit, io.ZIP_MAX_BYTES = io.ZIP_MAX_BYTES, 10_000_000  # the default (8 GiB) is too much to write here
        try:
            status, _, answer = upload(base, "bomb.zip", bomb.read_bytes())
        finally:
            io.ZIP_MAX_BYTES = limit
        assert status == 413 and "GiB unpacked" in answer["detail"]
        folder = server.config.app.state.segmenter.folder  # where uploads are unpacked, and the folders above it
        assert not list(folder.rglob("escaped.dcm"))
        assert not [p for p in list(folder.parents)[:4] if (p / "escaped.dcm").exists()]
    finally:
        server.should_exit = True


def test_bombs_are_refused_at_upload_in_under_a_second(trained_2d, tmp_path):
    """Each bomb of tests/test_limits.py sent to the service: 413 before it is queued, nothing left of it on disk."""
    from test_limits import dicom_file, nifti_bomb, png_bomb

    base, server = start_server(trained_2d)
    try:
        (tmp_path / "deflated").mkdir()
        archive = tmp_path / "deflated.zip"
        with zipfile.ZipFile(archive, "w") as z:  # stored: the zip's own size limit sees 0.3 MB
            z.write(dicom_file(tmp_path / "deflated" / "s.dcm", 512, 512, deflated_zeros=300 * 2**20), "s/s.dcm")
        bombs = {"a.nii.gz": nifti_bomb(tmp_path / "a.nii.gz", (2000, 2000, 2000)),
                 "b.nii.gz": nifti_bomb(tmp_path / "b.nii.gz", (800, 800, 800), np.float64),
                 "c.png": png_bomb(tmp_path / "c.png", 100_000, 100_000), "deflated.zip": archive}
        for name, path in bombs.items():
            started = time.perf_counter()
            status, _, answer = upload(base, name, path.read_bytes())
            assert status == 413 and time.perf_counter() - started < 1.0, (name, status, answer)
            assert str(tmp_path) not in answer["detail"] and "\n" not in answer["detail"]
        folder = server.config.app.state.segmenter.folder
        for _ in range(50):  # the received upload is deleted as the answer goes out
            left = [p.name for p in folder.rglob("*") if p.name != ".medseg-workdir"]
            if not left:
                break
            time.sleep(0.02)
        assert not left  # nothing of them stayed
    finally:
        server.should_exit = True


def test_no_patient_identifier_reaches_the_output_the_answers_or_the_audit_log(trained_3d, tmp_path):
    """A real DICOM study through `medseg serve` as it runs (serve()'s own uvicorn settings, in its own process)
    with every logger at DEBUG reaching a handler: its patient name, id and birth date appear in no output, no API
    answer, no audit line and no file left once it stops (the DICOM SEG result carries them, as the standard
    requires, and goes with the server)."""
    import os

    from test_pacs import free_port

    study = shared_dataset("dicom_mr_study")
    files = sorted(p for p in study.rglob("*") if p.is_file() and pydicom.misc.is_dicom(p))
    series = {}
    for path in files:
        series.setdefault(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID, []).append(path)
    first = max(series.values(), key=len)
    header = pydicom.dcmread(first[0], stop_before_pixels=True)
    secrets = [str(v) for v in (header.get("PatientName"), header.get("PatientID"), header.get("PatientBirthDate"),
                                header.get("StudyInstanceUID"), header.get("SeriesDescription"))
               if v and len(str(v)) > 2]
    assert len(secrets) >= 3
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in first:
            z.write(path, f"series/{path.name}")
    work, audit, port = tmp_path / "tmp", tmp_path / "audit.jsonl", free_port()
    work.mkdir()
    script = ("import logging, sys\n"
              "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)\n"
              "from medseg.serve import Limits, serve\n"
              f"serve({str(trained_3d)!r}, port={port}, device='cpu', limits=Limits(token='t' * 32), "
              f"audit={str(audit)!r})\n")
    server = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "TMPDIR": str(work)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base, good = f"http://127.0.0.1:{port}", {"Authorization": "Bearer " + "t" * 32}
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/")
                break
            except OSError:
                time.sleep(0.1)
        status, _, job = upload(base, "series.zip", archive.read_bytes(), good)
        assert status == 202
        done = finished(base, job["id"], good)
        assert done["status"] == "done", done
        answers = json.dumps(done) + request(f"{base}/api/v1/jobs/{job['id']}", headers=good)[2].decode()
        assert request(base + done["results"]["mask.seg.dcm"], headers=good)[0] == 200
        assert request(base + done["results"]["mask.seg.dcm"])[0] == 401
    finally:
        server.terminate()
        out, err = server.communicate(timeout=60)
    assert "DEBUG:" in err  # the DEBUG lines did reach a handler
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert {"submit", "status", "result", "job"} <= {line["action"] for line in lines}
    assert {(line["action"], line["outcome"]) for line in lines} >= {("submit", 202), ("job", "done"), ("result", 401)}
    leftovers = b"".join(p.read_bytes() for p in work.rglob("*") if p.is_file())
    for secret in secrets:
        assert secret not in out + err and secret not in answers and secret not in audit.read_text()
        assert secret.encode() not in leftovers


def test_a_browser_with_the_token_in_the_address_segments(isbi_run_small, browser, tmp_path):  # noqa: F811
    from medseg.serve import Limits

    base, server = start_server(isbi_run_small[0], Limits(token="t0ken"))
    # a shared package's class name written to run script in the page: shown as text, never run
    crafted = '<img src=x onerror="window.pwned=1">'
    server.config.app.state.segmenter.models[0].class_names = ["background", crafted]
    try:
        upload_and_wait(browser, base, isbi_run_small[1], page="/#token=t0ken")
        assert "token" not in browser.current_url  # taken off the address bar once read
        assert browser.execute_script("return sessionStorage.length + localStorage.length") == 0
        assert browser.execute_script("return window.pwned") is None
        assert crafted in browser.find_element("id", "classes").text
        assert set(downloads(browser)) == {"NIfTI", "PNG"}  # fetched with the token's header
    finally:
        server.should_exit = True


@pytest.fixture
def isbi_run_small(trained_2d, phantoms_2d):
    return trained_2d, phantoms_2d / "imagesTr" / "phantom_001.png"


def test_load_200_uploads_at_concurrency_8_no_5xx_and_no_memory_growth(trained_2d, png, tmp_path):
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), str(trained_2d), str(png),
                           "--uploads", "200", "--concurrency", "8", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["server_errors"] == 0 and result["statuses"].get("202") == 200
    assert set(result["statuses"]) <= {"200", "202", "429"}  # a 429 (the new limits) is retried after Retry-After
    assert result["rss_growth"] < 0.05, result  # after warm-up, memory stays put


def test_a_server_killed_mid_job_leaves_nothing_once_started_again(trained_3d, tmp_path):
    """SIGKILL while a volume is being segmented: the upload and the job's folder stay behind, as nothing can stop
    that; the next start sweeps them (only marked folders of dead processes: a look-alike folder stays)."""
    import os
    import signal

    import nibabel as nib

    from test_pacs import free_port

    volume = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(96, 96, 96)).astype(np.float32), np.eye(4)),
             str(volume))
    work = tmp_path / "tmp"
    work.mkdir()
    (work / "medseg-serve-not-ours").mkdir()  # named like ours, no marker: never deleted
    env = {**os.environ, "TMPDIR": str(work)}

    def start():
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "medseg", "serve", str(trained_3d), "--port", str(port),
                                   "--device", "cpu"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/api/v1/model")
                return server, base
            except OSError:
                time.sleep(0.1)
        raise AssertionError("the server did not start")

    server, base = start()
    job = upload(base, volume.name, volume.read_bytes())[2]
    reached(base, job["id"], "running", "done")
    server.send_signal(signal.SIGKILL)
    server.wait()
    left = [p for p in work.rglob("*") if job["id"] in str(p) or p.name == volume.name]
    killed = [p for p in work.glob("medseg-serve-*") if p.name != "medseg-serve-not-ours"]
    assert killed, "the killed server's folder should still be there before the restart"
    again, _ = start()
    try:
        assert not any(p.exists() for p in killed) and not any(p.exists() for p in left)
        assert (work / "medseg-serve-not-ours").is_dir()
        assert len([p for p in work.glob("medseg-serve-*") if p.name != "medseg-serve-not-ours"]) == 1  # its own
    finally:
        again.terminate()
        again.wait()


def test_a_job_over_its_memory_or_time_fails_in_one_line_and_the_server_carries_on(trained_3d, phantoms_3d,
                                                                                     tmp_path):
    """Jobs run in a child process capped in address space and time (`medseg.jobs`): a volume too large for the
    cap fails in one line, and the next job is done; one over the time limit is stopped and reported."""
    import nibabel as nib

    from medseg.serve import Limits

    large = tmp_path / "large.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((320, 320, 320), np.float32), np.eye(4)), str(large))  # 131 MB as float32
    small = next((phantoms_3d / "imagesTr").iterdir())
    base, server = start_server(trained_3d, Limits(job_memory_mb=300))
    try:
        job = finished(base, upload(base, large.name, large.read_bytes())[2]["id"])
        assert job["status"] == "failed" and "--job-memory-mb" in job["error"] and "\n" not in job["error"], job
        assert finished(base, upload(base, small.name, small.read_bytes())[2]["id"])["status"] == "done"
        assert server.config.app.state.segmenter.worker.is_alive()
    finally:
        server.should_exit = True
    base, server = start_server(trained_3d, Limits(job_minutes=0.001))  # 60 ms
    try:
        job = finished(base, upload(base, large.name, large.read_bytes())[2]["id"])
        assert job["status"] == "failed" and "took longer than" in job["error"], job
    finally:
        server.should_exit = True
