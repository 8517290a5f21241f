import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage

from medseg.errors import MedsegError
from medseg.datasets import labels_to_classes
from medseg.io import mask_path_for, read_image, stem_of, write_mask, write_text_atomic
from conftest import shared_dataset


def oblique_affine() -> np.ndarray:
    angle = np.deg2rad(20)
    affine = np.array([[0.8 * np.cos(angle), -1.2 * np.sin(angle), 0, -90.5],
                       [0.8 * np.sin(angle), 1.2 * np.cos(angle), 0, 12.25],
                       [0, 0, 2.5, 40.0], [0, 0, 0, 1]])
    return affine


def test_nifti_round_trip_keeps_affine_and_shape(tmp_path):
    data = np.random.default_rng(0).normal(size=(7, 9, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, oblique_affine()), tmp_path / "scan.nii.gz")
    image = read_image(tmp_path / "scan.nii.gz")
    assert image.array.shape == (1, 7, 9, 5)
    assert image.spacing == pytest.approx((0.8, 1.2, 2.5))
    assert image.orientation == "RAS" and image.path.name == "scan.nii.gz"
    mask = (image.array[0] > 0).astype(np.uint8) * 2
    out = write_mask(mask, image, mask_path_for(image.path, tmp_path / "out"))
    assert out.name == "scan.nii.gz"
    back = nib.load(out)
    assert back.shape == data.shape
    np.testing.assert_array_equal(back.affine, nib.load(tmp_path / "scan.nii.gz").affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj), mask)
    assert back.get_data_dtype() == np.uint8


def test_nifti_mask_ignores_image_intensity_scaling(tmp_path):
    nii = nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4))
    nii.header.set_slope_inter(0.5, 10)
    nib.save(nii, tmp_path / "scaled.nii")
    image = read_image(tmp_path / "scaled.nii")
    out = write_mask(np.ones((4, 4, 4), np.uint8), image, tmp_path / "mask.nii")
    assert np.asarray(nib.load(out).dataobj).max() == 1


def test_4d_nifti_channels_come_first(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7, 2), np.float32), np.eye(4)), tmp_path / "mc.nii.gz")
    assert read_image(tmp_path / "mc.nii.gz").array.shape == (2, 5, 6, 7)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp"])
def test_raster_round_trip_same_size_and_format(tmp_path, suffix):
    data = (np.arange(30 * 20).reshape(30, 20) % 256).astype(np.uint8)
    PILImage.fromarray(data).save(tmp_path / f"img{suffix}")
    image = read_image(tmp_path / f"img{suffix}")
    assert image.array.shape == (1, 30, 20) and image.ndim == 2
    np.testing.assert_array_equal(image.array[0], data)
    mask = (data > 100).astype(np.uint8)
    out = write_mask(mask, image, mask_path_for(image.path, tmp_path / "out"), num_classes=2)
    assert out.suffix == suffix
    np.testing.assert_array_equal(np.asarray(PILImage.open(out)), mask * 255)  # visible in any viewer
    np.testing.assert_array_equal(labels_to_classes(read_image(out).array, out), mask)  # and read back as 0/1


def test_multiclass_2d_masks_are_palette_pngs_holding_class_indices(tmp_path):
    PILImage.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "img.png")
    image = read_image(tmp_path / "img.png")
    mask = (np.arange(48).reshape(6, 8) % 3).astype(np.uint8)
    out = write_mask(mask, image, tmp_path / "out" / "img.png", num_classes=3)
    pil = PILImage.open(out)
    assert pil.mode == "P" and pil.getpalette()[3:6] == [31, 119, 180]  # class 1 has a colour, not near-black
    np.testing.assert_array_equal(np.asarray(pil), mask)  # raw pixel values are the class indices
    np.testing.assert_array_equal(read_image(out).array[0], mask)  # medseg reads the indices back


def test_written_files_follow_the_umask(tmp_path):
    import os

    PILImage.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "img.png")
    image = read_image(tmp_path / "img.png")
    for umask, mode in ((0o022, 0o644), (0o002, 0o664)):
        old = os.umask(umask)
        try:
            out = write_mask(np.zeros((4, 4), np.uint8), image, tmp_path / f"out{umask}" / "img.png")
            write_text_atomic(tmp_path / f"t{umask}.json", "{}")
        finally:
            os.umask(old)
        assert out.stat().st_mode & 0o777 == mode and (tmp_path / f"t{umask}.json").stat().st_mode & 0o777 == mode


