import csv
import json

import nibabel as nib
import numpy as np
import pytest

from medseg.console import flush_notes
from medseg.datasets import find_cases, labels_to_classes, split_cases
from medseg.errors import MedsegError
from conftest import save_png, shared_dataset


def test_msd_layout_with_dataset_json(phantoms_3d):
    dataset = find_cases(phantoms_3d)
    assert dataset.layout == "msd" and len(dataset.cases) == 5
    assert dataset.class_names == ["background", "ellipse", "ring"]
    assert all(c.images[0].exists() and c.mask.exists() for c in dataset.cases)


def test_nnunet_channel_suffixes_and_v2_labels(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for case in ("a", "b"):
        for channel in (0, 1):
            nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)),
                     tmp_path / "imagesTr" / f"{case}_{channel:04d}.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "labelsTr" / f"{case}.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "tumour": 1}, "file_ending": ".nii.gz"}))
    dataset = find_cases(tmp_path)
    assert [c.case_id for c in dataset.cases] == ["a", "b"]
    assert [p.name for p in dataset.cases[0].images] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert dataset.class_names == ["background", "tumour"]
    assert dataset.modalities == ["T1", "T2"]


@pytest.mark.parametrize("image_dir,mask_dir", [("images", "masks"), ("img", "gt"), ("train/image", "train/label")])
def test_paired_folders_detected(tmp_path, image_dir, mask_dir):
    for name in ("1", "2", "10"):
        save_png(tmp_path / image_dir / f"{name}.png", np.zeros((4, 4)))
        save_png(tmp_path / mask_dir / f"{name}.png", np.zeros((4, 4)))
    dataset = find_cases(tmp_path)
    assert dataset.layout == "pairs"
    assert [c.case_id for c in dataset.cases] == ["1", "2", "10"]


def test_paired_folders_override_and_mask_suffix(tmp_path):
    save_png(tmp_path / "raw" / "cell.png", np.zeros((4, 4)))
    save_png(tmp_path / "annot" / "cell_mask.png", np.zeros((4, 4)))
    dataset = find_cases(tmp_path, images="raw", masks="annot")
    assert dataset.cases[0].mask.name == "cell_mask.png"
    with pytest.raises(MedsegError, match="no dataset layout recognised"):
        find_cases(tmp_path)


