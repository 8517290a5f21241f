"""A network works in one voxel order (its first training volume's); volumes stored in another are reoriented to
it and the result reoriented back, so a scan stored left-posterior gets the same mask, in world space, as the
same scan stored right-anterior."""
import nibabel as nib
import numpy as np

from medseg.checkpoint import load_run
from medseg.config import TrainConfig
from medseg.data import load_case, to_orientation
from medseg.datasets import Case
from medseg.infer import native_probabilities
from medseg.io import Image, read_image
from medseg.predict import predict_files
from medseg.transforms import reorient, reoriented_spacing

# voxel axis 0 runs posterior (1 mm), axis 1 runs left (2 mm), axis 2 runs superior (3 mm)
PLS = np.array([[0, -2.0, 0, 10], [-1.0, 0, 0, 20], [0, 0, 3.0, 30], [0, 0, 0, 1]])


def test_reorientation_permutes_and_flips_exactly_and_keeps_world_positions():
    array = np.random.default_rng(0).random((2, 3, 4, 5))
    ras = reorient(array, PLS, "RAS")
    np.testing.assert_array_equal(ras, array[:, ::-1, ::-1, :].transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(reorient(ras, PLS, "RAS", inverse=True), array)
    assert reoriented_spacing((1.0, 2.0, 3.0), PLS, "RAS") == (2.0, 1.0, 3.0)
    moved = to_orientation(Image(array, (1.0, 2.0, 3.0), PLS), "RAS")
    assert moved.orientation == "RAS" and moved.spacing == (2.0, 1.0, 3.0) and moved.spatial_shape == (4, 3, 5)
    for x, y, z in [(0, 0, 0), (3, 1, 4), (2, 2, 1)]:  # the same voxel sits at the same place in the world
        np.testing.assert_allclose(moved.affine @ [x, y, z, 1], PLS @ [2 - y, 3 - x, z, 1])
        assert moved.array[1, x, y, z] == array[1, 2 - y, 3 - x, z]


def _store_flipped(source, target):
    """`source` stored left-posterior: the same voxels at the same world positions, axes 0 and 1 reversed."""
    image = nib.load(source)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(image.shape[:2]) - 1
    data = np.asarray(image.dataobj)[::-1, ::-1]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), image.affine @ flip), target)


def test_a_scan_stored_in_another_orientation_gets_the_same_mask(trained_3d, phantoms_3d, tmp_path):
    trained = load_run(trained_3d, device="cpu")
    assert trained.config.orientation == "RAS"  # recorded at training from the first training volume
    source = phantoms_3d / "imagesTr" / "phantom_001.nii.gz"
    (tmp_path / "flipped").mkdir()
    _store_flipped(source, tmp_path / "flipped" / "phantom_001.nii.gz")
    flipped = read_image(tmp_path / "flipped" / "phantom_001.nii.gz")
    assert flipped.orientation == "LPS"
    straight = native_probabilities(trained, read_image(source).array, (1.0, 1.0, 1.0))
    handled = native_probabilities(trained, flipped.array, flipped.spacing, flipped.affine)
    np.testing.assert_allclose(handled, straight[:, ::-1, ::-1], atol=1e-6)
    ignored = native_probabilities(trained, flipped.array, flipped.spacing)  # what a network-order-blind tool does
    assert np.abs(ignored - straight[:, ::-1, ::-1]).max() > 1e-3
    (a,) = predict_files(trained_3d, [source], tmp_path / "a", progress=False)
    (b,) = predict_files(trained_3d, [tmp_path / "flipped"], tmp_path / "b", progress=False)
    np.testing.assert_array_equal(np.asarray(nib.load(b).dataobj), np.asarray(nib.load(a).dataobj)[::-1, ::-1])
    np.testing.assert_allclose(nib.load(b).affine, flipped.affine, atol=1e-5)


def test_training_cases_in_another_orientation_are_reoriented(phantoms_3d, tmp_path):
    image, mask = phantoms_3d / "imagesTr" / "phantom_002.nii.gz", phantoms_3d / "labelsTr" / "phantom_002.nii.gz"
    _store_flipped(image, tmp_path / "image.nii.gz")
    _store_flipped(mask, tmp_path / "mask.nii.gz")
    cfg = TrainConfig(data=str(phantoms_3d), orientation="RAS", normalization="zscore")
    original = load_case(Case("a", [image], mask), cfg)
    moved = load_case(Case("b", [tmp_path / "image.nii.gz"], tmp_path / "mask.nii.gz"), cfg)
    np.testing.assert_array_equal(moved.label, original.label)
    np.testing.assert_allclose(moved.image.array, original.image.array, atol=1e-6)
    assert moved.image.orientation == "RAS"


def test_orientation_flag_is_checked():
    import pytest

    from medseg.errors import MedsegError

    assert TrainConfig(data="x", orientation="LPS").validate().orientation == "LPS"
    for bad in ("RAA", "RA", "XYZ", "RASS"):
        with pytest.raises(MedsegError, match="one letter of L/R, A/P and S/I"):
            TrainConfig(data="x", orientation=bad).validate()
