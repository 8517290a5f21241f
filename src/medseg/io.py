"""Read images and volumes into one `Image` type; write masks back with the same geometry.

Array convention: `Image.array` is channels-first, `(C, *spatial)`. 2D files give `(C, H, W)` (rows, columns);
NIfTI gives `(C, X, Y, Z)` in the file's voxel order, with the affine that maps voxels to world millimetres.

A folder of DICOM files is read as one series (see `medseg.dicom`); NRRD and MetaImage (.mha/.mhd) go through
SimpleITK. Both get a RAS affine like NIfTI, so geometry means the same thing whatever the source.

Colour policy: RGB is kept as three channels (vessels in fundus photographs live in the green channel);
RGBA drops the alpha channel (it is opacity, not signal); palette images (GIF) are expanded to grey when the
palette is grey and to RGB otherwise. `color="gray"` converts to luminance (ITU-R 601) instead.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg import limits
from medseg.errors import MedsegError, TooLarge, write_error

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + RASTER_SUFFIXES + (".npy",)
# Lossy or palette-only formats cannot hold label values exactly: masks for them are written as PNG.
LOSSLESS_MASK_FORMAT = {".jpg": ".png", ".jpeg": ".png", ".gif": ".png"}
MASK_PNG_KEY = "medseg"  # text chunk of a palette PNG whose pixel values are class indices
# Colours of classes 1, 2, ... in 2D masks (the matplotlib tab10 palette), so that masks are visible in any viewer.
CLASS_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                 (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


@dataclass
class Image:
    """An image or volume with the geometry it was read with.

    array: (C, *spatial) float or integer data.
    spacing: physical size of a pixel/voxel along each spatial axis (mm; 1.0 where the format has none).
    affine: 4x4 voxel-to-world matrix for NIfTI, None for 2D formats.
    path: where it was read from; meta: format details needed to write a matching file.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    @property
    def orientation(self) -> str:
        """Anatomical axis codes of a volume, e.g. 'RAS' (where each voxel axis points); '' for 2D images."""
        return "" if self.affine is None else orientation_of(self.affine)

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return self.array.ndim - 1


def orientation_of(affine: np.ndarray) -> str:
    """Anatomical axis codes of a voxel-to-world affine, e.g. 'RAS' (where each voxel axis points)."""
    import nibabel as nib

    return "".join(nib.aff2axcodes(affine))


def suffix_of(path: str | Path) -> str:
    name = str(path).lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def stem_of(path: str | Path) -> str:
    """File name without its (possibly double) extension: 'case_1.nii.gz' -> 'case_1'."""
    name = Path(path).name
    return name[: len(name) - len(suffix_of(name))] if suffix_of(name) else name


def is_supported(path: str | Path) -> bool:
    return suffix_of(path) in SUPPORTED_SUFFIXES and not Path(path).name.startswith(".")


def is_dicom_folder(path: Path) -> bool:
    from medseg.dicom import dicom_files

    return path.is_dir() and bool(dicom_files(path))


def read_image(path: str | Path, color: str = "keep", series: str | None = None, npy_layout: str = "auto") -> Image:
    """Read a file or a DICOM series folder.

    color: 'keep' (RGB stays 3 channels) or 'gray' (convert to luminance); series: UID or description of the
    DICOM series to read when a folder holds several; npy_layout: how a 3D `.npy` is read (see `_read_npy`).
    """
    path = Path(path)
    if not path.exists():
        raise MedsegError(f"{path}: file not found; check the path")
    if path.is_dir():
        if not is_dicom_folder(path):
            raise MedsegError(f"{path}: a folder is read only as a DICOM series, and this one holds no DICOM files")
        from medseg.dicom import read_dicom_series

        return read_dicom_series(path, series)
    _check_supported(path)
    try:
        suffix = suffix_of(path)
        if suffix in NIFTI_SUFFIXES:
            image = _read_nifti(path)
        elif suffix in ITK_SUFFIXES:
            image = _read_itk(path)
        elif suffix == ".npy":
            image = _read_npy(path, npy_layout)
        else:
            image = _read_raster(path)
    except MedsegError:
        raise
    except Exception as exc:  # a corrupt file surfaces as many different library errors
        raise MedsegError(f"{path}: cannot be read ({type(exc).__name__}: {_first_line(exc)}); is the file "
                          "complete?") from exc
    if image.array.size == 0:
        raise MedsegError(f"{path}: empty image (shape {image.meta.get('shape', image.array.shape)}); nothing to "
                          "segment")
    if not (np.issubdtype(image.array.dtype, np.number) or image.array.dtype == bool):
        raise MedsegError(f"{path}: holds {image.array.dtype} values, not numbers")
    if color == "gray" and image.array.shape[0] == 3:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(3, *[1] * image.ndim)
        image.array = (image.array.astype(np.float32) * weights).sum(0, keepdims=True)
        image.meta["color"] = "converted to gray"
    return image