def test_lossy_inputs_get_lossless_masks(tmp_path):
    assert mask_path_for(tmp_path / "photo.jpg", tmp_path).name == "photo.png"
    assert mask_path_for(tmp_path / "anim.gif", tmp_path).name == "anim.png"
    assert mask_path_for(tmp_path / "case.nii.gz", tmp_path).name == "case.nii.gz"
    assert stem_of("a.b.nii.gz") == "a.b"


def test_rgb_kept_or_converted_and_alpha_dropped(tmp_path):
    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 3] = 200, 100, 7
    PILImage.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    kept = read_image(tmp_path / "rgba.png")
    assert kept.array.shape == (3, 8, 10)
    assert kept.array[:, 0, 0].tolist() == [200, 100, 0]
    grey = read_image(tmp_path / "rgba.png", color="gray")
    assert grey.array.shape == (1, 8, 10)
    assert grey.array[0, 0, 0] == pytest.approx(0.299 * 200 + 0.587 * 100)


def test_jpeg_and_grey_palette_gif(tmp_path):
    PILImage.fromarray(np.full((6, 6, 3), 128, np.uint8)).save(tmp_path / "x.jpg")
    assert read_image(tmp_path / "x.jpg").array.shape == (3, 6, 6)
    PILImage.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("P").save(tmp_path / "m.gif")
    gif = read_image(tmp_path / "m.gif")
    assert gif.array.shape == (1, 2, 2)
    assert sorted(np.unique(gif.array).tolist()) == [0, 255]


def test_npy_layouts_and_round_trip(tmp_path):
    np.save(tmp_path / "vol.npy", np.zeros((4, 5, 6), np.float32))
    np.save(tmp_path / "rgb.npy", np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3))
    np.save(tmp_path / "rgba.npy", np.zeros((4, 5, 4), np.uint8))
    vol = read_image(tmp_path / "vol.npy")
    assert vol.array.shape == (1, 4, 5, 6)
    # a 3D array is a volume, even with 3 or 4 slices: a shape cannot tell it from a colour image, so no guess
    assert read_image(tmp_path / "rgb.npy").array.shape == (1, 4, 5, 3)
    assert read_image(tmp_path / "rgba.npy").array.shape == (1, 4, 5, 4)
    rgb = read_image(tmp_path / "rgb.npy", npy_layout="hwc")
    assert rgb.array.shape == (3, 4, 5) and rgb.array[2, 0, 1] == 5  # channels last, every value kept
    assert read_image(tmp_path / "rgba.npy", npy_layout="hwc").array.shape == (4, 4, 5)  # alpha not dropped
    assert read_image(tmp_path / "rgb.npy", npy_layout="chw").array.shape == (4, 5, 3)
    out = write_mask(np.ones((4, 5, 6), np.uint8), vol, tmp_path / "out" / "vol.npy")
    assert np.load(out).shape == (4, 5, 6)


def test_missing_unreadable_and_unsupported_files(tmp_path):
    with pytest.raises(MedsegError, match="not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(MedsegError, match="broken.nii.gz: cannot be read"):
        read_image(tmp_path / "broken.nii.gz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MedsegError, match="unsupported file type"):
        read_image(tmp_path / "notes.txt")


def test_write_mask_is_atomic_and_checks_shape(tmp_path):
    PILImage.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    with pytest.raises(ValueError):
        write_mask(np.zeros((4, 4), np.uint8), image, tmp_path / "out" / "a.png")
    assert not (tmp_path / "out").exists()
    write_mask(np.zeros((5, 5), np.uint8), image, tmp_path / "out" / "a.png")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.png"]  # no temporary file left behind


def test_reads_real_formats_in_place():
    em = read_image(shared_dataset("isbi2012_em", "train", "image", "0.png"))
    assert em.array.shape == (1, 512, 512)
    fundus = read_image(shared_dataset("drive", "training", "images", "21_training.tif"))
    assert fundus.array.shape == (3, 584, 565)
    hippo = read_image(shared_dataset("msd_hippocampus", "Task04_Hippocampus", "imagesTr", "hippocampus_001.nii.gz"))
    assert hippo.ndim == 3 and hippo.spacing == (1.0, 1.0, 1.0) and hippo.affine.shape == (4, 4)
