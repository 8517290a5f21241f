"""The size of an image once read, from its file's header alone: how `--cache auto` knows, before decoding any
voxel, whether a dataset fits in memory (a 550 MB folder of `.nii.gz` CT volumes is 15 GB as float32).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.io import ITK_SUFFIXES, NIFTI_SUFFIXES, suffix_of


def header_size(path: str | Path) -> tuple[tuple[int, ...], int, tuple[float, ...] | None]:
    """(spatial shape, channels, spacing or None) of an image file or DICOM series folder, read from headers only.
    A file whose header cannot be read counts as its bytes on disk, one channel (never less than it holds)."""
    path = Path(path)
    try:
        if path.is_dir():
            return _dicom_size(path)
        suffix = suffix_of(path)
        if suffix in NIFTI_SUFFIXES:
            import nibabel as nib

            image = nib.load(str(path))
            shape = image.shape
            spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
            return tuple(shape[:3]), int(np.prod(shape[3:])) if len(shape) > 3 else 1, spacing
        if suffix in ITK_SUFFIXES:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            return tuple(reader.GetSize()), reader.GetNumberOfComponents(), tuple(reader.GetSpacing())
        if suffix == ".npy":
            return tuple(np.load(path, mmap_mode="r").shape), 1, None
        from PIL import Image as PILImage

        with PILImage.open(path) as pil:
            return (pil.height, pil.width), min(len(pil.getbands()), 3), None
    except Exception:  # a header it cannot parse: the reader will say what is wrong when it reads the file
        return (path.stat().st_size if path.is_file() else 0,), 1, None


def _dicom_size(folder: Path) -> tuple[tuple[int, ...], int, tuple[float, ...] | None]:
    import pydicom

    from medseg.dicom import dicom_files

    files = dicom_files(folder)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return (int(first.Columns), int(first.Rows), len(files)), 1, None


def decoded_bytes(paths: list, target_spacing: list[float] | None = None) -> int:
    """Bytes a case's image files (its channels) and its label take once read as medseg holds them for training:
    float32 per channel and a uint8 label, at the `target_spacing` where volumes are resampled to one."""
    total = 0
    for n, path in enumerate(paths):
        shape, channels, spacing = header_size(path)
        voxels = float(np.prod(shape))
        if target_spacing and spacing and len(shape) == 3 == len(target_spacing):
            voxels *= float(np.prod([s / t for s, t in zip(spacing, target_spacing)]))
        total += voxels * channels * 4 + (voxels if n == 0 else 0)  # the label once per case
    return int(total)
