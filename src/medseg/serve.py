"""`medseg serve RUN_OR_PACKAGE`: a web page to segment one image at a time and look at the result, and a REST API
for scripts.

    POST /api/v1/segment            a file (NIfTI, a zipped DICOM series, PNG/JPEG/TIFF) -> {"id", "status"}
    GET  /api/v1/jobs/{id}          status (queued, running, done, failed), progress and, when done, the links
    GET  /api/v1/jobs/{id}/FILE     image.nii.gz (what the viewer shows), mask.nii.gz, mask.png (2D),
                                    mask.seg.dcm (DICOM input), uncertainty.nii.gz
    GET  /api/v1/model              class names and colours
    GET  /docs                      the OpenAPI description (FastAPI's)

Jobs run one at a time in a background thread (the network has the cores to itself) through medseg's one
inference path, exactly as `medseg predict` runs them. Uploads and results live in a temporary folder that is
removed when the server stops. The viewer is NiiVue (BSD-2-Clause), installed from npm with a lockfile
(`npm ci --prefix src/medseg/web`, which the set-up scripts run) and served from node_modules, never copied here.
"""

import contextlib
import queue
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError

WEB = Path(__file__).resolve().parent / "web"
NIIVUE = WEB / "node_modules" / "@niivue" / "niivue" / "dist"
RESULTS = {"image.nii.gz": "application/gzip", "mask.nii.gz": "application/gzip", "mask.png": "image/png",
           "mask.seg.dcm": "application/dicom", "uncertainty.nii.gz": "application/gzip"}
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".zip")


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

    def public(self) -> dict:
        links = {name: f"/api/v1/jobs/{self.id}/{name}" for name in self.files}
        return {"id": self.id, "name": self.name, "status": self.status, "progress": self.progress,
                "error": self.error, "dims": self.dims, "results": links}


class Segmenter:
    """The loaded models and a queue of jobs worked off by one thread."""

    def __init__(self, run: str | Path, device: str = "auto"):
        from medseg.checkpoint import load_models

        self.models = load_models(run, device=device)
        self.folder = Path(tempfile.mkdtemp(prefix="medseg-serve-"))
        self.jobs: dict[str, Job] = {}
        self.queue: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()

    def submit(self, name: str, data: bytes) -> Job:
        if not name.lower().endswith(IMAGE_SUFFIXES):
            raise MedsegError(f"{name}: upload a NIfTI (.nii, .nii.gz), a zipped DICOM series (.zip) or a 2D image "
                              f"({', '.join(IMAGE_SUFFIXES[2:-1])})")
        job = Job(uuid.uuid4().hex, self.folder / uuid.uuid4().hex, Path(name).name)
        job.folder.mkdir()
        (job.folder / job.name).write_bytes(data)
        self.jobs[job.id] = job
        self.queue.put(job)
        return job

    def _work(self) -> None:
        while True:
            job = self.queue.get()
            job.status = "running"
            try:
                self._segment(job)
                job.status, job.progress = "done", 1.0
            except MedsegError as exc:
                job.status, job.error = "failed", str(exc).replace(str(job.folder) + "/", "")
            except Exception as exc:  # a bug: the job says so, the server keeps serving
                job.status, job.error = "failed", f"internal error ({type(exc).__name__}: {exc})"

    def _segment(self, job: Job) -> None:
        from medseg.data import check_finite
        from medseg.infer import predict_image, uncertainty
        from medseg.io import read_image, save_nifti, write_mask

        source = _unpacked(job.folder / job.name)
        job.progress = 0.1
        image = read_image(source, color=self.models[0].config.color)
        check_finite(image)
        job.progress, job.dims = 0.2, image.ndim
        labels, probs = predict_image(self.models, image, with_probabilities=True)
        job.progress = 0.8
        entropy = uncertainty(probs, bool(self.models[0].config.regions))
        names = self.models[0].class_names
        out = job.folder / "results"
        affine = image.affine
        if image.ndim == 3:
            write_mask(labels, image, out / "mask.nii.gz", len(names))
            save_nifti(image.array[0], affine, out / "image.nii.gz")
        else:
            write_mask(labels, image, out / "mask.png", len(names))
            # the viewer reads NIfTI: a 2D image becomes one slice, columns along x and rows along y (top row up)
            affine = np.diag([1.0, -1.0, 1.0, 1.0])
            save_nifti(_display_plane(image.array), affine, out / "image.nii.gz")
            save_nifti(labels.T[:, :, None].astype(np.uint8), affine, out / "mask.nii.gz")
            entropy = entropy.T[:, :, None]
        save_nifti(entropy.astype(np.float32), affine, out / "uncertainty.nii.gz")
        if image.meta.get("format") == "dicom":
            from medseg.dicom_seg import run_segment_codes, write_dicom_seg

            write_dicom_seg(labels, image, names, out / "mask.seg.dcm",
                            codes=run_segment_codes(self.models[0].run))
        job.files = sorted(p.name for p in out.iterdir())

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


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


