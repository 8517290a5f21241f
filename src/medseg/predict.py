"""Predict masks for files or folders with a trained run: one mask per input, same name, format and geometry."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from medseg.checkpoint import load_models
from medseg.errors import MedsegError
from medseg.infer import predict_image
from medseg.io import is_dicom_folder, is_supported, mask_path_for, read_image, stem_of, write_mask
from medseg.report import save_overlay_png
from medseg.transforms import normalize_percentile


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


def predict_files(run: str | Path, inputs: list[str | Path], out: str | Path, overlays: bool = False,
                  device: str = "auto", progress: bool = True, series: str | None = None) -> list[Path]:
    """Write a mask for every input into `out` (and `out/overlays/NAME.png` when asked); return the mask paths.

    series: which DICOM series to read where a folder holds several (UID or description). RUN may be a
    cross-validation folder (`fold_0`, `fold_1`, ...): the folds are ensembled.
    """
    models = load_models(run, device=device)
    trained = models[0]
    files = collect_inputs(inputs)
    targets: dict[Path, Path] = {}
    for path in files:
        target = mask_path_for(path, out)
        if target in targets.values():
            raise MedsegError(f"{path}: another input also writes {target.name}; predict them into separate folders")
        targets[path] = target
    written = []
    for path in tqdm(files, desc="predicting", disable=not progress, leave=False):
        image = read_image(path, color=trained.config.color, series=series)
        labels = predict_image(models, image)
        written.append(write_mask(labels, image, targets[path]))
        if overlays:
            (Path(out) / "overlays").mkdir(parents=True, exist_ok=True)
            save_overlay_png(normalize_percentile(image.array), labels,
                             Path(out) / "overlays" / f"{stem_of(path)}.png", trained.config.axis)
    return written
