"""Labels as users have them: many classes, uint16 masks, classes coded as grey levels, CT without metadata, and
one notice per reading rule however many files it applies to."""
import json

import nibabel as nib
import numpy as np
import pytest

from medseg.console import flush_notes
from medseg.datasets import find_cases, grey_levels, labels_to_classes
from medseg.errors import MedsegError
from medseg.evaluate import evaluate_run
from medseg.plan import choose_normalization, fingerprint, make_plan
from medseg.train import prepare_data, train
from conftest import save_png, tiny_config


def test_declared_labels_up_to_65535_and_uint16_masks():
    values = np.array([[[0, 1, 117, 300]]], np.uint16)
    with pytest.raises(MedsegError, match="declare the classes in dataset.json"):
        labels_to_classes(values, "seg.nii.gz")  # undeclared: more likely instances
    read = labels_to_classes(values, "seg.nii.gz", most=300)
    assert read.dtype == np.uint16 and read.tolist() == [[0, 1, 117, 300]]
    assert labels_to_classes(np.array([[[0, 1, 117]]], np.uint16), "seg.nii.gz", most=117).dtype == np.uint8
    with pytest.raises(MedsegError, match="declare the classes in dataset.json"):
        labels_to_classes(np.array([[[0, 70000]]], np.uint32), "seg.nii.gz", most=117)


def _boxes_dataset(folder, classes=120, cases=4, side=48):
    """Volumes holding `classes` small boxes, each labelled with its own class and intensity."""
    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    grid = int(np.ceil(classes ** (1 / 3)))
    for case in range(cases):
        label = np.zeros((side,) * 3, np.uint8)
        for k in range(classes):
            x, y, z = np.unravel_index(k, (grid,) * 3)
            ox, oy, oz = (rng.integers(0, 2, 3) + np.array([x, y, z]) * (side // grid)).tolist()
            label[ox:ox + 6, oy:oy + 6, oz:oz + 6] = k + 1
        image = (label.astype(np.float32) / classes + rng.normal(0, 0.01, label.shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / "imagesTr" / f"box_{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), folder / "labelsTr" / f"box_{case}.nii.gz")
    names = {"0": "background", **{str(k): f"structure_{k}" for k in range(1, classes + 1)}}
    (folder / "dataset.json").write_text(json.dumps({"labels": names, "modality": {"0": "MRI"}}))
    return folder


def test_a_hundred_and_twenty_classes_train_and_evaluate(tmp_path):
    data = _boxes_dataset(tmp_path / "boxes")
    run = train(tiny_config(data, tmp_path / "run", fit="pad", size=48, epochs=1, steps_per_epoch=2, batch_size=2,
                            test_fraction=0.25))
    assert len(json.loads((run / "dataset.json").read_text())["class_names"]) == 121
    summary = evaluate_run(run, figures=0, progress=False)
    assert len(summary["per_class"]) == 120 and summary["cases"] == 1
    assert all(m["dice"]["n"] + m["dice"]["undefined"] == 1 for m in summary["per_class"].values())


def test_grey_coded_classes_are_recognised_dataset_wide(tmp_path, capsys):
    # four classes stored as 0, 85, 170, 255; one mask lacks the middle classes: its 255 is class 3, not 1
    levels = (0, 85, 170, 255)
    for i in range(6):
        mask = np.zeros((32, 32), np.uint8)
        mask[4:12, 4:12] = 255
        if i:
            mask[16:24, 4:12], mask[16:24, 16:24] = 85, 170
        save_png(tmp_path / "d" / "masks" / f"c{i}.png", mask)
        save_png(tmp_path / "d" / "images" / f"c{i}.png", mask // 2 + 40)
    assert grey_levels({0, 85, 170, 255}) == list(levels)
    assert grey_levels({0, 128, 255}) == [0, 128, 255] and grey_levels({0, 127, 255}) == [0, 128, 255]
    assert grey_levels({0, 255}) is None and grey_levels(set(range(0, 256, 3))) is None  # anti-aliased edges
    assert grey_levels({0, 1, 2, 3}) is None  # class indices
    cfg = tiny_config(tmp_path / "d", tmp_path / "run", test_fraction=0)
    _, split, train_cases, val_cases, names = prepare_data(cfg)
    assert cfg.mask_levels == list(levels) and len(names) == 4
    first = next(c for c in train_cases + val_cases if c.case_id == "c0")
    assert set(np.unique(first.label)) == {0, 3}
    assert capsys.readouterr().err.count("equally spaced grey levels") == 1
    plan = make_plan(tmp_path / "d", calibrate=False, alternatives=False)
    assert plan["configurations"]["auto"]["members"]["2d"]["mask_levels"] == list(levels)
    assert plan["fingerprint"]["class_frequency"].keys() == {"0", "1", "2", "3"}


def test_one_notice_per_kind_with_the_files_it_applies_to(tmp_path, capsys):
    for i in range(20):  # anti-aliased 0/255 masks: thresholded at half their range
        mask = np.zeros((16, 16), np.uint8)
        mask[4:12, 4:12] = 255
        mask[4, 4:12] = 100 + i
        save_png(tmp_path / "d" / "masks" / f"c{i}.png", mask)
        save_png(tmp_path / "d" / "images" / f"c{i}.png", mask)
    prepare_data(tiny_config(tmp_path / "d", tmp_path / "run"))
    lines = [line for line in capsys.readouterr().err.splitlines() if "half their range" in line]
    assert len(lines) == 1 and "20 files" in lines[0]


def test_ct_is_recognised_from_its_intensities(tmp_path):
    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    for i in range(5):
        body = np.zeros((24, 24, 8), bool)
        body[4:20, 4:20] = True
        label = np.zeros(body.shape, np.uint8)
        label[8:14, 8:14, 2:6] = 1
        hu = np.where(body, rng.normal(40, 10, body.shape), -1000 + rng.normal(0, 5, body.shape)).astype(np.int16)
        nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 3, 1])), tmp_path / "imagesTr" / f"ct_{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.diag([0.8, 0.8, 3, 1])), tmp_path / "labelsTr" / f"ct_{i}.nii.gz")
    fp = fingerprint(find_cases(tmp_path))
    chosen, why = choose_normalization(fp)
    assert chosen == "ct" and "recognised from the intensities" in why
    mri = {**fp, "dtypes": ["float32"]}  # the same air share in float data is not taken for CT
    assert choose_normalization(mri)[0] == "zscore"
    assert choose_normalization({**fp, "air_share": 0.0})[0] == "zscore"