def check_header(path: str | Path) -> None:
    """The checks every reader makes on a file's header before it allocates (`medseg.limits`), alone, without
    decoding a voxel: what the service runs on an upload before it queues the job."""
    path = Path(path)
    if path.is_dir():
        from medseg.dicom import checked_series

        checked_series(path)
        return
    _check_supported(path)
    try:
        suffix = suffix_of(path)
        if suffix in NIFTI_SUFFIXES:
            _nifti_header(path)
        elif suffix in ITK_SUFFIXES:
            _itk_header(path)
        elif suffix == ".npy":
            _npy_header(path)
        else:
            with _raster_header(path):
                pass
    except MedsegError:
        raise
    except Exception as exc:
        raise MedsegError(f"{path}: cannot be read ({type(exc).__name__}: {_first_line(exc)}); is the file "
                          "complete?") from exc


def _check_supported(path: Path) -> None:
    if not is_supported(path):
        raise MedsegError(f"{path}: unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")


def _first_line(exc: Exception) -> str:
    """A library's message cut to one line (ITK's run over several, with source file names)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if "ERROR" in line or "rror" in line] or lines or [""]
    return useful[-1][:200]


def _nifti_header(path: Path):
    import nibabel as nib

    nii = nib.load(str(path))
    if 0 in nii.shape:
        raise MedsegError(f"{path}: empty image (shape {nii.shape}); nothing to segment")
    limits.check_voxels(path, nii.shape)  # nibabel would allocate the declared size before reading a voxel
    declared = math.prod(nii.shape) * nii.get_data_dtype().itemsize
    limits.check_holds(path, declared + int(nii.dataobj.offset), compressed=suffix_of(path) == ".nii.gz")
    return nii


def _read_nifti(path: Path) -> Image:
    nii = _nifti_header(path)
    data = np.asanyarray(nii.dataobj)
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim == 3:
        array = data[None]
    elif data.ndim == 4:  # (X, Y, Z, C): channels last in NIfTI
        array = np.moveaxis(data, -1, 0)
    else:
        raise MedsegError(f"{path}: NIfTI with {data.ndim} dimensions; expected 3D or 4D (channels last)")
    spacing = tuple(float(z) for z in nii.header.get_zooms()[:3])
    return Image(array, spacing, np.asarray(nii.affine, dtype=np.float64), path,
                 {"format": "nifti", "header": nii.header.copy(), "shape": data.shape})


@contextlib.contextmanager
def native_stderr_silenced():
    """Route file descriptor 2 to /dev/null for a block: C++ libraries (ITK) write to it directly, around Python."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _itk_header(path: Path):
    """A SimpleITK reader that has read the header alone, checked before ITK allocates the image."""
    import SimpleITK as sitk

    with native_stderr_silenced():  # ITK's MetaIO prints its own lines; the failure is reported as one of ours
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    limits.check_voxels(path, reader.GetSize(), reader.GetNumberOfComponents())
    return reader


