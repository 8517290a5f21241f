import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage

from medseg.errors import MedsegError
from medseg.cli import main
from medseg.predict import SomeInputsFailed, predict_files


def test_png_and_jpeg_inputs_give_masks_of_the_same_size(trained_2d, phantoms_2d, tmp_path):
    source = phantoms_2d / "imagesTr" / "phantom_000.png"
    PILImage.open(source).convert("L").resize((50, 40)).save(tmp_path / "other.jpg")
    written = predict_files(trained_2d, [source, tmp_path / "other.jpg"], tmp_path / "out", overlays=True,
                            progress=False)
    assert [p.name for p in written] == ["phantom_000.png", "other.png"]
    assert PILImage.open(written[0]).size == (32, 32) and PILImage.open(written[1]).size == (50, 40)
    assert set(np.unique(np.asarray(PILImage.open(written[0])))) <= {0, 1, 2}
    assert (tmp_path / "out" / "overlays" / "other.png").exists()


def test_nifti_volume_keeps_geometry(trained_3d, phantoms_3d, tmp_path):
    source = phantoms_3d / "imagesTr" / "phantom_000.nii.gz"
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    affine[:3, 3] = [5, -7, 11]
    original = nib.load(source)
    nib.save(nib.Nifti1Image(np.asarray(original.dataobj)[:, :20, :], affine), tmp_path / "scan.nii.gz")
    (mask_path,) = predict_files(trained_3d, [tmp_path], tmp_path / "out", progress=False)
    mask = nib.load(mask_path)
    assert mask_path.name == "scan.nii.gz" and mask.shape == (24, 20, 24)
    np.testing.assert_array_equal(mask.affine, nib.load(tmp_path / "scan.nii.gz").affine)  # as stored: float32
    np.testing.assert_allclose(mask.affine, affine, atol=1e-6)


def test_inputs_checked_before_anything_is_written(trained_2d, phantoms_2d, tmp_path):
    with pytest.raises(MedsegError, match="missing.png: not found"):
        predict_files(trained_2d, [phantoms_2d / "imagesTr", tmp_path / "missing.png"], tmp_path / "out",
                      progress=False)
    assert not (tmp_path / "out").exists()


def test_wrong_channel_count(trained_2d, tmp_path):
    PILImage.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(MedsegError, match="3 channels, the model expects 1"):
        predict_files(trained_2d, [tmp_path / "rgb.png"], tmp_path / "out", progress=False)


def test_dicom_series_in_nifti_out(trained_3d, tmp_path):
    """A DICOM series folder is one input; its mask is a NIfTI with the series' geometry."""
    from conftest import shared_dataset
    from medseg.io import read_image

    series = shared_dataset("dicom_mr_study", "11_HCropVolume")
    (mask_path,) = predict_files(trained_3d, [series], tmp_path / "out", overlays=True, progress=False)
    image = read_image(series)
    mask = nib.load(mask_path)
    assert mask_path.name == "11_HCropVolume.nii.gz" and mask.shape == image.spatial_shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
    assert (tmp_path / "out" / "overlays" / "11_HCropVolume.png").exists()
    study = series.parent  # a study folder: one input per series folder
    from medseg.predict import collect_inputs

    assert len(collect_inputs([study])) == 5


def test_cross_validation_folds_are_ensembled(phantoms_2d, tmp_path):
    from medseg.checkpoint import load_models
    from medseg.cli import main
    from medseg.infer import predict_image, predict_probabilities
    from medseg.io import read_image
    from medseg.transforms import normalize

    assert main(["train", str(phantoms_2d), "--out", str(tmp_path / "cv"), "--folds", "3", "--all-folds",
                 "--size", "32", "--base-channels", "4", "--depth", "2", "--epochs", "1", "--steps-per-epoch", "2",
                 "--quiet"]) == 0
    splits = [json.loads((tmp_path / "cv" / f"fold_{k}" / "split.json").read_text()) for k in range(3)]
    assert sorted(sum([s["val"] for s in splits], splits[0]["test"])) == \
        sorted(p.name[:-4] for p in (phantoms_2d / "imagesTr").iterdir())
    assert all(s["test"] == splits[0]["test"] for s in splits)  # the folds share the test cases
    from medseg.evaluate import evaluate_run

    pooled = evaluate_run(tmp_path / "cv", cases="val", figures=0, progress=False)
    assert pooled["cases"] == 12 - len(splits[0]["test"]) and "pooled out of fold" in pooled["data"]
    test = evaluate_run(tmp_path / "cv", out=tmp_path / "ev", figures=0, progress=False)
    assert test["cases"] == len(splits[0]["test"])
    models = load_models(tmp_path / "cv")
    assert len(models) == 3
    for model in models:
        model.postprocess_classes = []  # compare raw ensembles
    image = read_image(phantoms_2d / "imagesTr" / "phantom_000.png")
    array = normalize(image.array, models[0].config.normalization)
    mean = sum(predict_probabilities(m, array) for m in models) / 3
    np.testing.assert_array_equal(predict_image(models, image), mean.argmax(0))
    (mask,) = predict_files(tmp_path / "cv", [image.path], tmp_path / "out", progress=False)
    assert PILImage.open(mask).size == (32, 32)