def _display_plane(array: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (W, H, 1) grey for the viewer (colour images shown as their luminance)."""
    grey = array.mean(0) if array.shape[0] > 1 else array[0]
    return grey.T[:, :, None].astype(np.float32)


def create_app(run: str | Path, device: str = "auto"):
    """The FastAPI application for RUN (a run, ensemble or package)."""
    try:
        from fastapi import FastAPI, File, HTTPException, UploadFile
        from fastapi.responses import FileResponse, HTMLResponse
        from fastapi.staticfiles import StaticFiles
    except ImportError as exc:
        raise MedsegError("medseg serve needs fastapi, uvicorn and python-multipart: pip install 'medseg[serve]'") \
            from exc
    if not (NIIVUE / "index.js").exists():
        raise MedsegError(f"{NIIVUE}: the viewer library (NiiVue, from npm) is not installed; run 'npm ci --prefix "
                          f"{WEB}' (scripts/env.sh does when npm is present)")
    segmenter = Segmenter(run, device)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        segmenter.close()  # uploads and results go with the server

    app = FastAPI(title="medseg", description="Segment images with a trained medseg model", version="1",
                  lifespan=lifespan)
    app.state.segmenter = segmenter
    app.mount("/static/niivue", StaticFiles(directory=NIIVUE), name="niivue")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return (WEB / "index.html").read_text()

    @app.get("/app.js", include_in_schema=False)
    def script() -> FileResponse:
        return FileResponse(WEB / "app.js", media_type="text/javascript")

    @app.get("/api/v1/model")
    def model() -> dict:
        from medseg.package import class_colours

        names = segmenter.models[0].class_names
        return {"class_names": names, "colours": class_colours(names), "members": len(segmenter.models)}

    @app.post("/api/v1/segment", status_code=202)
    async def segment(file: UploadFile = File(...)) -> dict:
        try:
            job = segmenter.submit(file.filename or "upload", await file.read())
        except MedsegError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return job.public()

    @app.get("/api/v1/jobs/{job_id}")
    def job_status(job_id: str) -> dict:
        return _job(job_id).public()

    @app.get("/api/v1/jobs/{job_id}/{name}")
    def result(job_id: str, name: str) -> FileResponse:
        job = _job(job_id)
        if name not in RESULTS or name not in job.files:
            raise HTTPException(status_code=404, detail=f"{name}: not a result of job {job_id}")
        stem = Path(job.name).name.split(".")[0]
        return FileResponse(job.folder / "results" / name, media_type=RESULTS[name], filename=f"{stem}_{name}")

    def _job(job_id: str) -> Job:
        if job_id not in segmenter.jobs:
            raise HTTPException(status_code=404, detail=f"no job {job_id}")
        return segmenter.jobs[job_id]

    return app


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto") -> None:
    import uvicorn

    app = create_app(run, device)
    print(f"medseg serve: http://{host}:{port}/ (API description at /docs); Ctrl-C stops it", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
