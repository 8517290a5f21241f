"""DICOM series -> one volume with its geometry from ImagePositionPatient / ImageOrientationPatient.

The volume is laid out like NIfTI: array (1, columns, rows, slices), and a 4x4 affine in RAS+ world millimetres
(DICOM's LPS patient axes with x and y negated), so a mask predicted for it is written as a NIfTI that overlays
the series in any viewer. Slices are ordered along the slice normal, not by file name or InstanceNumber.
"""
from __future__ import annotations

import math
import warnings
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg import limits
from medseg.errors import MedsegError, TooLarge

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: pydicom inflates the whole file at once
# one file is one slice (multi-frame is refused): 8192 x 8192 RGB is 201 MB, so more than this inflated is a bomb
MAX_INFLATED_BYTES = 256 * 2**20


@dataclass
class Series:
    uid: str
    description: str
    files: list[Path]
    largest_slice: tuple[int, int, int] = (0, 0, 1)  # (columns, rows, samples per pixel) of its largest file

    def label(self) -> str:
        return f"{self.uid} ('{self.description}', {len(self.files)} files)"


def is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble, whatever their name."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom_file(p))


def list_series(folder: str | Path) -> list[Series]:
    """The series in a folder (headers only), in a stable order."""
    import pydicom

    groups: dict[str, list[Path]] = defaultdict(list)
    descriptions: dict[str, str] = {}
    largest: dict[str, tuple[int, int, int]] = {}
    for path in dicom_files(Path(folder)):
        try:
            with warnings.catch_warnings():  # a damaged file is reported below, in one line of ours
                warnings.simplefilter("ignore")
                check_inflated_size(path)
                header = pydicom.dcmread(path, stop_before_pixels=True)
        except MedsegError:
            raise
        except Exception as exc:
            raise MedsegError(f"{path}: not a readable DICOM file ({type(exc).__name__}); remove it") from exc
        uid = str(header.get("SeriesInstanceUID", "unknown"))
        groups[uid].append(path)
        descriptions[uid] = str(header.get("SeriesDescription", ""))
        frames = int(header.get("NumberOfFrames", 1) or 1)
        size = (int(header.get("Columns", 0) or 0), int(header.get("Rows", 0) or 0) * frames,
                int(header.get("SamplesPerPixel", 1) or 1))
        if size[0] * size[1] * size[2] > math.prod(largest.get(uid, (0, 0, 1))):
            largest[uid] = size
    return [Series(uid, descriptions[uid], files, largest.get(uid, (0, 0, 1))) for uid, files in sorted(groups.items())]


def check_inflated_size(path: Path) -> None:
    """A deflated DICOM file is inflated here in pieces, counted and discarded, before pydicom inflates it whole:
    one that would inflate beyond MAX_INFLATED_BYTES is refused without the memory it asks for."""
    from pydicom.filereader import read_file_meta_info

    meta = read_file_meta_info(path)
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
        return
    start = 132 + 12 + int(meta.FileMetaInformationGroupLength)  # preamble, DICM, the group length element
    inflater, inflated = zlib.decompressobj(-zlib.MAX_WBITS), 0
    with open(path, "rb") as handle:
        handle.seek(start)
        while chunk := handle.read(2**16):
            while chunk:
                inflated += len(inflater.decompress(chunk, 2**20))
                chunk = inflater.unconsumed_tail
                if inflated > MAX_INFLATED_BYTES:
                    raise TooLarge(f"{path.name}: a deflated DICOM file inflating beyond "
                                      f"{MAX_INFLATED_BYTES // 2**20} MB; one slice is never this large (refused)")


def choose_series(folder: Path, series: str | None) -> Series:
    found = list_series(folder)
    if not found:
        raise MedsegError(f"{folder}: no DICOM files found")
    if series is None:
        if len(found) > 1:
            listing = "; ".join(s.label() for s in found)
            raise MedsegError(f"{folder}: {len(found)} DICOM series in one folder: {listing}; "
                              "choose one with --series UID_OR_DESCRIPTION")
        return found[0]
    matches = [s for s in found if series in (s.uid, s.description)]
    if len(matches) != 1:
        listing = "; ".join(s.label() for s in found)
        raise MedsegError(f"{folder}: --series {series!r} matches {len(matches)} series; available: {listing}")
    return matches[0]