def test_nnunet_channel_files_are_one_input(tmp_path):
    """A two-channel model gets `case_0000` + `case_0001` as one input and writes `case.nii.gz`."""
    from medseg.train import train
    from conftest import tiny_config

    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / "d" / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for case in ("a", "b", "c"):
        label = (rng.random((16, 16, 8)) > 0.7).astype(np.uint8)
        for channel in (0, 1):
            image = label * (1.0 + channel) + rng.normal(0, 0.1, label.shape)
            nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)),
                     tmp_path / "d" / "imagesTr" / f"{case}_{channel:04d}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "d" / "labelsTr" / f"{case}.nii.gz")
    run = train(tiny_config(tmp_path / "d", tmp_path / "run", size=16, epochs=1, steps_per_epoch=1))
    written = predict_files(run, [tmp_path / "d" / "imagesTr"], tmp_path / "out", progress=False)
    assert [p.name for p in written] == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert nib.load(written[0]).shape == (16, 16, 8)
    (tmp_path / "d" / "imagesTr" / "c_0001.nii.gz").unlink()
    with pytest.raises(MedsegError, match="1 channel files, the model expects 2"):
        predict_files(run, [tmp_path / "d" / "imagesTr"], tmp_path / "out2", progress=False)


def folder_with_broken_files(phantoms_2d, folder):
    """Three good images and four broken ones, interleaved in name order."""
    folder.mkdir()
    good = sorted((phantoms_2d / "imagesTr").iterdir())[:3]
    for i, path in enumerate(good):
        shutil.copy(path, folder / f"{2 * i}_good.png")
    (folder / "1_empty.png").write_bytes(b"")
    (folder / "3_truncated.png").write_bytes(good[0].read_bytes()[:60])
    (folder / "5_not_an_image.png").write_text("patient list, not a picture\n")
    PILImage.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "7_colour.png")
    return folder


def test_predict_writes_every_good_case_then_lists_the_broken_ones(trained_2d, phantoms_2d, tmp_path, capsys):
    folder = folder_with_broken_files(phantoms_2d, tmp_path / "inbox")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["predict", str(trained_2d), str(folder), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0_good.png", "2_good.png", "4_good.png"]
    out, err = capsys.readouterr()
    assert "3 masks written" in out and "4 inputs failed" in out
    lines = err.strip().splitlines()
    assert len(lines) == 5 and "Traceback" not in err
    for name, why in [("1_empty.png", "cannot be read"), ("3_truncated.png", "cannot be read"),
                      ("5_not_an_image.png", "cannot be read"), ("7_colour.png", "3 channels, the model expects 1")]:
        assert any(name in line and why in line for line in lines[:4]), name
    assert lines[-1].startswith("medseg: error: 4 of 7 inputs could not be segmented")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # inputs untouched


def test_predict_strict_stops_at_the_first_broken_input(trained_2d, phantoms_2d, tmp_path, capsys):
    folder = folder_with_broken_files(phantoms_2d, tmp_path / "inbox")
    assert main(["predict", str(trained_2d), str(folder), "--out", str(tmp_path / "out"), "--quiet",
                 "--strict"]) == 2
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["0_good.png"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1_empty.png" in err[0]


def test_the_python_api_names_the_broken_inputs_after_writing_the_rest(trained_2d, phantoms_2d, tmp_path):
    folder = folder_with_broken_files(phantoms_2d, tmp_path / "inbox")
    with pytest.raises(SomeInputsFailed) as failure:
        predict_files(trained_2d, [folder], tmp_path / "out", progress=False)
    assert len(failure.value.written) == 3 and [p.name for p, _ in failure.value.failed] == [
        "1_empty.png", "3_truncated.png", "5_not_an_image.png", "7_colour.png"]


def masks_in(folder):
    return {p.name: np.asarray(PILImage.open(p)).tobytes() for p in sorted(folder.iterdir())}


def test_shards_cover_every_input_exactly_once(trained_2d, phantoms_2d, tmp_path):
    images = phantoms_2d / "imagesTr"
    assert main(["predict", str(trained_2d), str(images), "--out", str(tmp_path / "all"), "--quiet"]) == 0
    for index in range(3):  # into one folder: an input predicted twice would meet its mask and be refused
        assert main(["predict", str(trained_2d), str(images), "--out", str(tmp_path / "sharded"), "--quiet",
                     "--shard", f"{index}/3"]) == 0
    assert masks_in(tmp_path / "sharded") == masks_in(tmp_path / "all")
    shares = [set(p.name for p in predict_files(trained_2d, [images], tmp_path / f"s{i}", progress=False,
                                                shard=(i, 3))) for i in range(3)]
    assert sum(len(s) for s in shares) == len(set().union(*shares)) == len(list(images.iterdir()))


def test_workers_write_what_one_process_writes_and_still_list_failures(trained_2d, phantoms_2d, tmp_path):
    folder = folder_with_broken_files(phantoms_2d, tmp_path / "inbox")
    assert main(["predict", str(trained_2d), str(folder), "--out", str(tmp_path / "one"), "--quiet"]) == 2
    with pytest.raises(SomeInputsFailed) as failure:
        predict_files(trained_2d, [folder], tmp_path / "two", progress=False, workers=2)
    assert [p.name for p, _ in failure.value.failed] == ["1_empty.png", "3_truncated.png", "5_not_an_image.png",
                                                         "7_colour.png"]
    assert masks_in(tmp_path / "two") == masks_in(tmp_path / "one")


def test_a_shard_outside_its_range_is_refused(trained_2d, phantoms_2d, tmp_path):
    assert main(["predict", str(trained_2d), str(phantoms_2d / "imagesTr"), "--out", str(tmp_path / "o"),
                 "--shard", "3/3", "--quiet"]) == 2
    assert main(["predict", str(trained_2d), str(phantoms_2d / "imagesTr"), "--out", str(tmp_path / "o"),
                 "--shard", "half", "--quiet"]) == 2
