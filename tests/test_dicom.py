"""DICOM series and ITK formats: geometry checked against SimpleITK as an independent reference."""
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medseg.dicom import LPS_TO_RAS, list_series
from medseg.errors import MedsegError
from medseg.io import mask_path_for, read_image, write_mask
from conftest import shared_dataset

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_series(folder, volume, description="T1", positions=None, orientation=(1, 0, 0, 0, 1, 0),
                 spacing=(0.9, 0.8), uid=None):
    """volume: (slices, rows, columns) uint16. Files are named in reverse order to prove sorting by position."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    row_dir, col_dir = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    if positions is None:
        positions = [np.array([-20.0, 10.0, 5.0]) + k * 2.5 * normal for k in range(len(volume))]
    for k, (pixels, position) in enumerate(zip(volume, positions)):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MR_STORAGE
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID, ds.SOPInstanceUID = MR_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SeriesDescription = uid, "1.2.3", description
        ds.Modality, ds.InstanceNumber = "MR", k + 1
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = list(spacing)
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 2, -100
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        ds.save_as(folder / f"{len(volume) - k:03d}_{description}.dcm", enforce_file_format=True)
    return uid


def itk_reference(folder, uid=None):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), uid or ""))
    itk = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(itk.GetDirection()).reshape(3, 3) * np.array(itk.GetSpacing())
    lps[:3, 3] = itk.GetOrigin()
    return np.transpose(sitk.GetArrayFromImage(itk)), LPS_TO_RAS @ lps


def test_oblique_series_matches_simpleitk(tmp_path):
    angle = np.deg2rad(25)
    orientation = (np.cos(angle), np.sin(angle), 0, 0, 0, -1)  # oblique coronal
    volume = np.random.default_rng(0).integers(0, 4000, size=(7, 12, 9))
    write_series(tmp_path / "s", volume, orientation=orientation)
    image = read_image(tmp_path / "s")
    array, affine = itk_reference(tmp_path / "s")
    assert image.array.shape == (1, 9, 12, 7)
    np.testing.assert_allclose(image.array[0], array, atol=1e-4)
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    assert image.spacing == pytest.approx((0.8, 0.9, 2.5))
    assert image.array.max() == pytest.approx(volume.max() * 2 - 100)  # rescale slope and intercept applied


def test_mixed_series_are_listed_and_chosen(tmp_path):
    write_series(tmp_path, np.zeros((3, 4, 4)), description="T1")
    uid = write_series(tmp_path, np.ones((4, 4, 4)), description="FLAIR")
    assert sorted(s.description for s in list_series(tmp_path)) == ["FLAIR", "T1"]
    with pytest.raises(MedsegError, match="2 DICOM series in one folder.*--series"):
        read_image(tmp_path)
    assert read_image(tmp_path, series="FLAIR").array.shape == (1, 4, 4, 4)
    assert read_image(tmp_path, series=uid).meta["series_description"] == "FLAIR"
    with pytest.raises(MedsegError, match="matches 0 series"):
        read_image(tmp_path, series="T2")


def test_missing_slice_is_an_error(tmp_path):
    positions = [np.array([0, 0, z], float) for z in (0, 2, 4, 8, 10)]
    write_series(tmp_path, np.zeros((5, 4, 4)), positions=positions)
    with pytest.raises(MedsegError, match="slices are missing"):
        read_image(tmp_path)


def test_shared_dicom_series_geometry():
    folder = shared_dataset("dicom_mr_study", "11_HCropVolume")
    image = read_image(folder)
    array, affine = itk_reference(folder)
    assert image.array.shape == (1, 34, 50, 40) and image.meta["series_description"] == "HippoCrop"
    np.testing.assert_allclose(image.array[0], array)
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)


def test_dicom_mask_is_a_nifti_with_the_series_geometry(tmp_path):
    import nibabel as nib

    write_series(tmp_path / "scan", np.random.default_rng(1).integers(0, 99, size=(5, 6, 8)))
    image = read_image(tmp_path / "scan")
    out = write_mask(np.ones(image.spatial_shape, np.uint8), image, mask_path_for(tmp_path / "scan", tmp_path / "o"))
    assert out.name == "scan.nii.gz"
    np.testing.assert_allclose(nib.load(out).affine, image.affine, atol=1e-5)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_itk_formats_round_trip_geometry(tmp_path, suffix):
    data = np.random.default_rng(2).normal(size=(6, 7, 8)).astype(np.float32)  # (Z, Y, X) as ITK stores it
    itk = sitk.GetImageFromArray(data)
    itk.SetSpacing((0.5, 0.7, 3.0))
    itk.SetOrigin((10.0, -4.0, 2.5))
    direction = sitk.VersorRigid3DTransform((0, 0, np.sin(0.2), np.cos(0.2))).GetMatrix()
    itk.SetDirection(direction)
    sitk.WriteImage(itk, str(tmp_path / f"vol{suffix}"))
    image = read_image(tmp_path / f"vol{suffix}")
    assert image.array.shape == (1, 8, 7, 6) and image.spacing == pytest.approx((0.5, 0.7, 3.0))
    x, y, z = 3, 2, 1  # the affine maps a voxel index to RAS: ITK's physical point with x and y negated
    lps = itk.TransformIndexToPhysicalPoint((x, y, z))
    np.testing.assert_allclose(image.affine @ [x, y, z, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-5)
    mask = (image.array[0] > 0).astype(np.uint8)
    out = write_mask(mask, image, mask_path_for(image.path, tmp_path / "out"))
    back = sitk.ReadImage(str(out))
    assert out.name == f"vol{suffix}" and back.GetSize() == itk.GetSize()
    np.testing.assert_allclose(back.GetDirection(), direction, atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), itk.GetOrigin())
    np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(back)), mask)
    assert not list((tmp_path / "out").glob(".tmp-*"))


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_2d_itk_spacing_follows_the_array_axes(tmp_path, suffix):
    # a 2D image is read as (C, rows, columns) like a PNG; ITK gives spacing as (x = columns, y = rows)
    itk = sitk.GetImageFromArray(np.zeros((10, 20), np.float32))  # 10 rows, 20 columns
    itk.SetSpacing((0.5, 2.0))  # columns 0.5 mm apart, rows 2 mm
    sitk.WriteImage(itk, str(tmp_path / f"slice{suffix}"))
    image = read_image(tmp_path / f"slice{suffix}")
    assert image.array.shape == (1, 10, 20) and image.spacing == pytest.approx((2.0, 0.5))
