"""Nothing dropped in silence: files without a partner are listed, many of them stop training, and a run finds its
data from any folder and says when that data moved or changed."""
import json
import os
import shutil

import numpy as np
import pytest

from medseg.cli import main
from medseg.datasets import MAX_UNMATCHED, find_cases
from medseg.errors import MedsegError
from conftest import save_png

QUICK = ["--recipe", "seed", "--base-channels", "4", "--depth", "2", "--size", "32", "--batch-size", "4",
         "--steps", "3", "--steps-per-epoch", "3", "--quiet", "--threads", "1"]


def folder_pairs(root, images: list[str], masks: list[str]):
    """An images/ and masks/ folder; each mask a disc, each image the disc with noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    for name in images:
        disc = ((yy - 16) ** 2 + (xx - 16) ** 2 < 60).astype(np.uint8)
        save_png(root / "images" / name, (disc * 150 + rng.integers(0, 60, (32, 32))).astype(np.uint8))
    for name in masks:
        save_png(root / "masks" / name, (((yy - 16) ** 2 + (xx - 16) ** 2 < 60) * 255).astype(np.uint8))
    return root


def test_the_new_users_folder_five_images_four_masks_one_misnamed_is_refused_with_a_list(tmp_path, capsys):
    data = folder_pairs(tmp_path / "xray", [f"p{i}.png" for i in range(5)],
                        ["p0.png", "p1.png", "p2.png", "p3_seg_v2.png"])
    assert main(["train", str(data), "--out", str(tmp_path / "run"), *QUICK]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    line = err[0]
    assert "3 cases matched" in line
    assert "2 images without a mask (p3.png, p4.png)" in line and "1 masks without an image (p3_seg_v2.png)" in line
    assert "--allow-unmatched" in line and not (tmp_path / "run").exists()


def test_allow_unmatched_trains_on_the_matched_cases_and_still_lists_the_rest(tmp_path, capsys):
    data = folder_pairs(tmp_path / "xray", [f"p{i}.png" for i in range(5)],
                        ["p0.png", "p1.png", "p2.png", "p3_seg_v2.png"])
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--test-fraction", "0", "--allow-unmatched",
                 *QUICK]) == 0
    assert "left out: 2 images without a mask (p3.png, p4.png)" in capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "dataset.json").read_text())
    assert summary["train_cases"] + summary["val_cases"] == 3
    assert json.loads((tmp_path / "run" / "config.json").read_text())["allow_unmatched"] is True


def test_a_few_unlabelled_images_are_listed_and_training_goes_on(tmp_path, capsys):
    names = [f"c{i:02d}.png" for i in range(20)]
    data = folder_pairs(tmp_path / "cells", names, names[:19])  # 1 of 39 files: under the share
    assert 1 / 39 <= MAX_UNMATCHED
    dataset = find_cases(data)
    assert len(dataset.cases) == 19 and dataset.left_out == {"images without a mask": ["c19.png"]}
    assert "19 cases matched; left out: 1 images without a mask (c19.png)" in capsys.readouterr().err


def test_more_than_three_names_are_counted_not_all_printed(tmp_path):
    names = [f"c{i:02d}.png" for i in range(10)]
    data = folder_pairs(tmp_path / "cells", names, names[:4])
    with pytest.raises(MedsegError, match=r"6 images without a mask \(c04.png, c05.png, c06.png and 3 more\)"):
        find_cases(data)


def test_two_images_with_one_case_id_are_refused(tmp_path):
    data = folder_pairs(tmp_path / "dup", ["a.png", "b.png"], ["a.png", "b.png"])
    shutil.copy(data / "images" / "a.png", data / "images" / "a.tif")
    with pytest.raises(MedsegError, match="case id 'a' is also the id of .*a.png; case ids must be unique"):
        find_cases(data)


def test_msd_images_without_labels_are_listed(tmp_path):
    from medseg.synth import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "msd", cases=12, dim=2, size=32)
    shutil.copy(next((data / "imagesTr").iterdir()), data / "imagesTr" / "stray_0000.png")
    dataset = find_cases(data)
    assert dataset.left_out == {"images in imagesTr without a label": ["stray_0000.png"]}


@pytest.fixture
def relative_run(tmp_path, phantoms_2d):
    """A run trained from tmp_path with a relative data path."""
    shutil.copytree(phantoms_2d, tmp_path / "data")
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["train", "data", "--out", "run", *QUICK]) == 0
    finally:
        os.chdir(here)
    return tmp_path / "run"


def test_a_run_stores_its_data_as_an_absolute_path_and_a_manifest_hash(relative_run, tmp_path):
    config = json.loads((relative_run / "config.json").read_text())
    assert config["data"] == str((tmp_path / "data").resolve())
    recorded = json.loads((relative_run / "dataset.json").read_text())
    assert len(recorded["manifest_hash"]) == 64
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    here = os.getcwd()
    os.chdir(elsewhere)
    try:
        assert main(["evaluate", str(relative_run), "--quiet", "--figures", "0"]) == 0
    finally:
        os.chdir(here)


def test_evaluate_says_when_the_data_moved(relative_run, tmp_path, capsys):
    (tmp_path / "data").rename(tmp_path / "moved")
    assert main(["evaluate", str(relative_run), "--quiet"]) == 2
    assert "is not there any more (moved or deleted); pass --data" in capsys.readouterr().err
    assert main(["evaluate", str(relative_run), "--data", str(tmp_path / "moved"), "--quiet", "--figures", "0"]) == 0


def test_evaluate_says_when_a_test_case_changed(relative_run, capsys):
    split = json.loads((relative_run / "split.json").read_text())
    case = split["test"][0]
    image = next((relative_run.parent / "data" / "imagesTr").glob(f"{case}*"))
    image.write_bytes(image.read_bytes() + b"\0")  # same pixels to a PNG reader, other bytes: changed all the same
    assert main(["evaluate", str(relative_run), "--quiet"]) == 2
    assert "changed since" in capsys.readouterr().err


def test_evaluate_says_when_a_test_mask_was_edited(relative_run, capsys):
    # the image untouched, only the mask corrected: the test case is no longer what the run held out
    split = json.loads((relative_run / "split.json").read_text())
    case = split["test"][0]
    mask = next((relative_run.parent / "data" / "labelsTr").glob(f"{case}*"))
    mask.write_bytes(mask.read_bytes() + b"\0")
    assert main(["evaluate", str(relative_run), "--quiet"]) == 2
    assert f"case {case} (image, mask or region of interest) changed since" in capsys.readouterr().err