def test_manifest_with_case_ids_relative_paths(tmp_path):
    for i in range(3):
        save_png(tmp_path / "data" / f"s{i}.png", np.zeros((4, 4)))
        save_png(tmp_path / "data" / f"s{i}_lab.png", np.zeros((4, 4)))
    with open(tmp_path / "list.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "mask", "case_id"])
        writer.writerows([[f"data/s{i}.png", f"data/s{i}_lab.png", "p1" if i < 2 else "p2"] for i in range(3)])
    dataset = find_cases(tmp_path / "list.csv")
    assert [c.case_id for c in dataset.cases] == ["p1", "p1", "p2"]
    (tmp_path / "bad.csv").write_text("image,mask\ndata/missing.png,data/s0_lab.png\n")
    with pytest.raises(MedsegError, match="line 2"):
        find_cases(tmp_path / "bad.csv")


def test_empty_and_missing_datasets(tmp_path):
    with pytest.raises(MedsegError, match="not found"):
        find_cases(tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(MedsegError, match="no labelled cases"):
        find_cases(tmp_path)


def test_label_rules():
    np.testing.assert_array_equal(labels_to_classes(np.array([[[0, 255]]]), "m.png"), [[0, 1]])
    floats = labels_to_classes(np.array([[[0.0, 1.0, 2.0]]], np.float32), "m.nii")
    assert floats.dtype == np.uint8 and floats.tolist() == [[0, 1, 2]]
    with pytest.raises(MedsegError, match="m.nii: mask holds non-integer"):
        labels_to_classes(np.array([[[0.0, 1.5, 2.0]]]), "m.nii")
    with pytest.raises(MedsegError, match="m.nii: mask holds NaN"):
        labels_to_classes(np.array([[[0.0, np.nan]]]), "m.nii")
    with pytest.raises(MedsegError, match="--binary-masks"):
        labels_to_classes(np.arange(300).reshape(1, 10, 30), "inst.png")
    assert labels_to_classes(np.arange(300).reshape(1, 10, 30), "inst.png", binary=True).sum() == 299
    with pytest.raises(MedsegError, match="colour image"):
        labels_to_classes(np.stack([np.zeros((2, 2)), np.ones((2, 2)), np.zeros((2, 2))]), "rgb.png")


def test_grey_level_masks_are_thresholded_at_half_range(capsys):
    """A JPEG/PNG mask with anti-aliased edges: mostly 0 and 255, some values in between."""
    mask = np.zeros((1, 8, 8), np.uint8)
    mask[0, 2:6, 2:6] = 255
    mask[0, 2, 2:6], mask[0, 5, 2:6] = 200, 40  # soft edges
    read = labels_to_classes(mask, "xray_mask.png")
    assert read[2:5, 2:6].all() and not read[5].any() and read.sum() == 12
    flush_notes()
    assert "half their range" in capsys.readouterr().err
    assert labels_to_classes(mask, "xray_mask.png", threshold=30).sum() == 16  # --mask-threshold
    soft = labels_to_classes(np.array([[[0.0, 0.2, 0.7, 1.0]]]), "soft.nii")  # a soft float mask: at 0.5
    assert soft.tolist() == [[0, 0, 1, 1]]
    instances = (np.arange(64) % 60).astype(np.uint8).reshape(1, 8, 8)  # many labels, few at 255: not grey
    with pytest.raises(MedsegError, match="--binary-masks"):
        labels_to_classes(instances, "inst.png")


def test_label_values_declared_named_or_without_gaps():
    from medseg.datasets import check_label_values

    check_label_values({"a.nii": {0, 1}, "b.nii": {0, 2}}, [0, 1, 2], None)
    with pytest.raises(MedsegError, match="b.nii: mask value 7 is not a class"):
        check_label_values({"a.nii": {0, 1}, "b.nii": {0, 7}}, [0, 1, 2], None)
    with pytest.raises(MedsegError, match="b.png: mask value 3 is not a class .--class-names"):
        check_label_values({"a.png": {0, 1}, "b.png": {0, 3}}, None, ["background", "cell", "nucleus"])
    check_label_values({"a.png": {0, 1}, "b.png": {0, 1, 2}}, None, None)
    with pytest.raises(MedsegError, match="b.png: mask value 5, but no mask holds 2"):
        check_label_values({"a.png": {0, 1}, "b.png": {0, 1, 5}}, None, None)


def test_stray_value_in_dataset_json_dataset_stops_training(tmp_path):
    from medseg.synth import write_synthetic_dataset
    from medseg.train import prepare_data
    from conftest import tiny_config

    data = write_synthetic_dataset(tmp_path / "d", cases=6, dim=2, size=32, num_classes=1)
    mask = next((data / "labelsTr").iterdir())
    save_png(mask, np.full((32, 32), 9))
    with pytest.raises(MedsegError, match=f"{mask.name}: mask value 9 is not a class"):
        prepare_data(tiny_config(data, tmp_path / "run"))


def test_split_is_by_case_seeded_with_test_and_validation():
    ids = [f"c{i}" for i in range(50)]
    split = split_cases(ids * 3, seed=1)  # repeated ids: slices of the same cases
    assert len(split["test"]) == 10 and len(split["val"]) == 8 and len(split["train"]) == 32
    assert not set(split["val"]) & set(split["train"]) and not set(split["test"]) & set(split["train"] + split["val"])
    assert split == split_cases(ids, seed=1)
    assert split["val"] != split_cases(ids, seed=2)["val"]
    assert split_cases(ids, seed=1, test_fraction=0)["test"] == []
    folds = [split_cases(ids, seed=1, folds=5, fold=k) for k in range(5)]
    assert all(f["test"] == split["test"] for f in folds)  # every fold keeps the same test cases
    assert len(split_cases(ids[:3])["test"]) == 1
    with pytest.raises(MedsegError, match="--test-fraction 0"):
        split_cases(ids[:2])


def test_train_fraction_keeps_the_validation_cases():
    ids = [f"c{i}" for i in range(50)]
    full, tenth = split_cases(ids, seed=1), split_cases(ids, seed=1, train_fraction=0.1)
    assert tenth["val"] == full["val"] and len(tenth["train"]) == 3 and set(tenth["train"]) < set(full["train"])
    assert tenth["train"] != split_cases(ids, seed=2, train_fraction=0.1)["train"]
    assert len(split_cases(ids[:3], train_fraction=0.01, test_fraction=0)["train"]) == 1
    with pytest.raises(MedsegError, match="--train-fraction"):
        split_cases(ids, train_fraction=0)


def test_kfold_partitions_the_cases():
    ids = [f"c{i}" for i in range(11)]
    folds = [split_cases(ids, folds=3, fold=k)["val"] for k in range(3)]
    assert sorted(sum(folds, []) + split_cases(ids)["test"]) == sorted(ids)
    with pytest.raises(MedsegError):
        split_cases(ids, folds=3, fold=3)
    with pytest.raises(MedsegError, match="at least 2"):
        split_cases(["only"])


def test_shared_isbi_and_hippocampus_in_place():
    isbi = find_cases(shared_dataset("isbi2012_em"))
    assert isbi.layout == "pairs" and len(isbi.cases) == 30
    hippo = find_cases(shared_dataset("msd_hippocampus", "Task04_Hippocampus"))
    assert len(hippo.cases) == 200 and hippo.class_names == ["background", "Anterior", "Posterior"]


def test_drive_through_a_manifest(tmp_path):
    root = shared_dataset("drive", "training")
    rows = [(p, root / "1st_manual" / p.name.replace("_training.tif", "_manual1.gif"))
            for p in sorted((root / "images").glob("*_training.tif"))]
    with open(tmp_path / "drive.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("image", "mask")] + rows)
    dataset = find_cases(tmp_path / "drive.csv")
    assert len(dataset.cases) == 20 and dataset.cases[0].case_id == "21_training"
    from medseg.data import load_case

    case = load_case(dataset.cases[0])
    assert case.image.array.shape == (3, 584, 565) and set(np.unique(case.label)) == {0, 1}


def test_brats_case_folders_stack_modalities_in_fixed_order(tmp_path):
    for case in ("c1", "c2"):
        for part in ("t1ce", "flair", "seg", "brainmask"):
            (tmp_path / case).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)),
                     tmp_path / case / f"{case}_{part}.nii.gz")
    dataset = find_cases(tmp_path)
    assert dataset.layout == "brats" and dataset.modalities == ["flair", "t1ce"]
    assert [p.name for p in dataset.cases[1].images] == ["c2_flair.nii.gz", "c2_t1ce.nii.gz"]
    assert dataset.class_names[4] == "enhancing"
    (tmp_path / "c2" / "c2_t1ce.nii.gz").unlink()
    with pytest.raises(MedsegError, match="c2: modalities flair differ.*t1ce missing"):
        find_cases(tmp_path)


