"""A corpus of malformed inputs, made here (none checked in), each given to the command line: every one ends with
exit code 2 and one line that names the file and what is wrong, never a traceback, and no input is changed."""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage

from conftest import save_png
from medseg.cli import main
from test_dicom import write_series

QUICK_TRAIN = ["--recipe", "seed", "--base-channels", "4", "--depth", "2", "--size", "32", "--batch-size", "2",
               "--steps", "1", "--steps-per-epoch", "1", "--test-fraction", "0", "--quiet", "--threads", "1"]
CORPUS: dict[str, tuple] = {}  # name -> (builder, what the one line must say)


def bad(expect: str):
    """Register a builder: builder(folder, runs) -> (argv, the file the line must name)."""
    def register(builder):
        CORPUS[builder.__name__] = (builder, expect)
        return builder
    return register


# ---------------------------------------------------------------- helpers that write valid data, then break it

def nifti(path: Path, array, affine=None, dtype=np.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype), np.eye(4) if affine is None else affine), path)
    return path


def volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(24, 24, 24)).astype(np.float32)


def sphere(value: int = 1) -> np.ndarray:
    z, y, x = np.mgrid[:24, :24, :24]
    return (((x - 12) ** 2 + (y - 12) ** 2 + (z - 12) ** 2) < 30).astype(np.uint8) * value


def msd_3d(root: Path, n: int = 4, labels: dict | None = None) -> Path:
    for i in range(n):
        nifti(root / "imagesTr" / f"c{i}.nii.gz", volume(i))
        nifti(root / "labelsTr" / f"c{i}.nii.gz", sphere(), dtype=np.uint8)
    (root / "dataset.json").write_text(json.dumps({"labels": labels or {"0": "background", "1": "ball"},
                                                   "modality": {"0": "MRI"}}))
    return root


