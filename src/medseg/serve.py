"""`medseg serve RUN_OR_PACKAGE`: a web page to segment one image at a time and look at the result, and a REST API
for scripts.

    POST /api/v1/segment            a file (NIfTI, a zipped DICOM series, PNG/JPEG/TIFF) -> {"id", "status"}
    GET  /api/v1/jobs/{id}          status (queued, running, done, failed), progress and, when done, the links
    GET  /api/v1/jobs/{id}/FILE     image.nii.gz (what the viewer shows), mask.nii.gz, mask.png (2D),
                                    mask.seg.dcm (DICOM input), uncertainty.nii.gz
    GET  /api/v1/model              class names and colours
    GET  /openapi.json              the OpenAPI description

Jobs run one at a time (the network has the cores to itself) in a child process capped in memory and time
(`medseg.jobs`), through medseg's one inference path, exactly as `medseg predict` runs them. The viewer is NiiVue (BSD-2-Clause), installed from npm with
a lockfile (`npm ci --prefix src/medseg/web`, which the set-up scripts run) and served from node_modules, never
copied here.

Safety (`Limits`, `check_exposure`): the server listens on 127.0.0.1 unless told otherwise, and elsewhere only
with a token of at least 128 bits (an empty token is refused anywhere). With a token, every API call, results
included, needs `Authorization: Bearer TOKEN` (RFC 6750; 401 without it); the page keeps the token in memory only
and downloads through `fetch` with the header, so job ids never enter an address a browser keeps. Requests naming
another Host get 400 (DNS rebinding); every answer carries `Cache-Control: no-store`, a strict Content-Security-
Policy (no inline script or style, no framing), `nosniff` and `no-referrer`; there is no `/docs` page (FastAPI's
loads Swagger UI from a CDN), only `/openapi.json`. Uploads over the size limit get 413, files whose content is
not what their name says 415, and a full queue 429 with Retry-After. Before a job is queued its headers are
checked as every reader checks them (`medseg.limits`): an image declaring more voxels than the limit, or more
than its file can hold, gets 413 (a damaged one 422), and nothing of it stays. A finished job keeps only its
results (the upload and an unpacked series are deleted at once), and its results go after `keep_minutes`;
everything goes when the server stops. Nothing about an upload is logged: errors name the uploaded file's own
name only, never a path or a DICOM attribute.
"""

import contextlib
import queue
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


from medseg import workdirs
from medseg.audit import AuditLog, action_of
from medseg.gate import Gate
from medseg.guard import SECURITY_HEADERS, check_exposure, host_names, host_of, token_id
from medseg.guard import authorised as token_ok
from medseg.errors import MedsegError, TooLarge
from medseg.io import check_header
from medseg.jobs import JobRunner

WEB = Path(__file__).resolve().parent / "web"
NIIVUE = WEB / "node_modules" / "@niivue" / "niivue" / "dist"
RESULTS = {"image.nii.gz": "application/gzip", "mask.nii.gz": "application/gzip", "mask.png": "image/png",
           "mask.seg.dcm": "application/dicom", "uncertainty.nii.gz": "application/gzip"}
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".zip")


@dataclass
class Limits:
    token: str | None = None  # bearer token for submitting and following jobs (None: no token asked)
    max_upload_mb: float = 1024.0  # 413 above
    max_queued: int = 8  # jobs waiting at once; 429 above
    keep_minutes: float = 60.0  # a finished job's results are deleted after this
    max_uploads: int = 4  # uploads arriving at once; 429 above (each may be max_upload_mb on disk)
    uploads_per_minute: float = 120.0  # per client address, in bursts of up to 20; 429 with Retry-After above
    max_disk_mb: float | None = None  # uploads in progress on disk at once; 507 above (default: twice max_upload_mb)
    job_memory_mb: float = 8192.0  # a job's process may grow this far beyond the loaded models (RLIMIT_AS)
    job_minutes: float = 30.0  # a job running longer is stopped and reported failed