def _read_itk(path: Path) -> Image:
    """NRRD / MetaImage via SimpleITK: volumes become (C, X, Y, Z) with a RAS affine (ITK works in LPS)."""
    import SimpleITK as sitk

    reader = _itk_header(path)
    with native_stderr_silenced():
        itk = reader.Execute()
    data = sitk.GetArrayFromImage(itk)
    dims, channels = itk.GetDimension(), itk.GetNumberOfComponentsPerPixel()
    if channels > 1:
        data = np.moveaxis(data, -1, 0)
    else:
        data = data[None]
    if dims == 3:  # (C, Z, Y, X) -> (C, X, Y, Z) like NIfTI; 2D stays (C, rows, columns) like PNG
        data = np.moveaxis(data, (1, 2, 3), (3, 2, 1))
    array = np.ascontiguousarray(data)
    geometry = {"origin": itk.GetOrigin(), "spacing": itk.GetSpacing(), "direction": itk.GetDirection()}
    affine = None
    if dims == 3:
        from medseg.dicom import LPS_TO_RAS

        lps = np.eye(4)
        lps[:3, :3] = np.array(itk.GetDirection()).reshape(3, 3) * np.array(itk.GetSpacing())
        lps[:3, 3] = itk.GetOrigin()
        affine = LPS_TO_RAS @ lps
    spacing = tuple(float(v) for v in itk.GetSpacing())  # ITK's order: x (columns) first
    return Image(array, spacing if dims == 3 else spacing[::-1], affine, path,
                 {"format": "itk", "itk_geometry": geometry})


def _npy_header(path: Path) -> None:
    header = np.load(path, mmap_mode="r", allow_pickle=False)  # shape and type, nothing read yet
    limits.check_voxels(path, header.shape)
    limits.check_holds(path, header.nbytes + header.offset, compressed=False)


def _read_npy(path: Path, layout: str = "auto") -> Image:
    """(H, W) is a grey 2D image. A 3D array is a volume (X, Y, Z) unless `layout` says it is a 2D image with
    channels last ("hwc") or first ("chw"): a shape alone cannot tell a 3-slice volume from an RGB image, so the
    rule never guesses, and every value is kept either way (no channel is dropped)."""
    _npy_header(path)
    data = np.load(path, allow_pickle=False)
    if data.ndim == 2:
        array = data[None]
    elif data.ndim == 3 and layout == "hwc":
        array = np.moveaxis(data, -1, 0)
    elif data.ndim == 3 and layout == "chw":
        array = data
    elif data.ndim == 3:
        array = data[None]
    else:
        raise MedsegError(f"{path}: .npy with shape {data.shape}; expected (H, W), (X, Y, Z), or a 2D image with "
                          "channels read with --npy-layout hwc or chw")
    return Image(np.ascontiguousarray(array), (1.0,) * (array.ndim - 1), None, path,
                 {"format": "npy", "shape": data.shape, "npy_layout": layout})