def checked_series(folder: Path, series: str | None = None) -> Series:
    """The chosen series, its size from the headers checked against the voxel limit before any pixel is read."""
    chosen = choose_series(Path(folder), series)
    columns, rows, samples = chosen.largest_slice
    limits.check_voxels(folder, (columns, rows, len(chosen.files)), samples, what="holds a series of")
    return chosen


def read_dicom_series(folder: str | Path, series: str | None = None):
    """Read one series of `folder` into an `Image` (1, X, Y, Z) with a RAS affine."""
    import pydicom

    from medseg.io import Image

    folder = Path(folder)
    chosen = checked_series(folder, series)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slices = [pydicom.dcmread(p) for p in chosen.files]
    if any("ImagePositionPatient" not in s or "ImageOrientationPatient" not in s for s in slices):
        raise MedsegError(f"{folder}: slices without ImagePositionPatient/ImageOrientationPatient; "
                          "cannot place them in space")
    if any(int(s.get("NumberOfFrames", 1) or 1) > 1 for s in slices):
        raise MedsegError(f"{folder}: multi-frame (enhanced) DICOM is not supported yet; convert it to NIfTI")
    _check_alike(chosen.files, slices)
    orientation = np.array(slices[0].ImageOrientationPatient, dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    order = sorted(range(len(slices)),
                   key=lambda i: float(np.dot(np.array(slices[i].ImagePositionPatient, float), normal)))
    slices, files = [slices[i] for i in order], [chosen.files[i] for i in order]
    positions = np.array([s.ImagePositionPatient for s in slices], dtype=float)
    step = _check_spacing(folder, positions, normal)
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    volume = np.stack([_pixels(s, folder).T for s in slices], -1)  # (columns, rows, slices)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    spacing = (col_spacing, row_spacing, float(np.linalg.norm(step)))
    meta = {"format": "dicom", "series_uid": chosen.uid, "series_description": chosen.description,
            "modality": str(slices[0].get("Modality", "")),
            "files": [str(f) for f in files]}  # slice k of the volume (last axis) is files[k]: what a SEG references
    return Image(volume[None], spacing, LPS_TO_RAS @ affine, folder, meta)


def _check_alike(files: list[Path], slices: list) -> None:
    """Every slice of a volume has the first one's orientation, size and pixel spacing."""
    first = slices[0]
    for path, ds in zip(files[1:], slices[1:]):
        for what, a, b in (("orientation", first.ImageOrientationPatient, ds.ImageOrientationPatient),
                           ("size (rows, columns)", (first.get("Rows"), first.get("Columns")),
                            (ds.get("Rows"), ds.get("Columns"))),
                           ("pixel spacing", first.get("PixelSpacing"), ds.get("PixelSpacing"))):
            same = (np.allclose(np.array(a, float), np.array(b, float), atol=1e-4) if what != "size (rows, columns)"
                    else tuple(a) == tuple(b)) if a is not None and b is not None else a == b
            if not same:
                raise MedsegError(f"{path}: slice {what} {list(b) if b is not None else None} differs from "
                                  f"{Path(files[0]).name}'s {list(a) if a is not None else None}; one series must "
                                  "hold slices of one volume (choose another with --series, or separate them)")


def _check_spacing(folder: Path, positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The vector between neighbouring slices; a gap (missing slice) or a duplicate position is an error."""
    if len(positions) == 1:
        return normal * 1.0
    distances = np.diff(positions @ normal)
    if np.any(distances < 1e-4):
        raise MedsegError(f"{folder}: two slices share one position; the folder mixes acquisitions")
    median = float(np.median(distances))
    if np.any(np.abs(distances - median) > 0.1 * median):
        worst = int(np.argmax(np.abs(distances - median)))
        raise MedsegError(f"{folder}: uneven slice spacing ({distances[worst]:.2f} mm after slice {worst + 1}, "
                          f"{median:.2f} mm elsewhere); slices are missing")
    return (positions[-1] - positions[0]) / (len(positions) - 1)


def _pixels(dataset, folder: Path) -> np.ndarray:
    try:
        pixels = dataset.pixel_array.astype(np.float32)
    except Exception as exc:
        raise MedsegError(f"{folder}: pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
    if pixels.ndim != 2:
        raise MedsegError(f"{folder}: colour or multi-frame pixel data is not supported for series")
    slope, intercept = float(dataset.get("RescaleSlope", 1) or 1), float(dataset.get("RescaleIntercept", 0) or 0)
    return pixels * slope + intercept