def test_shared_brats_reads_in_place():
    from medseg.data import load_case

    dataset = find_cases(shared_dataset("brats2015"))
    assert len(dataset.cases) == 6 and dataset.modalities == ["flair", "t1ce"]
    case = load_case(dataset.cases[0])
    assert case.image.array.shape == (2, 240, 240, 155) and case.label.max() <= 4


def test_drive_layout_labels_from_1st_manual_and_field_of_view_as_roi(tmp_path):
    root = tmp_path / "DRIVE" / "training"
    for n in ("21", "22"):
        save_png(root / "images" / f"{n}_training.png", np.full((8, 8, 3), 100))
        save_png(root / "1st_manual" / f"{n}_manual1.png", np.eye(8) * 255)
        save_png(root / "mask" / f"{n}_training_mask.png", np.pad(np.full((6, 6), 255), 1))
    dataset = find_cases(tmp_path / "DRIVE")
    assert dataset.layout == "drive" and [c.case_id for c in dataset.cases] == ["21", "22"]
    assert dataset.cases[0].mask.parent.name == "1st_manual" and dataset.cases[0].roi.parent.name == "mask"
    from medseg.data import load_case

    case = load_case(dataset.cases[0])
    assert case.label.sum() == 8 and case.roi.sum() == 36 and not case.roi[0].any()


def test_shared_drive_reads_in_place():
    dataset = find_cases(shared_dataset("drive"))
    assert dataset.layout == "drive" and len(dataset.cases) == 20
    assert all(c.roi is not None and c.mask.name.endswith("_manual1.gif") for c in dataset.cases)


def test_serial_sections_are_split_in_blocks(tmp_path):
    from medseg.datasets import serial_sections, split_dataset

    # a stack: each section the one before with a little drift and noise; a set of unrelated images beside it
    rng = np.random.default_rng(0)
    section = rng.normal(size=(64, 64))
    for i in range(20):
        section = 0.7 * section + 0.3 * rng.normal(size=(64, 64))
        save_png(tmp_path / "stack" / "image" / f"{i}.png", 128 + 30 * section)
        save_png(tmp_path / "stack" / "label" / f"{i}.png", (section > 0) * 255)
        other = rng.normal(size=(64, 64))
        save_png(tmp_path / "photos" / "image" / f"{i + 21}.png", 128 + 30 * other)
        save_png(tmp_path / "photos" / "label" / f"{i + 21}.png", (other > 0) * 255)
    stack = find_cases(tmp_path / "stack")
    found = serial_sections(stack.cases)
    assert found and found["neighbours"] > 0.5 > found["apart"]
    assert serial_sections(find_cases(tmp_path / "photos").cases) is None  # numbered, not neighbours
    for seed in range(5):
        split = split_dataset(stack, seed=seed)
        test, val = sorted(map(int, split["test"])), sorted(map(int, split["val"]))
        assert split["blocks"] and len(test) == 4 and test == list(range(test[0], test[0] + 4))
        assert len(val) == 3 and not set(val) & set(test)
    assert len({tuple(split_dataset(stack, seed=s)["test"]) for s in range(5)}) > 1  # the seed moves the block
    photos = split_dataset(find_cases(tmp_path / "photos"))
    assert not photos["blocks"] and photos["test"] == split_cases([str(i) for i in range(21, 41)])["test"]


def test_isbi_sections_are_recognised_as_one_stack():
    from medseg.datasets import serial_sections

    assert serial_sections(find_cases(shared_dataset("isbi2012_em")).cases)
    assert serial_sections(find_cases(shared_dataset("drive")).cases) is None