@contextlib.contextmanager
def _raster_header(path: Path):
    """The opened (not decoded) image, its header checked."""
    from PIL import Image as PILImage

    PILImage.MAX_IMAGE_PIXELS = None  # one limit for every format: medseg's, checked here before decoding
    with PILImage.open(path) as pil:
        limits.check_voxels(path, (pil.height, pil.width), len(pil.getbands()))
        if pil.format == "PNG":  # deflated rows: at most DEFLATE_RATIO times the file
            limits.check_holds(path, pil.height * pil.width // 8, compressed=True)  # one bit a pixel at least
        yield pil


def _read_raster(path: Path) -> Image:
    with _raster_header(path) as pil:  # the header only: pixels are decoded by np.asarray below
        frames = getattr(pil, "n_frames", 1)
        if frames > 1 and suffix_of(path) in (".tif", ".tiff"):
            raise MedsegError(f"{path}: multi-page TIFF ({frames} pages); save the stack as NIfTI or one file per page")
        mode = pil.mode
        if mode == "P" and pil.info.get(MASK_PNG_KEY) == "class indices":  # a mask medseg wrote: keep indices
            data = np.asarray(pil)
        elif mode == "P":
            pil = pil.convert("RGBA" if "transparency" in pil.info else "RGB")
            rgb = np.asarray(pil)[..., :3]
            grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
            data = rgb[..., 0] if grey else rgb
        elif mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA"):
            data = np.asarray(pil.convert("RGB"))
            if mode == "LA":
                data = data[..., 0]
        elif mode == "1":
            data = np.asarray(pil.convert("L"))
        else:  # L, I, I;16, F
            data = np.asarray(pil)
    array = np.moveaxis(data, -1, 0) if data.ndim == 3 else data[None]
    return Image(np.ascontiguousarray(array), (1.0, 1.0), None, path, {"format": "raster", "mode": mode})


def mask_path_for(image_path: str | Path, out_dir: str | Path) -> Path:
    """Where the mask for an input goes: same base name, same format (PNG where the input was lossy).

    A DICOM series folder gets `<folder name>.nii.gz`: a NIfTI mask with the series' geometry.
    """
    if Path(image_path).is_dir():
        return Path(out_dir) / f"{Path(image_path).name}.nii.gz"
    suffix = suffix_of(image_path)
    return Path(out_dir) / f"{stem_of(image_path)}{LOSSLESS_MASK_FORMAT.get(suffix, suffix)}"


def write_mask(mask: np.ndarray, reference: Image, path: str | Path, num_classes: int | None = None) -> Path:
    """Write a label mask (spatial shape of `reference`) with the reference's geometry, atomically, with the
    permissions the user's umask gives.

    NIfTI keeps the affine and header of the reference (data type set to an integer type); NRRD/MetaImage keep
    origin, spacing and direction; .npy keeps the array layout; values are class indices (0 = background). 2D
    raster masks are written to be seen in an ordinary viewer: one foreground class (`num_classes` 2) as 0/255,
    which medseg reads back as 0/1; several as a palette PNG whose pixel values are the class indices.
    """
    path = Path(path)
    if tuple(mask.shape) != reference.spatial_shape:
        raise ValueError(f"mask shape {mask.shape} does not match image {reference.spatial_shape}")
    dtype = np.uint8 if mask.max(initial=0) < 256 else np.uint16
    mask = mask.astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix_of(path)
    if suffix in (".mhd", ".nhdr"):
        _write_itk_pair(mask, reference, path)
        return path
    with atomic_path(path) as tmp:
        if suffix in NIFTI_SUFFIXES:
            _write_nifti(mask, reference, tmp)
        elif suffix in ITK_SUFFIXES:
            import SimpleITK as sitk

            sitk.WriteImage(_itk_mask(mask, reference), str(tmp), useCompression=True)
        elif suffix == ".npy":
            _write_npy(mask, reference, tmp)
        else:
            _write_raster(mask, tmp, num_classes)
    return path


def _write_raster(mask: np.ndarray, path: Path, num_classes: int | None) -> None:
    from PIL import Image as PILImage
    from PIL.PngImagePlugin import PngInfo

    classes = num_classes or int(mask.max(initial=0)) + 1
    if classes <= 2 and mask.max(initial=0) <= 1:
        PILImage.fromarray((mask * 255).astype(np.uint8)).save(path)
    elif suffix_of(path) == ".png" and mask.max(initial=0) < 256:
        pil = PILImage.fromarray(mask.astype(np.uint8), mode="P")
        colours = [(0, 0, 0)] + [CLASS_COLOURS[k % len(CLASS_COLOURS)] for k in range(255)]
        pil.putpalette([c for rgb in colours for c in rgb])
        info = PngInfo()
        info.add_text(MASK_PNG_KEY, "class indices")
        pil.save(path, pnginfo=info)
    else:
        PILImage.fromarray(mask).save(path)


def _match_umask(path: Path) -> None:
    """Temporary files are created private (0600); the file put in place gets what the user's umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """A temporary name beside `path` (same suffix) to write to; renamed onto `path` when the block ends without an
    error, so a crash or a full disk leaves the old file or the new one, never half of one, and no temporary."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path.parent, exc) from exc
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=suffix_of(path))
    os.close(handle)
    try:
        yield Path(tmp)
        _match_umask(Path(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


ZIP_MAX_FILES = 10_000  # a CT series is a few hundred to a few thousand slices
ZIP_MAX_BYTES = 8 * 2**30  # unpacked: several whole-body CT series


def extract_zip(path: Path, target: Path, max_files: int | None = None, max_bytes: int | None = None) -> Path:
    """Unpack a zip archive into `target`, refusing, before anything is written, members that would land outside
    it (absolute or '..' paths: "zip slip") and archives of more than `max_files` members or `max_bytes` unpacked
    (a "zip bomb": the sizes are the ones the archive declares, and extraction stops if a member outgrows its)."""
    import zipfile

    max_files = ZIP_MAX_FILES if max_files is None else max_files
    max_bytes = ZIP_MAX_BYTES if max_bytes is None else max_bytes
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            for member in members:
                if member.filename.startswith("/") or ".." in Path(member.filename).parts:
                    raise MedsegError(f"{path.name}: refused; it holds a file outside the archive ({member.filename})")
            if len(members) > max_files:
                raise TooLarge(f"{path.name}: refused; {len(members)} files, more than the {max_files} allowed")
            unpacked = sum(member.file_size for member in members)
            if unpacked > max_bytes:
                raise TooLarge(f"{path.name}: refused; {unpacked / 2**30:.1f} GiB unpacked, more than the "
                                  f"{max_bytes / 2**30:.1f} GiB allowed")
            archive.extractall(target)  # zipfile stops a member that inflates past its declared size
    except zipfile.BadZipFile as exc:
        raise MedsegError(f"{path.name}: not a readable zip archive ({exc})") from exc
    return target


def save_nifti(array: np.ndarray, affine: np.ndarray | None, path: str | Path) -> Path:
    """A NIfTI of `array` as it is (no header of a reference, no label casting), written atomically: maps such as
    the uncertainty, and the images the web viewer shows."""
    import nibabel as nib

    with atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(array, affine), str(tmp))
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file through a temporary file and a rename (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _write_nifti(mask: np.ndarray, reference: Image, path: Path) -> None:
    import nibabel as nib

    header = reference.meta["header"].copy() if "header" in reference.meta else None
    shape = reference.meta.get("shape", mask.shape)
    data = mask.reshape(shape[:3]) if len(shape) >= 3 else mask.reshape(shape)
    nii = nib.Nifti1Image(data, reference.affine, header=header)
    nii.set_data_dtype(mask.dtype)
    nii.header.set_slope_inter(1, 0)  # labels must not be rescaled by a scl_slope copied from the image
    nib.save(nii, str(path))


def _itk_mask(mask: np.ndarray, reference: Image):
    """A SimpleITK image of `mask` with the reference's origin, spacing and direction."""
    import SimpleITK as sitk

    itk = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(mask) if mask.ndim == 3 else mask))
    geometry = reference.meta.get("itk_geometry") or _itk_geometry(reference.affine)
    if geometry:
        itk.SetOrigin(geometry["origin"])
        itk.SetSpacing(geometry["spacing"])
        itk.SetDirection(geometry["direction"])
    return itk


def _itk_geometry(affine: np.ndarray | None) -> dict | None:
    """ITK's origin, spacing and direction (LPS) for a RAS affine: a reference read from NIfTI or DICOM."""
    if affine is None:
        return None
    from medseg.dicom import LPS_TO_RAS

    lps = np.linalg.inv(LPS_TO_RAS) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return {"origin": tuple(lps[:3, 3]), "spacing": tuple(spacing), "direction": tuple(direction.ravel())}


def _write_itk_pair(mask: np.ndarray, reference: Image, path: Path) -> None:
    """.mhd/.nhdr headers name a separate data file: write both in a staging folder, move the data, then the
    header last, so a complete header never points at missing data."""
    import SimpleITK as sitk

    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    try:
        sitk.WriteImage(_itk_mask(mask, reference), str(staging / path.name), useCompression=True)
        for produced in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
            os.replace(produced, path.parent / produced.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_npy(mask: np.ndarray, reference: Image, path: Path) -> None:
    with open(path, "wb") as handle:
        np.save(handle, mask)
