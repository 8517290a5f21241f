"""What `medseg predict` writes: DICOM SEG for DICOM series (read back voxel for voxel, and checked by the
independent validator dciodvfy), probabilities as .npz, and the uncertainty map beside each mask."""
import hashlib
import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage

from conftest import shared_dataset
from medseg.cli import main
from medseg.dicom_seg import read_dicom_seg, write_dicom_seg
from medseg.io import read_image


@pytest.fixture(scope="module")
def series():
    return shared_dataset("dicom_mr_study", "11_HCropVolume")


def folder_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def validator_errors(path) -> list[str]:
    if not shutil.which("dciodvfy"):
        pytest.skip("dciodvfy not installed (Debian package dicom3tools; .ci/run installs it)")
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def test_a_dicom_seg_reads_back_as_the_mask_and_passes_the_validator(series, tmp_path):
    image = read_image(series)
    mask = np.zeros(image.spatial_shape, np.uint8)
    mask[10:20, 5:15, 8:30] = 1  # two blocks of different classes, one slice range not touched at all
    mask[25:30, 20:30, 12:18] = 2
    path = write_dicom_seg(mask, image, ["background", "anterior", "posterior"], tmp_path / "s.seg.dcm")
    np.testing.assert_array_equal(read_dicom_seg(path, image), mask)
    seg = pydicom.dcmread(path)
    source = pydicom.dcmread(image.meta["files"][0])
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["anterior", "posterior"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
    assert validator_errors(path) == []


def test_predict_writes_a_dicom_seg_equal_to_its_nifti_mask(trained_3d, series, tmp_path, capfd):
    before = folder_hashes(series)
    for fmt in ("dicom-seg", "nifti"):
        assert main(["predict", str(trained_3d), str(series), "--out", str(tmp_path / fmt), "--format", fmt,
                     "--quiet"]) == 0
    seg_path = tmp_path / "dicom-seg" / f"{series.name}.seg.dcm"
    nifti_mask = np.asarray(nib.load(tmp_path / "nifti" / f"{series.name}.nii.gz").dataobj)
    np.testing.assert_array_equal(read_dicom_seg(seg_path, read_image(series)), nifti_mask)
    assert validator_errors(seg_path) == []
    assert folder_hashes(series) == before
    patient = str(pydicom.dcmread(read_image(series).meta["files"][0]).PatientName)
    out, err = capfd.readouterr()
    assert not patient or patient not in out + err  # identifiers never printed


def test_dicom_seg_needs_a_dicom_series(trained_3d, phantoms_3d, tmp_path, capsys):
    source = phantoms_3d / "imagesTr" / "phantom_000.nii.gz"
    assert main(["predict", str(trained_3d), str(source), "--out", str(tmp_path / "o"), "--format", "dicom-seg",
                 "--quiet", "--strict"]) == 2
    assert "needs a DICOM series" in capsys.readouterr().err


def test_probabilities_and_uncertainty_are_written_beside_the_masks(trained_2d, phantoms_2d, tmp_path):
    source = phantoms_2d / "imagesTr" / "phantom_000.png"
    assert main(["predict", str(trained_2d), str(source), "--out", str(tmp_path / "p"), "--format", "npz",
                 "--uncertainty", "--quiet"]) == 0
    assert main(["predict", str(trained_2d), str(source), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    stored = np.load(tmp_path / "p" / "phantom_000.npz")
    probs, labels = stored["probabilities"].astype(np.float32), stored["labels"]
    assert list(stored["class_names"]) == json.loads((trained_2d / "dataset.json").read_text())["class_names"]
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=2e-3)  # float16
    mask = np.asarray(PILImage.open(tmp_path / "m" / "phantom_000.png"))
    np.testing.assert_array_equal(labels, mask)  # three classes: a palette PNG holding the indices
    entropy = np.asarray(PILImage.open(tmp_path / "p" / "phantom_000_uncertainty.png")).astype(np.float32) / 255
    assert entropy.shape == labels.shape and 0 <= entropy.min() and entropy.max() <= 1


def test_a_volume_gets_an_uncertainty_volume_on_its_grid(trained_3d, phantoms_3d, tmp_path):
    source = phantoms_3d / "imagesTr" / "phantom_000.nii.gz"
    assert main(["predict", str(trained_3d), str(source), "--out", str(tmp_path / "o"), "--uncertainty",
                 "--quiet"]) == 0
    uncertainty = nib.load(tmp_path / "o" / "phantom_000_uncertainty.nii.gz")
    np.testing.assert_allclose(uncertainty.affine, nib.load(source).affine)
    values = np.asarray(uncertainty.dataobj)
    assert values.shape == nib.load(source).shape and values.min() >= 0 and values.max() <= 1


def test_segments_carry_the_codes_the_training_data_gives(series, tmp_path):
    codes = {"1": {"category": ["91723000", "SCT", "Anatomical Structure"], "type": ["5279000", "SCT", "Hippocampus"]}}
    image = read_image(series)
    mask = np.zeros(image.spatial_shape, np.uint8)
    mask[10:20, 5:15, 8:30] = 1
    path = write_dicom_seg(mask, image, ["background", "hippocampus"], tmp_path / "s.seg.dcm", codes=codes)
    segment = pydicom.dcmread(path).SegmentSequence[0]
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "5279000"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Hippocampus"
    assert validator_errors(path) == []


def test_codes_in_dataset_json_reach_the_run_and_bad_ones_are_one_line(phantoms_3d, tmp_path):
    from medseg.datasets import find_cases
    from medseg.errors import MedsegError

    data = tmp_path / "data"
    shutil.copytree(phantoms_3d, data)
    meta = json.loads((data / "dataset.json").read_text())
    meta["segment_codes"] = {"1": {"category": ["91723000", "SCT", "Anatomical Structure"],
                                   "type": ["5279000", "SCT", "Hippocampus"]}}
    (data / "dataset.json").write_text(json.dumps(meta))
    assert find_cases(data).segment_codes["1"]["type"][2] == "Hippocampus"
    meta["segment_codes"] = {"1": {"type": "hippocampus"}}
    (data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(MedsegError, match=r"segment_codes\['1'\] needs"):
        find_cases(data)