class Refused(MedsegError):
    """A request the service turns down, with the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    id: str
    folder: Path
    name: str
    status: str = "queued"
    progress: float = 0.0
    error: str | None = None
    files: list[str] = field(default_factory=list)
    dims: int | None = None
    finished: float | None = None  # time.monotonic() when it ended
    source: Path | None = None  # the upload, or the series folder unpacked from it

    def public(self) -> dict:
        links = {name: f"/api/v1/jobs/{self.id}/{name}" for name in self.files}
        return {"id": self.id, "name": self.name, "status": self.status, "progress": self.progress,
                "error": self.error, "dims": self.dims, "results": links}


class Segmenter:
    """The loaded models and a queue of jobs worked off by one thread."""

    def __init__(self, run: str | Path, device: str = "auto", limits: Limits | None = None,
                 audit: AuditLog | None = None):
        from medseg.checkpoint import load_models

        self.models = load_models(run, device=device)
        self.limits = limits or Limits()
        self.audit = audit or AuditLog(None)
        self.runner = JobRunner(run, device, self.limits.job_memory_mb, self.limits.job_minutes)
        self.folder = workdirs.make("serve")  # and what a killed server left is swept first
        self.jobs: dict[str, Job] = {}
        self.queue: queue.Queue[Job] = queue.Queue(self.limits.max_queued)
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()

    def submit(self, name: str, data: bytes) -> Job:
        name = Path(name).name
        if not name.lower().endswith(IMAGE_SUFFIXES):
            raise Refused(400, f"{name}: upload a NIfTI (.nii, .nii.gz), a zipped DICOM series (.zip) or a 2D image "
                               f"({', '.join(IMAGE_SUFFIXES[2:-1])})")
        if len(data) > self.limits.max_upload_mb * 2**20:
            raise Refused(413, f"{name}: {len(data) / 2**20:.0f} MB, over this server's {self.limits.max_upload_mb:g} "
                               "MB limit")
        check_content(name, data)
        if self.queue.full():
            raise Refused(429, f"{self.limits.max_queued} jobs are waiting already; try again shortly")
        job = Job(secrets.token_hex(16), self.folder / secrets.token_hex(16), name)
        job.folder.mkdir()
        (job.folder / job.name).write_bytes(data)
        try:  # the headers checked before the job is queued: a bomb is turned down here, not in the worker
            job.source = _unpacked(job.folder / job.name)
            check_header(job.source)
        except MedsegError as exc:
            shutil.rmtree(job.folder, ignore_errors=True)
            raise Refused(413 if isinstance(exc, TooLarge) else 422,
                          str(exc).replace(str(job.folder) + "/", "")) from None
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            shutil.rmtree(job.folder, ignore_errors=True)
            raise Refused(429, f"{self.limits.max_queued} jobs are waiting already; try again shortly") from None
        self.jobs[job.id] = job
        return job

    def _work(self) -> None:
        while True:
            try:
                job = self.queue.get(timeout=10)
            except queue.Empty:
                self._expire()
                continue
            job.status, started = "running", time.monotonic()
            try:
                self._segment(job)
                job.status, job.progress = "done", 1.0
            except MedsegError as exc:
                job.status, job.error = "failed", str(exc).replace(str(job.folder) + "/", "")
            except Exception as exc:  # a bug: the job says so (its type only: the text may quote the upload)
                job.status, job.error = "failed", f"internal error ({type(exc).__name__})"
            finally:
                job.finished = time.monotonic()
                with contextlib.suppress(Exception):  # a failed clean-up must not end the worker (_expire retries)
                    _keep_only_results(job)
                self.audit.record(job=job.id, action="job", outcome=job.status,
                                  seconds=round(job.finished - started, 3))
            self._expire()

    def _expire(self) -> None:
        """Forget jobs finished more than keep_minutes ago, with their results."""
        cutoff = time.monotonic() - self.limits.keep_minutes * 60
        for job in [j for j in list(self.jobs.values()) if j.finished is not None and j.finished < cutoff]:
            shutil.rmtree(job.folder, ignore_errors=True)
            self.jobs.pop(job.id, None)

    def _segment(self, job: Job) -> None:
        """Run the job in the job process (`medseg.jobs`): bounded in memory and time, replaced if it dies."""
        result = self.runner.segment(job.source, job.folder / "results", lambda f: setattr(job, "progress", f))
        job.files, job.dims = result["files"], result["dims"]

    def close(self) -> None:
        self.runner.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def _keep_only_results(job: Job) -> None:
    """Delete what was uploaded (and an unpacked series) once a job has ended: only its results stay."""
    for item in job.folder.iterdir():
        if item.is_dir() and item.name != "results":
            shutil.rmtree(item, ignore_errors=True)
        elif item.is_file():
            item.unlink(missing_ok=True)


def check_content(name: str, data: bytes) -> None:
    """Refuse (415) an upload whose first bytes are not those of the format its name says."""
    lower = name.lower()
    if lower.endswith((".nii.gz", ".nii")):
        header = _gunzip_head(data, 348) if lower.endswith(".gz") else data[:348]
        ok = header[344:347] in (b"n+1", b"ni1") or header[4:7] == b"n+2"  # NIfTI-1 or NIfTI-2 magic
    elif lower.endswith(".png"):
        ok = data.startswith(b"\x89PNG\r\n\x1a\n")
    elif lower.endswith((".jpg", ".jpeg")):
        ok = data.startswith(b"\xff\xd8\xff")
    elif lower.endswith((".tif", ".tiff")):
        ok = data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    elif lower.endswith(".bmp"):
        ok = data.startswith(b"BM")
    else:  # .zip
        ok = data.startswith(b"PK\x03\x04")
    if not ok:
        raise Refused(415, f"{name}: its content is not a {name.rsplit('.', 1)[-1].upper()} file; upload the file "
                           "itself, named as what it is")


def _gunzip_head(data: bytes, size: int) -> bytes:
    """The first `size` bytes of gzip-compressed `data`, without inflating the rest (b"" if it is not gzip)."""
    import zlib

    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, size)
    except zlib.error:
        return b""


def _unpacked(path: Path) -> Path:
    """A zipped DICOM series becomes its folder (the one holding the files); anything else stays as it is."""
    if path.suffix.lower() != ".zip":
        return path
    from medseg.io import extract_zip

    target = extract_zip(path, path.parent / "series")
    folders = sorted({p.parent for p in target.rglob("*") if p.is_file()})
    if len(folders) != 1:
        raise MedsegError(f"{path.name}: the archive should hold one DICOM series (one folder of slices), and holds "
                          f"files in {len(folders)} folders")
    return folders[0]


def create_app(run: str | Path, device: str = "auto", limits: Limits | None = None,
               hosts: set[str] | None = None, audit: str | Path | None = None):
    """The FastAPI application for RUN (a run, ensemble or package), within `limits`, answering requests whose
    Host is one of `hosts` (default: the loopback names), recording each call in the `audit` log (JSON lines)."""
    try:
        from fastapi import Depends, FastAPI, File, Header, HTTPException, Request, UploadFile
        from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
        from fastapi.staticfiles import StaticFiles
    except ImportError as exc:
        raise MedsegError("medseg serve needs fastapi, uvicorn and python-multipart: pip install 'medseg[serve]'") \
            from exc
    if not (NIIVUE / "index.js").exists():
        raise MedsegError(f"{NIIVUE}: the viewer library (NiiVue, from npm) is not installed; run 'npm ci --prefix "
                          f"{WEB}' (scripts/env.sh does when npm is present)")
    check_exposure("127.0.0.1", (limits or Limits()).token)  # an empty token is refused wherever it listens
    log = AuditLog(audit)
    segmenter = Segmenter(run, device, limits, log)
    limits = segmenter.limits
    hosts = hosts or host_names("127.0.0.1")

    def authorised(authorization: str | None = Header(None)) -> None:
        if not token_ok(authorization, limits.token):
            raise HTTPException(status_code=401, detail="this server needs its token: Authorization: Bearer TOKEN "
                                "(in the browser, open the page as /#token=TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        segmenter.close()  # uploads and results go with the server

    # no /docs: FastAPI's pages load Swagger UI from a CDN into this origin; the description is /openapi.json
    app = FastAPI(title="medseg", description="Segment images with a trained medseg model", version="1",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.segmenter = segmenter
    app.mount("/static/niivue", StaticFiles(directory=NIIVUE), name="niivue")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Requests for another host are turned away (DNS rebinding), and every answer carries SECURITY_HEADERS
        (uploads were let through by `medseg.gate.Gate` first)."""
        declared, started = request.headers.get("content-length"), time.monotonic()
        if host_of(request.headers.get("host", "")) not in hosts:
            answer = JSONResponse({"detail": "unknown host: open this server by its own name or address "
                                             "(--allowed-host adds one)"}, status_code=400)
        else:
            answer = await call_next(request)
        answer.headers.update(SECURITY_HEADERS)
        action, job_id = action_of(request.url.path)
        if action != "page":
            sent = answer.headers.get("content-length")
            log.record(client=request.client.host if request.client else None,
                       token_id=token_id(request.headers.get("authorization")),
                       job=job_id or getattr(request.state, "job_id", None), action=action,
                       outcome=answer.status_code, bytes_in=int(declared) if declared and declared.isdigit() else None,
                       bytes_out=int(sent) if sent and sent.isdigit() else None,
                       seconds=round(time.monotonic() - started, 3))
        return answer

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return (WEB / "index.html").read_text()

    @app.get("/app.js", include_in_schema=False)
    def script() -> FileResponse:
        return FileResponse(WEB / "app.js", media_type="text/javascript")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        """For a load balancer or container health check: 200 while the worker runs, 503 once it has stopped."""
        alive = segmenter.worker.is_alive()
        return JSONResponse({"worker": "alive" if alive else "stopped", "queued": segmenter.queue.qsize()},
                            status_code=200 if alive else 503)

    @app.get("/app.css", include_in_schema=False)
    def style() -> FileResponse:
        return FileResponse(WEB / "app.css", media_type="text/css")

    @app.get("/api/v1/model", dependencies=[Depends(authorised)])
    def model() -> dict:
        from medseg.package import class_colours

        names = segmenter.models[0].class_names
        return {"class_names": names, "colours": class_colours(names), "members": len(segmenter.models)}

    @app.post("/api/v1/segment", status_code=202, dependencies=[Depends(authorised)])
    async def segment(request: Request, file: UploadFile = File(...)) -> dict:
        data = await file.read(int(limits.max_upload_mb * 2**20) + 1)  # one byte over says it is too large
        try:
            job = segmenter.submit(file.filename or "upload", data)
        except Refused as exc:
            headers = {"Retry-After": "5"} if exc.status == 429 else None
            raise HTTPException(status_code=exc.status, detail=str(exc), headers=headers) from exc
        request.state.job_id = job.id  # for the audit log
        return job.public()

    @app.get("/api/v1/jobs/{job_id}", dependencies=[Depends(authorised)])
    def job_status(job_id: str) -> dict:
        return _job(job_id).public()

    @app.get("/api/v1/jobs/{job_id}/{name}", dependencies=[Depends(authorised)])
    def result(job_id: str, name: str) -> FileResponse:
        job = _job(job_id)
        if name not in RESULTS or name not in job.files:
            raise HTTPException(status_code=404, detail=f"{name}: not a result of job {job_id}")
        stem = Path(job.name).name.split(".")[0]
        return FileResponse(job.folder / "results" / name, media_type=RESULTS[name], filename=f"{stem}_{name}")

    def _job(job_id: str) -> Job:
        if job_id not in segmenter.jobs:
            raise HTTPException(status_code=404, detail="no such job (or its results have expired)")
        return segmenter.jobs[job_id]

    body_limit = int(limits.max_upload_mb * 2**20) + 2**16  # room for the form's own lines
    return Gate(app, limits.token, body_limit, segmenter.queue.full, segmenter.folder, log, limits.max_uploads,
                int(limits.max_disk_mb * 2**20) if limits.max_disk_mb else None, limits.uploads_per_minute)


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          limits: Limits | None = None, allowed_hosts: tuple[str, ...] = (), tls_cert: str | None = None,
          tls_key: str | None = None, audit: str | Path | None = None) -> None:
    check_exposure(host, (limits or Limits()).token)
    if bool(tls_cert) != bool(tls_key):
        raise MedsegError("--tls-cert and --tls-key go together: the certificate (chain) and its private key")
    try:
        import uvicorn
    except ImportError as exc:
        raise MedsegError("medseg serve needs fastapi, uvicorn and python-multipart: pip install 'medseg[serve]'") \
            from exc
    app = create_app(run, device, limits, host_names(host, allowed_hosts), audit)
    scheme = "https" if tls_cert else "http"
    page = f"{scheme}://{host}:{port}/" + ("#token=TOKEN" if limits and limits.token else "")
    print(f"medseg serve: {page} (API description at /openapi.json); Ctrl-C stops it", flush=True)
    # no access log: request lines carry job ids, which are the keys to results
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, ssl_certfile=tls_cert,
                ssl_keyfile=tls_key)