def disc(value: int = 255, size: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (((yy - size // 2) ** 2 + (xx - size // 2) ** 2) < size).astype(np.uint8) * value


def pairs_2d(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        save_png(root / "images" / f"p{i}.png", disc(150) + rng.integers(0, 60, (32, 32)).astype(np.uint8))
        save_png(root / "masks" / f"p{i}.png", disc(255))
    return root


def written(path: Path, content: bytes | str) -> Path:
    """A file with exactly this content, folders made as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def train_argv(data: Path, folder: Path) -> list[str]:
    return ["train", str(data), "--out", str(folder / "run"), *QUICK_TRAIN]


def predict_3d(path: Path, folder: Path, runs: dict) -> tuple[list[str], Path]:
    return ["predict", str(runs["3d"]), str(path), "--out", str(folder / "masks"), "--strict", "--quiet"], path


def predict_2d(path: Path, folder: Path, runs: dict) -> tuple[list[str], Path]:
    return ["predict", str(runs["2d"]), str(path), "--out", str(folder / "masks"), "--strict", "--quiet"], path


def valid_nifti_bytes() -> bytes:
    image = nib.Nifti1Image(volume(), np.eye(4))
    return gzip.compress(image.to_bytes())


# ---------------------------------------------------------------- files given to predict

@bad("cannot be read")
def nifti_zero_bytes(folder, runs):
    path = written(folder / "in" / "scan.nii.gz", b"")
    return predict_3d(path, folder, runs)


@bad("cannot be read")
def nifti_truncated(folder, runs):
    path = written(folder / "in" / "scan.nii.gz", valid_nifti_bytes()[:2000])
    return predict_3d(path, folder, runs)


@bad("cannot be read")
def nifti_wrong_magic(folder, runs):
    path = written(folder / "in" / "scan.nii.gz", b"\x89PNG\r\n\x1a\n" + bytes(500))
    return predict_3d(path, folder, runs)


@bad("cannot be read")
def nifti_gzipped_text(folder, runs):
    path = written(folder / "in" / "scan.nii.gz", gzip.compress(b"this is a radiology report, not a volume\n" * 20))
    return predict_3d(path, folder, runs)


@bad("cannot be read")
def nifti_uncompressed_text(folder, runs):
    path = written(folder / "in" / "scan.nii", "not a volume\n" * 50)
    return predict_3d(path, folder, runs)


@bad("NaN or infinite")
def nifti_nan_voxel(folder, runs):
    array = volume()
    array[3, 4, 5] = np.nan
    return predict_3d(nifti(folder / "in" / "scan.nii.gz", array), folder, runs)


@bad("NaN or infinite")
def nifti_inf_voxel(folder, runs):
    array = volume()
    array[0, 0, 0] = np.inf
    return predict_3d(nifti(folder / "in" / "scan.nii.gz", array), folder, runs)


@bad("dimensions")
def nifti_5d(folder, runs):
    return predict_3d(nifti(folder / "in" / "scan.nii.gz", np.zeros((8, 8, 8, 1, 2))), folder, runs)


@bad("channels")
def nifti_two_channels_for_a_one_channel_model(folder, runs):
    return predict_3d(nifti(folder / "in" / "scan.nii.gz", np.zeros((24, 24, 24, 2))), folder, runs)


@bad("empty")
def nifti_with_an_empty_axis(folder, runs):
    return predict_3d(nifti(folder / "in" / "scan.nii.gz", np.zeros((24, 0, 24))), folder, runs)


@bad("cannot be read")
def numpy_zero_bytes(folder, runs):
    path = written(folder / "in" / "scan.npy", b"")
    return predict_3d(path, folder, runs)


@bad("cannot be read")
def numpy_truncated(folder, runs):
    path = folder / "in" / "scan.npy"
    path.parent.mkdir(parents=True)
    np.save(path, volume())
    path.write_bytes(path.read_bytes()[:1000])
    return predict_3d(path, folder, runs)


@bad("cannot be read")
def numpy_pickled_objects(folder, runs):
    path = folder / "in" / "scan.npy"
    path.parent.mkdir(parents=True)
    np.save(path, np.array([{"not": "pixels"}, None], dtype=object), allow_pickle=True)
    return predict_3d(path, folder, runs)


@bad("shape (2, 2, 8, 8, 8); expected (H, W)")
def numpy_5d(folder, runs):
    path = folder / "in" / "scan.npy"
    path.parent.mkdir(parents=True)
    np.save(path, np.zeros((2, 2, 8, 8, 8), np.float32))
    return predict_3d(path, folder, runs)


@bad("NaN or infinite")
def numpy_nan(folder, runs):
    path = folder / "in" / "scan.npy"
    path.parent.mkdir(parents=True)
    array = volume()
    array[1, 1, 1] = np.nan
    np.save(path, array)
    return predict_3d(path, folder, runs)


@bad("not numbers")
def numpy_strings(folder, runs):
    path = folder / "in" / "scan.npy"
    path.parent.mkdir(parents=True)
    np.save(path, np.full((8, 8, 8), "x"))
    return predict_3d(path, folder, runs)


@bad("cannot be read")
def metaimage_truncated(folder, runs):
    path = folder / "in" / "scan.mha"
    path.parent.mkdir(parents=True)
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 24 24 24\nElementType = MET_FLOAT\n"
                    "ElementDataFile = LOCAL\n" + "x" * 10)
    return predict_3d(path, folder, runs)


@bad("cannot be read")
def nrrd_garbage(folder, runs):
    path = written(folder / "in" / "scan.nrrd", b"NRRD0004\ntype: float\ndimension: 3\nsizes: 24 24 24\nencoding: raw\n\n" + bytes(100))
    return predict_3d(path, folder, runs)


@bad("cannot be read")
def png_zero_bytes(folder, runs):
    path = written(folder / "in" / "slide.png", b"")
    return predict_2d(path, folder, runs)


@bad("cannot be read")
def png_truncated(folder, runs):
    path = save_png(folder / "in" / "slide.png", np.random.default_rng(0).integers(0, 255, (64, 64)))
    path.write_bytes(path.read_bytes()[:100])
    return predict_2d(path, folder, runs)


@bad("cannot be read")
def png_that_is_text(folder, runs):
    path = written(folder / "in" / "slide.png", "name,age\nanonymous,42\n")
    return predict_2d(path, folder, runs)


@bad("cannot be read")
def jpeg_truncated(folder, runs):
    path = folder / "in" / "slide.jpg"
    path.parent.mkdir(parents=True)
    PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    return predict_2d(path, folder, runs)


@bad("cannot be read")
def tiff_garbage(folder, runs):
    path = written(folder / "in" / "slide.tif", b"II*\x00" + bytes(64))
    return predict_2d(path, folder, runs)


@bad("cannot be read")
def gif_zero_bytes(folder, runs):
    path = written(folder / "in" / "slide.gif", b"")
    return predict_2d(path, folder, runs)


@bad("3 channels, the model expects 1")
def png_rgba_for_a_grey_model(folder, runs):
    path = folder / "in" / "slide.png"
    path.parent.mkdir(parents=True)
    PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 4)).astype(np.uint8), "RGBA").save(path)
    return predict_2d(path, folder, runs)


@bad("3 channels, the model expects 1")
def png_colour_palette_for_a_grey_model(folder, runs):
    path = folder / "in" / "slide.png"
    path.parent.mkdir(parents=True)
    image = PILImage.fromarray(np.random.default_rng(0).integers(0, 3, (32, 32)).astype(np.uint8), "P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    image.save(path)
    return predict_2d(path, folder, runs)


@bad("NaN or infinite")
def tiff_float_with_nan(folder, runs):
    path = folder / "in" / "slide.tif"
    path.parent.mkdir(parents=True)
    array = np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32)
    array[5, 5] = np.nan
    PILImage.fromarray(array, "F").save(path)
    return predict_2d(path, folder, runs)


@bad("training did not finish")
def predict_with_a_run_that_was_killed(folder, runs):
    shutil.copytree(runs["2d"], folder / "in" / "killed")
    (folder / "in" / "killed" / "train_summary.json").unlink()
    source = save_png(folder / "in" / "slide.png", disc())
    return ["predict", str(folder / "in" / "killed"), str(source), "--out", str(folder / "masks"),
            "--quiet"], folder / "in" / "killed"


# ---------------------------------------------------------------- DICOM series

@bad("no pixel data")
def dicom_without_pixel_data(folder, runs):
    series = folder / "in" / "series"
    write_series(series, np.ones((4, 24, 24)) * 100)
    import pydicom
    for path in series.iterdir():
        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.save_as(path)
    return predict_3d(series, folder, runs)


@bad("2 DICOM series in one folder")
def dicom_mixed_series(folder, runs):
    series = folder / "in" / "study"
    write_series(series, np.ones((4, 24, 24)) * 100, description="T1")
    write_series(series, np.ones((5, 24, 24)) * 100, description="FLAIR")
    return predict_3d(series, folder, runs)


@bad("slices are missing")
def dicom_missing_slice(folder, runs):
    series = folder / "in" / "series"
    write_series(series, np.ones((5, 24, 24)) * 100,
                 positions=[np.array([0, 0, z], float) for z in (0, 2.5, 5, 10, 12.5)])
    return predict_3d(series, folder, runs)


@bad("orientation")
def dicom_inconsistent_orientation(folder, runs):
    series = folder / "in" / "series"
    uid = write_series(series, np.ones((4, 24, 24)) * 100)
    import pydicom
    path = sorted(series.iterdir())[1]
    ds = pydicom.dcmread(path)
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    ds.save_as(path)
    assert uid
    return predict_3d(series, folder, runs)


@bad("size")
def dicom_slices_of_different_sizes(folder, runs):
    series = folder / "in" / "series"
    uid = write_series(series, np.ones((3, 24, 24)) * 100)
    write_series(series / "..", np.ones((1, 20, 24)) * 100, uid=uid,
                 positions=[np.array([-20.0, 10.0, 5.0 + 3 * 2.5])])
    for path in (series / "..").glob("*.dcm"):  # the odd slice joins the series folder
        shutil.move(path, series / f"odd_{path.name}")
    return predict_3d(series, folder, runs)


@bad("share one position")
def dicom_duplicate_slice_positions(folder, runs):
    series = folder / "in" / "series"
    write_series(series, np.ones((4, 24, 24)) * 100, positions=[np.array([0, 0, z], float) for z in (0, 0, 2.5, 5)])
    return predict_3d(series, folder, runs)


@bad("matches 0 series")
def dicom_series_not_there(folder, runs):
    series = folder / "in" / "series"
    write_series(series, np.ones((4, 24, 24)) * 100, description="T1")
    argv, named = predict_3d(series, folder, runs)
    return argv + ["--series", "T2"], named


@bad("cannot place them in space")
def dicom_file_of_garbage(folder, runs):
    series = folder / "in" / "series"
    series.mkdir(parents=True)
    (series / "slice.dcm").write_bytes(bytes(128) + b"DICM" + b"\xff" * 40)
    return predict_3d(series, folder, runs)


# ---------------------------------------------------------------- command-line mistakes

@bad("not found")
def predict_missing_input(folder, runs):
    return predict_2d(folder / "in" / "nowhere.png", folder, runs)


@bad("is a file, not a folder")
def predict_out_is_a_file(folder, runs):
    source = save_png(folder / "in" / "slide.png", disc())
    (folder / "in" / "masks.txt").write_text("a file where the masks would go")
    argv, named = predict_2d(source, folder, runs)
    return argv[:4] + [str(folder / "in" / "masks.txt")] + argv[5:], folder / "in" / "masks.txt"


@bad("already exists")
def predict_output_exists(folder, runs):
    source = save_png(folder / "in" / "slide.png", disc())
    save_png(folder / "masks" / "slide.png", disc())
    shutil.copytree(folder / "masks", folder / "in" / "masks_kept")  # the hashed inputs include the old mask
    argv, _ = predict_2d(source, folder, runs)
    return argv, folder / "masks" / "slide.png"


@bad("would overwrite an input")
def predict_into_the_input_folder(folder, runs):
    source = save_png(folder / "in" / "slide.png", disc())
    argv, _ = predict_2d(source, folder, runs)
    return argv[:4] + [str(folder / "in")] + argv[5:], folder / "in" / "slide.png"


@bad("no checkpoint")
def predict_with_a_run_that_is_not_a_run(folder, runs):
    source = save_png(folder / "in" / "slide.png", disc())
    return ["predict", str(folder / "in"), str(source), "--out", str(folder / "masks"), "--quiet"], folder / "in"


@bad("cannot be read")
def predict_with_a_checkpoint_of_garbage(folder, runs):
    source = save_png(folder / "in" / "slide.png", disc())
    (folder / "in" / "model.pt").write_bytes(b"PK\x03\x04" + bytes(200))
    return ["predict", str(folder / "in" / "model.pt"), str(source), "--out", str(folder / "masks"),
            "--quiet"], folder / "in" / "model.pt"


@bad("not found")
def evaluate_data_not_found(folder, runs):
    return ["evaluate", str(runs["2d"]), "--data", str(folder / "in" / "gone"), "--out",
            str(folder / "eval"), "--quiet"], folder / "in" / "gone"


# ---------------------------------------------------------------- datasets given to train

@bad("shape")
def train_image_and_mask_shapes_differ_2d(folder, runs):
    data = pairs_2d(folder / "in")
    save_png(data / "masks" / "p2.png", disc(255, 40))
    return train_argv(data, folder), data / "masks" / "p2.png"


@bad("shape")
def train_image_and_mask_shapes_differ_3d(folder, runs):
    data = msd_3d(folder / "in")
    nifti(data / "labelsTr" / "c1.nii.gz", sphere()[:20], dtype=np.uint8)
    return train_argv(data, folder), data / "labelsTr" / "c1.nii.gz"


@bad("spacing")
def train_image_and_mask_spacing_differ(folder, runs):
    data = msd_3d(folder / "in")
    nifti(data / "labelsTr" / "c1.nii.gz", sphere(), np.diag([2.0, 1, 1, 1]), dtype=np.uint8)
    return train_argv(data, folder), data / "labelsTr" / "c1.nii.gz"


@bad("affine")
def train_image_and_mask_affine_differ(folder, runs):
    data = msd_3d(folder / "in")
    shifted = np.eye(4)
    shifted[:3, 3] = [30, 0, 0]
    nifti(data / "labelsTr" / "c1.nii.gz", sphere(), shifted, dtype=np.uint8)
    return train_argv(data, folder), data / "labelsTr" / "c1.nii.gz"


@bad("mask value 2 is not a class")
def train_label_outside_dataset_json(folder, runs):
    data = msd_3d(folder / "in")
    nifti(data / "labelsTr" / "c2.nii.gz", sphere(2), dtype=np.uint8)
    return train_argv(data, folder), data / "labelsTr" / "c2.nii.gz"


@bad("negative values")
def train_negative_labels(folder, runs):
    data = msd_3d(folder / "in")
    nifti(data / "labelsTr" / "c2.nii.gz", sphere().astype(np.int16) * -1, dtype=np.int16)
    return train_argv(data, folder), data / "labelsTr" / "c2.nii.gz"


@bad("non-integer values")
def train_fractional_labels(folder, runs):
    data = msd_3d(folder / "in")
    nifti(data / "labelsTr" / "c2.nii.gz", sphere() * 1.5, dtype=np.float32)
    return train_argv(data, folder), data / "labelsTr" / "c2.nii.gz"


@bad("NaN or infinite")
def train_mask_with_nan(folder, runs):
    data = msd_3d(folder / "in")
    mask = sphere().astype(np.float32)
    mask[0, 0, 0] = np.nan
    nifti(data / "labelsTr" / "c2.nii.gz", mask)
    return train_argv(data, folder), data / "labelsTr" / "c2.nii.gz"


@bad("NaN or infinite")
def train_image_with_nan(folder, runs):
    data = msd_3d(folder / "in")
    image = volume()
    image[5, 5, 5] = np.nan
    nifti(data / "imagesTr" / "c3.nii.gz", image)
    return train_argv(data, folder), data / "imagesTr" / "c3.nii.gz"


@bad("colour image")
def train_rgba_mask(folder, runs):
    data = pairs_2d(folder / "in")
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = disc(255), 255
    PILImage.fromarray(rgba, "RGBA").save(data / "masks" / "p1.png")
    return train_argv(data, folder), data / "masks" / "p1.png"


@bad("colour image")
def train_colour_palette_mask(folder, runs):
    data = pairs_2d(folder / "in")
    mask = PILImage.fromarray((disc(255) > 0).astype(np.uint8), "P")
    mask.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    mask.save(data / "masks" / "p1.png")
    return train_argv(data, folder), data / "masks" / "p1.png"


@bad("expected one")
def train_two_channel_mask(folder, runs):
    data = msd_3d(folder / "in")
    nifti(data / "labelsTr" / "c2.nii.gz", np.stack([sphere(), sphere()], -1), dtype=np.uint8)
    return train_argv(data, folder), data / "labelsTr" / "c2.nii.gz"


@bad("cannot be read")
def train_zero_byte_image(folder, runs):
    data = pairs_2d(folder / "in")
    (data / "images" / "p3.png").write_bytes(b"")
    return train_argv(data, folder), data / "images" / "p3.png"


@bad("cannot be read")
def train_truncated_mask(folder, runs):
    data = msd_3d(folder / "in")
    path = data / "labelsTr" / "c0.nii.gz"
    path.write_bytes(path.read_bytes()[:300])
    return train_argv(data, folder), path


@bad("not valid JSON")
def train_dataset_json_that_is_not_json(folder, runs):
    data = msd_3d(folder / "in")
    (data / "dataset.json").write_text('{"labels": {"0": "background", "1": "ball",}')
    return train_argv(data, folder), data / "dataset.json"


@bad("dataset.json")
def train_dataset_json_that_is_a_list(folder, runs):
    data = msd_3d(folder / "in")
    (data / "dataset.json").write_text("[1, 2, 3]")
    return train_argv(data, folder), data / "dataset.json"


@bad("labels")
def train_dataset_json_labels_not_a_mapping(folder, runs):
    data = msd_3d(folder / "in")
    (data / "dataset.json").write_text(json.dumps({"labels": ["background", "ball"]}))
    return train_argv(data, folder), data / "dataset.json"


@bad("training")
def train_dataset_json_training_entries_broken(folder, runs):
    data = msd_3d(folder / "in")
    (data / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "ball"},
                                                   "training": [{"image": "./imagesTr/c0.nii.gz"}]}))
    return train_argv(data, folder), data / "dataset.json"


@bad("needs columns 'image' and 'mask'")
def train_csv_without_a_mask_column(folder, runs):
    data = pairs_2d(folder / "in")
    with open(data / "list.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "segmentation"]] + [[f"images/p{i}.png", f"masks/p{i}.png"]
                                                                     for i in range(4)])
    return train_argv(data / "list.csv", folder), data / "list.csv"


@bad("not found")
def train_csv_naming_a_missing_file(folder, runs):
    data = pairs_2d(folder / "in")
    with open(data / "list.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "mask"]] + [[f"images/p{i}.png", f"masks/p{i}.png"]
                                                            for i in range(4)] + [["images/p9.png", "masks/p9.png"]])
    return train_argv(data / "list.csv", folder), data / "list.csv"


@bad("no rows")
def train_empty_csv(folder, runs):
    (folder / "in").mkdir(parents=True)
    (folder / "in" / "list.csv").write_text("image,mask\n")
    return train_argv(folder / "in" / "list.csv", folder), folder / "in" / "list.csv"


@bad("case ids must be unique")
def train_duplicate_case_ids(folder, runs):
    data = pairs_2d(folder / "in")
    PILImage.open(data / "images" / "p0.png").save(data / "images" / "p0.tif")
    return train_argv(data, folder), data / "images"


@bad("no dataset layout recognised")
def train_folder_without_a_layout(folder, runs):
    (folder / "in" / "holiday photos").mkdir(parents=True)
    save_png(folder / "in" / "holiday photos" / "beach.png", disc())
    return train_argv(folder / "in", folder), folder / "in"


@bad("no labelled cases")
def train_empty_folders(folder, runs):
    (folder / "in" / "images").mkdir(parents=True)
    (folder / "in" / "masks").mkdir(parents=True)
    return train_argv(folder / "in", folder), folder / "in"


@bad("every mask is empty")
def train_every_mask_empty(folder, runs):
    data = pairs_2d(folder / "in")
    for path in (data / "masks").iterdir():
        save_png(path, np.zeros((32, 32)))
    return train_argv(data, folder), data


@bad("no mask holds 2")
def train_label_gap(folder, runs):
    data = msd_3d(folder / "in")
    (data / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"}}))
    nifti(data / "labelsTr" / "c2.nii.gz", sphere(3), dtype=np.uint8)
    return train_argv(data, folder), data / "labelsTr" / "c2.nii.gz"


@bad("dimensions")
def train_5d_image(folder, runs):
    data = msd_3d(folder / "in")
    nifti(data / "imagesTr" / "c1.nii.gz", np.zeros((24, 24, 24, 1, 2)))
    return train_argv(data, folder), data / "imagesTr" / "c1.nii.gz"


@bad("images without a mask")
def train_most_images_without_masks(folder, runs):
    data = pairs_2d(folder / "in", n=6)
    for i in (3, 4, 5):
        (data / "masks" / f"p{i}.png").rename(data / "masks" / f"P{i}_final.png")
    return train_argv(data, folder), data


@bad("run folder exists")
def train_out_is_a_users_folder(folder, runs):
    data = pairs_2d(folder / "in")
    (folder / "in" / "notes").mkdir()
    (folder / "in" / "notes" / "thesis.txt").write_text("chapter 1")
    argv = train_argv(data, folder)
    return argv[:3] + [str(folder / "in" / "notes")] + argv[4:], folder / "in" / "notes"


@bad("medseg did not write this folder")
def train_overwrite_a_users_folder(folder, runs):
    data = pairs_2d(folder / "in")
    (folder / "in" / "notes").mkdir()
    (folder / "in" / "notes" / "thesis.txt").write_text("chapter 1")
    argv = train_argv(data, folder)
    return argv[:3] + [str(folder / "in" / "notes"), "--overwrite"] + argv[4:], folder / "in" / "notes"


@bad("--out is a file")
def train_out_is_a_file(folder, runs):
    data = pairs_2d(folder / "in")
    (folder / "in" / "run.txt").write_text("x")
    argv = train_argv(data, folder)
    return argv[:3] + [str(folder / "in" / "run.txt")] + argv[4:], folder / "in" / "run.txt"


@bad("2D")
def train_images_mixing_2d_and_3d(folder, runs):
    data = msd_3d(folder / "in")
    (data / "imagesTr" / "c3.nii.gz").unlink()
    (data / "labelsTr" / "c3.nii.gz").unlink()
    save_png(data / "imagesTr" / "c3.png", disc(120, 24))
    save_png(data / "labelsTr" / "c3.png", disc(1, 24))
    return train_argv(data, folder), data / "imagesTr" / "c3.png"


# ---------------------------------------------------------------- the test

def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(trained_2d, trained_3d) -> dict:
    return {"2d": trained_2d, "3d": trained_3d}


def test_the_corpus_is_large_enough():
    assert len(CORPUS) >= 60


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_a_malformed_input_gets_exit_2_and_one_line_naming_it(name, runs, tmp_path, capfd):
    builder, expect = CORPUS[name]
    argv, named = builder(tmp_path, runs)
    before = hashes(tmp_path / "in") if (tmp_path / "in").exists() else {}
    code = main(argv)
    out, err = capfd.readouterr()  # file descriptors: what C libraries print counts too
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}; stderr: {err}"
    assert len(lines) == 1, err
    assert lines[0].startswith("medseg: error: ") and "Traceback" not in err
    assert expect in lines[0], lines[0]
    assert Path(named).name in lines[0], f"{Path(named).name} not named in: {lines[0]}"
    assert (hashes(tmp_path / "in") if (tmp_path / "in").exists() else {}) == before, "an input changed"


def test_paths_with_spaces_and_non_ascii_characters_work(runs, tmp_path):
    folder = tmp_path / "Ärztliche Befunde" / "série 1 (copy)"
    source = nifti(folder / "Patient Müller – T1 κ.nii.gz", volume())
    out = tmp_path / "Masken für Dr. Øberg"
    assert main(["predict", str(runs["3d"]), str(folder), "--out", str(out), "--quiet"]) == 0
    assert nib.load(out / source.name).shape == (24, 24, 24)


def test_a_one_voxel_volume_and_a_one_pixel_image_are_segmented(runs, tmp_path):
    """Documented handling: inputs smaller than the training patch or slice are padded and cropped back."""
    nifti(tmp_path / "in" / "voxel.nii.gz", np.ones((1, 1, 1)))
    save_png(tmp_path / "in2d" / "pixel.png", np.ones((1, 1)) * 100)
    assert main(["predict", str(runs["3d"]), str(tmp_path / "in" / "voxel.nii.gz"), "--out", str(tmp_path / "a"),
                 "--quiet"]) == 0
    assert main(["predict", str(runs["2d"]), str(tmp_path / "in2d" / "pixel.png"), "--out", str(tmp_path / "b"),
                 "--quiet"]) == 0
    assert nib.load(tmp_path / "a" / "voxel.nii.gz").shape == (1, 1, 1)
    assert np.asarray(PILImage.open(tmp_path / "b" / "pixel.png")).shape == (1, 1)


def test_a_read_only_output_folder_gets_one_line(runs, tmp_path):
    """Root ignores file permissions, so the folder is a read-only tmpfs in a user and mount namespace."""
    from test_resume import can_mount_tmpfs

    if not can_mount_tmpfs():
        pytest.skip("needs a read-only tmpfs: 'unshare -rm' (user and mount namespaces) is not allowed here")
    import subprocess
    import sys

    source = nifti(tmp_path / "in" / "scan.nii.gz", volume())
    locked = tmp_path / "locked"
    locked.mkdir()
    before = hashes(tmp_path / "in")
    command = (f"mount -t tmpfs -o ro,size=64k none {locked} && {sys.executable} -m medseg predict {runs['3d']} "
               f"{source} --out {locked}/masks --quiet")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "locked/masks" in lines[0] and "Read-only file system" in lines[0]
    assert hashes(tmp_path / "in") == before
