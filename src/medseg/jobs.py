"""The service's jobs, each run in a child process that the server can bound and replace.

A scan that needs more memory than the machine has must not take the server with it, and one that hangs must not
hold the queue for ever. So the models are loaded once more in a child process whose address space is capped
(RLIMIT_AS: its size once the models are loaded, plus `memory_mb`), and each job is sent to it with a time limit.
A job that runs out of memory fails in one line and the child carries on; a child that dies (the OOM killer, a
crash) or overruns the time limit is killed, the job reported failed, and a new child started for the next job.
"""
from __future__ import annotations

import logging
import multiprocessing
import resource
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError

START_SECONDS = 300  # loading the models in the child


def segment_job(models: list, source: Path, out: Path, progress=lambda fraction: None) -> dict:
    """Segment `source` (a file or a series folder) into `out`: the mask, the image and the uncertainty as the
    viewer reads them (NIfTI), a PNG mask for 2D input, a DICOM SEG for a DICOM series. Returns the files and the
    image's dimensions."""
    from medseg.data import check_finite
    from medseg.infer import predict_image, uncertainty
    from medseg.io import read_image, save_nifti, write_mask

    progress(0.1)
    image = read_image(source, color=models[0].config.color)
    check_finite(image)
    progress(0.2)
    labels, probs = predict_image(models, image, with_probabilities=True)
    progress(0.8)
    entropy = uncertainty(probs, bool(models[0].config.regions))
    names = models[0].class_names
    affine = image.affine
    if image.ndim == 3:
        write_mask(labels, image, out / "mask.nii.gz", len(names))
        save_nifti(image.array[0], affine, out / "image.nii.gz")
    else:
        write_mask(labels, image, out / "mask.png", len(names))
        # the viewer reads NIfTI: a 2D image becomes one slice, columns along x and rows along y (top row up)
        affine = np.diag([1.0, -1.0, 1.0, 1.0])
        save_nifti(_display_plane(image.array), affine, out / "image.nii.gz")
        save_nifti(labels.T[:, :, None], affine, out / "mask.nii.gz")
        entropy = entropy.T[:, :, None]
    save_nifti(entropy.astype(np.float32), affine, out / "uncertainty.nii.gz")
    if image.meta.get("format") == "dicom":
        from medseg.dicom_seg import run_segment_codes, write_dicom_seg

        write_dicom_seg(labels, image, names, out / "mask.seg.dcm", codes=run_segment_codes(models[0].run))
    return {"files": sorted(p.name for p in out.iterdir()), "dims": image.ndim}


def _display_plane(array: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (W, H, 1) grey for the viewer (colour images shown as their luminance)."""
    grey = array.mean(0) if array.shape[0] > 1 else array[0]
    return grey.T[:, :, None].astype(np.float32)


class JobRunner:
    """Runs `segment_job` in a child process with a memory cap and a per-job time limit."""

    def __init__(self, run: str | Path, device: str, memory_mb: float, timeout_minutes: float):
        self.run, self.device, self.memory_mb, self.timeout = str(run), device, memory_mb, timeout_minutes * 60
        self.context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or locks inherited
        self.process = self.connection = None

    def segment(self, source: Path, out: Path, progress=lambda fraction: None) -> dict:
        if self.process is None or not self.process.is_alive():
            self._start()
        self.connection.send((str(source), str(out)))
        while True:
            if not self.connection.poll(self.timeout):
                self.stop()
                raise MedsegError(f"the job took longer than {self.timeout / 60:g} minutes (--job-minutes) and was "
                                  "stopped")
            try:
                kind, value = self.connection.recv()
            except (EOFError, OSError):
                code = self.process.exitcode if self.process else None
                self.stop()
                raise MedsegError(f"the job ended its process (exit {code}: out of memory, or a crash); the server "
                                  "carries on") from None
            if kind == "progress":
                progress(value)
            elif kind == "done":
                return value
            else:
                raise MedsegError(value)

    def _start(self) -> None:
        self.connection, child = self.context.Pipe()
        level = logging.getLogger().getEffectiveLevel()  # the server's logging, in the child too
        self.process = self.context.Process(target=_child, args=(child, self.run, self.device, self.memory_mb, level),
                                            daemon=True, name="medseg-job")
        self.process.start()
        child.close()
        if not self.connection.poll(START_SECONDS):
            self.stop()
            raise MedsegError("the job process did not start")
        kind, value = self.connection.recv()
        if kind != "ready":
            self.stop()
            raise MedsegError(value)

    def stop(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join(10)
        self.process = None


def _child(connection, run: str, device: str, memory_mb: float, level: int = logging.WARNING) -> None:
    """The job process: load the models, cap the address space, then segment what arrives, one job at a time."""
    if level < logging.WARNING:
        logging.basicConfig(level=level)
    try:
        from medseg.checkpoint import load_models

        models = load_models(run, device=device)
        _warm_up()  # the thread pool's stacks and arenas are reserved now, inside what the cap starts from
        if memory_mb:
            size = _address_space_bytes()
            cap = size + int(memory_mb * 2**20)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        connection.send(("ready", None))
    except Exception as exc:  # noqa: BLE001  (reported to the server in one line)
        connection.send(("error", f"the job process could not load the model ({type(exc).__name__})"))
        return
    while True:
        try:
            source, out = connection.recv()
        except (EOFError, OSError):
            return
        try:
            result = segment_job(models, Path(source), Path(out), lambda f: connection.send(("progress", f)))
            connection.send(("done", result))
        except MedsegError as exc:
            connection.send(("error", str(exc)))
        except Exception as exc:  # noqa: BLE001  (a bug: its type only, the text may quote the upload)
            out_of_memory = isinstance(exc, MemoryError) or "allocate memory" in str(exc) or \
                "out of memory" in str(exc).lower()  # NumPy's MemoryError; PyTorch's CPU allocator's RuntimeError
            connection.send(("error", f"the image needs more memory than this server gives a job ({memory_mb:g} MB "
                                      "beyond the model; --job-memory-mb)" if out_of_memory else
                             f"internal error ({type(exc).__name__})"))


def _warm_up() -> None:
    try:
        import torch
    except ImportError:  # a package predicting with onnxruntime alone
        return
    torch.nn.functional.conv2d(torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 3, 3))


def _address_space_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0
