"""Predict masks for files or folders with a trained run: one mask per input, same name, format and geometry."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg.console import show_bars
from medseg.data import check_finite, read_case_image
from medseg.errors import MedsegError
from medseg.infer import predict_image, uncertainty
from medseg.io import is_dicom_folder, is_supported, mask_path_for, read_image, stem_of, write_mask
from medseg.figures import save_overlay_png


def collect_inputs(inputs: list[str | Path]) -> list[Path]:
    """Expand folders to their supported files and DICOM series (sorted); every input must exist before anything
    is written. A folder of DICOM files is one input (a series); a folder of series folders gives one each."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if is_dicom_folder(item):
            files.append(item)
        elif item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and is_supported(p) or is_dicom_folder(p))
            if not found:
                raise MedsegError(f"{item}: folder holds no supported images or DICOM series")
            files += found
        elif item.is_file():
            if not is_supported(item):
                raise MedsegError(f"{item}: unsupported file type")
            files.append(item)
        else:
            raise MedsegError(f"{item}: not found; check the path")
    return files


def _is_channel_file(path: Path, channels: int) -> bool:
    return channels > 1 and path.is_file() and re.fullmatch(r".+_\d{4}", stem_of(path)) is not None


def group_channels(files: list[Path], channels: int) -> list[list[Path]]:
    """Inputs as the model needs them: one file each, or, for a multi-channel model, nnU-Net channel files
    `<case>_0000`, `<case>_0001`, ... grouped into one input per case (a single multi-channel file stays alone)."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        stem = stem_of(path)
        if _is_channel_file(path, channels):
            groups.setdefault(str(path.parent / stem[:-5]), []).append(path)
        else:
            groups[str(path)] = [path]
    for key, group in groups.items():
        if _is_channel_file(group[0], channels) and len(group) != channels:
            raise MedsegError(f"{key}: {len(group)} channel files, the model expects {channels} (_0000 to "
                              f"_{channels - 1:04d})")
    return [sorted(group) for group in groups.values()]


class SomeInputsFailed(MedsegError):
    """Raised after every good input was written: `written` holds their masks, `failed` (input, reason) pairs."""

    def __init__(self, written: list[Path], failed: list[tuple[Path, str]]):
        self.written, self.failed = written, failed
        super().__init__(f"{len(failed)} of {len(written) + len(failed)} inputs could not be segmented (first: "
                         f"{failed[0][1]}); the masks of the other {len(written)} were written")

    def lines(self) -> list[str]:
        """One line per broken input, naming it and what is wrong."""
        return [reason if str(path) in reason else f"{path}: {reason}" for path, reason in self.failed]


def predict_files(run: str | Path, inputs: list[str | Path], out: str | Path, overlays: bool = False,
                  device: str = "auto", progress: bool = True, series: str | None = None,
                  strict: bool = False, overwrite: bool = False, engine: str = "auto", fmt: str = "auto",
                  with_uncertainty: bool = False, workers: int = 1,
                  shard: tuple[int, int] | None = None, threads: int | None = None) -> list[Path]:
    """Write a mask for every input into `out` (and `out/overlays/NAME.png` when asked); return the mask paths.

    A broken input (unreadable, wrong channels, NaN voxels) does not stop the others: once every good input is
    written, `SomeInputsFailed` names the broken ones with their reasons (`strict`: the first one raises at once).
    A mask already in `out` is replaced only with `overwrite`. RUN may also be a model package (`medseg export`);
    `engine` "auto" runs the networks in PyTorch and, on a CPU, compiles an input shape once the eager work on it
    would pay for the compile (medseg.compiling.AdaptiveNetwork; a package exported with --onnx runs in
    onnxruntime where PyTorch is missing), "torch" always eagerly, "onnxruntime" as ONNX (the package's, or
    exported on the spot), "compiled" with torch.compile and frozen weights from the first input.
    `fmt`: auto (the input's format; NIfTI for DICOM series), nifti, png, npz (probabilities) or dicom-seg (DICOM
    series inputs); `with_uncertainty` also writes NAME_uncertainty (entropy of the mean probability) beside each
    result.
    series: which DICOM series to read where a folder holds several (UID or description). RUN may be a
    cross-validation folder (`fold_0`, `fold_1`, ...): the folds are ensembled. `workers` > 1 predicts in that many
    processes, sharing the cores; `shard` (i, n) takes the i-th of n deterministic shares of the inputs, so that n
    machines (a Slurm array, a Kubernetes job) cover every input exactly once. `threads`: for the networks
    (default: PyTorch's setting, or every core where PyTorch is not loaded).
    """
    engine = _resolved(engine)  # once, so that worker processes run the engine chosen here
    models = _models(run, device, engine, threads or _threads())
    inputs_ = group_channels(collect_inputs(inputs), models[0].in_channels)
    targets = mask_targets(inputs_, out, fmt)  # every input's, so each shard refuses a clash alike
    jobs = [(group, target, out, overlays, series, fmt, with_uncertainty)
            for group, target in shard_of(list(zip(inputs_, targets)), shard)]
    refuse_existing([job[1] for job in jobs], overwrite)
    written, failed = [], []
    if workers > 1 and len(jobs) > 1:
        results = _in_workers(jobs, run, device, engine, min(workers, len(jobs)))
    else:
        results = (_predict_job(models, job) for job in jobs)
    for source, path, error in tqdm(results, total=len(jobs), desc="predicting", disable=not show_bars(progress),
                                    leave=False):
        if error is None:
            written.append(path)
        elif strict:
            raise MedsegError(error)
        else:
            failed.append((source, error))
    if failed:
        raise SomeInputsFailed(written, failed)
    return written


def shard_of(items: list, shard: tuple[int, int] | None) -> list:
    """The i-th of n shares of (input group, target) pairs: every n-th in the order of the inputs' paths, so the
    share depends only on the set of inputs, never on the order they were named in."""
    if shard is None:
        return items
    index, count = shard
    if not 0 <= index < count:
        raise MedsegError(f"--shard {index}/{count}: need 0 <= I < N")
    ordered = sorted(items, key=lambda item: str(item[0][0]))
    return [item for position, item in enumerate(ordered) if position % count == index]


def _threads() -> int:
    """Threads the networks may use: PyTorch's setting where PyTorch is loaded, else every core."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch else (os.cpu_count() or 1)


def _models(run, device: str, engine: str, threads: int) -> list:
    """The networks of RUN under `engine`; a package exported with --onnx runs under onnxruntime without
    PyTorch (other runs are exported to ONNX on the spot, which needs it)."""
    from medseg.onnx_engine import ENGINES, load_onnx_models, use_onnxruntime

    if engine not in ENGINES:
        raise MedsegError(f"--engine {engine}: choose from {', '.join(ENGINES)}")
    if engine == "onnxruntime":
        models = load_onnx_models(run, threads)
        if models is not None:
            return models
    try:
        from medseg.checkpoint import load_models
    except ImportError as exc:
        raise MedsegError(f"{run}: PyTorch is not installed, and only a model package exported with --onnx predicts "
                          "without it ('medseg export RUN --out model.zip --onnx', then --engine onnxruntime)") from exc

    models = load_models(run, device=device)
    if engine in ("auto", "compiled"):
        from medseg.compiling import adapt_for_inference, freeze_for_inference

        return adapt_for_inference(models) if engine == "auto" else freeze_for_inference(models)
    return use_onnxruntime(models, threads) if engine == "onnxruntime" else models


def _resolved(engine: str) -> str:
    """`auto` is onnxruntime where PyTorch is not installed (a package exported with --onnx needs none)."""
    import importlib.util

    return "onnxruntime" if engine == "auto" and importlib.util.find_spec("torch") is None else engine


def _predict_job(models: list, job: tuple) -> tuple[Path, Path | None, str | None]:
    """(input, written path, None), or (input, None, the one-line reason) for an input that cannot be segmented."""
    group = job[0]
    try:
        return group[0], _predict_one(models, *job), None
    except MedsegError as exc:
        return group[0], None, str(exc)


_WORKER: dict = {}  # a worker process's models, loaded once by `_start_worker`


def _start_worker(run: str, device: str, engine: str, threads: int) -> None:
    if engine != "onnxruntime":
        import torch

        torch.set_num_threads(threads)
    _WORKER["models"] = _models(run, device, engine, threads)


def _in_worker(job: tuple):
    return _predict_job(_WORKER["models"], job)


def _in_workers(jobs: list, run, device: str, engine: str, workers: int):
    """Results of `jobs` in input order from `workers` processes, each with its share of the cores."""
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = multiprocessing.get_context("spawn").Pool(workers, _start_worker, (str(run), device, engine, threads))
    try:
        yield from pool.imap(_in_worker, jobs)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


FORMATS = {"auto": None, "nifti": ".nii.gz", "png": ".png", "npz": ".npz", "dicom-seg": ".seg.dcm"}


def output_path(group: list[Path], out: str | Path, fmt: str = "auto") -> Path:
    """Where an input's result goes: auto keeps the input's name and format (`mask_path_for`), other formats
    keep the name with their own suffix; channel files `<case>_0000...` are named after the case."""
    target = mask_path_for(group[0], out)
    if len(group) > 1:  # channel files: the mask is named after the case, without _0000
        target = target.with_name(target.name.replace(stem_of(group[0]), stem_of(group[0])[:-5], 1))
    if fmt not in FORMATS:
        raise MedsegError(f"--format {fmt}: choose from {', '.join(FORMATS)}")
    return target if FORMATS[fmt] is None else target.with_name(stem_of(target) + FORMATS[fmt])


def mask_targets(inputs: list[list[Path]], out: str | Path, fmt: str = "auto") -> list[Path]:
    """The mask each input gets in `out`; refuses, before anything is written, a mask that would land on an input
    or two inputs that would write the same mask."""
    if Path(out).exists() and not Path(out).is_dir():
        raise MedsegError(f"{out}: --out is a file, not a folder; masks go into a folder")
    targets: list[Path] = []
    originals = {path.resolve() for group in inputs for path in group}
    for group in inputs:
        target = output_path(group, out, fmt)
        if target.resolve() in originals:
            raise MedsegError(f"{target}: the mask would overwrite an input file; choose another --out")
        if target in targets:
            raise MedsegError(f"{group[0]}: another input also writes {target.name}; predict them into separate "
                              "folders")
        targets.append(target)
    return targets


def refuse_existing(targets: list[Path], overwrite: bool) -> None:
    """Without `overwrite`, stop before any work if a file is already where a mask would go."""
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise MedsegError(f"{existing[0]}: already exists ({len(existing)} of the {len(targets)} masks would replace "
                          "files in --out); choose another --out, or pass --overwrite to replace them")


def _predict_one(models: list, group: list[Path], target: Path, out: str | Path, overlays: bool,
                 series: str | None, fmt: str = "auto", with_uncertainty: bool = False) -> Path:
    trained = models[0]
    cfg = trained.config
    image = (read_case_image(group, cfg.color, cfg.npy_layout) if len(group) > 1
             else read_image(group[0], color=cfg.color, series=series, npy_layout=cfg.npy_layout))
    check_finite(image)
    try:
        labels, probs = predict_image(models, image, with_probabilities=True)
    except _out_of_memory() as exc:
        raise MedsegError(f"{group[0]}: out of {trained.device.type.upper()} memory predicting its "
                          f"{'x'.join(map(str, image.spatial_shape))} voxels; predict with --device cpu, or on a "
                          "machine with more memory") from exc
    names = trained.class_names
    if fmt == "dicom-seg":
        from medseg.dicom_seg import run_segment_codes, write_dicom_seg

        path = write_dicom_seg(labels, image, names, target, codes=run_segment_codes(trained.run))
    elif fmt == "npz":
        path = _write_probabilities(probs, labels, names, target)
    else:
        if fmt == "nifti" and image.ndim != 3:
            raise MedsegError(f"{group[0]}: --format nifti writes volumes, and this is a 2D image (use png)")
        if fmt == "png" and image.ndim != 2:
            raise MedsegError(f"{group[0]}: --format png writes 2D masks, and this is a volume (use nifti)")
        path = write_mask(labels, image, target, len(names))
    if with_uncertainty:
        _write_uncertainty(uncertainty(probs, bool(cfg.regions)), image, target)
    if overlays:
        (Path(out) / "overlays").mkdir(parents=True, exist_ok=True)
        save_overlay_png(image.array, labels, Path(out) / "overlays" / f"{stem_of(target)}.png", cfg.axis)
    return path


def _out_of_memory() -> tuple:
    """PyTorch's out-of-memory error where PyTorch runs the networks (nothing to catch under onnxruntime)."""
    torch = sys.modules.get("torch")
    return (torch.OutOfMemoryError,) if torch else ()


def _write_probabilities(probs: np.ndarray, labels: np.ndarray, names: list[str], target: Path) -> Path:
    """--format npz: the averaged probabilities (float16, one map per class or region), the labels and the names."""
    from medseg.io import atomic_path

    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, probabilities=probs.astype(np.float16), labels=labels,
                                class_names=np.array(names))
    return target


def uncertainty_path(target: Path, volume: bool) -> Path:
    return target.with_name(f"{stem_of(target).removesuffix('.seg')}_uncertainty{'.nii.gz' if volume else '.png'}")


def _write_uncertainty(entropy: np.ndarray, image, target: Path) -> Path:
    """The entropy of the mean probability, 0 (certain) to 1 (undecided): a float NIfTI on the image's grid for
    volumes, an 8-bit PNG (0-255) for 2D images."""
    from medseg.io import atomic_path, save_nifti

    path = uncertainty_path(target, image.ndim == 3)
    if image.ndim == 3:
        return save_nifti(entropy.astype(np.float32), image.affine, path)
    from PIL import Image as PILImage

    with atomic_path(path) as tmp:
        PILImage.fromarray((np.clip(entropy, 0, 1) * 255).round().astype(np.uint8)).save(tmp, format="PNG")
    return path
