import csv
import json
import math

import numpy as np
import pytest
from PIL import Image as PILImage

from medseg.errors import MedsegError
from medseg.evaluate import evaluate_run
from medseg.synth import write_synthetic_dataset


def test_summary_files_and_figures(trained_2d):
    summary = evaluate_run(trained_2d, progress=False)
    out = trained_2d / "evaluation"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["mean_dice"] == summary["mean_dice"] and 0 <= summary["mean_dice"] <= 1
    assert set(on_disk["per_class"]) == {"ellipse", "ring"}
    dice = on_disk["per_class"]["ring"]["dice"]
    assert {"mean", "std", "n", "undefined"} <= set(dice) and dice["n"] + dice["undefined"] == 2
    assert math.isclose(summary["mean_dice"],
                        (on_disk["per_class"]["ellipse"]["dice"]["mean"] + dice["mean"]) / 2)
    with open(out / "per_case.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 and {"dice", "iou", "precision", "recall", "specificity", "accuracy"} <= set(rows[0])
    assert "Mean foreground Dice" in (out / "summary.md").read_text()
    figures = sorted(out.glob("case_*.png"))
    assert len(figures) == 2 and PILImage.open(figures[0]).size[0] > 600


@pytest.mark.parametrize("fixture", ["trained_2d", "trained_3d"])
def test_validation_dice_of_the_best_epoch_is_what_evaluate_reports(fixture, request, tmp_path):
    """One predict-and-score path: the number the checkpoint was chosen on is the number evaluation computes on
    the same (validation) cases, at their own grid."""
    run = request.getfixturevalue(fixture)
    summary = json.loads((run / "train_summary.json").read_text())
    logged = json.loads((run / "history.json").read_text())[summary["best_epoch"] - 1]["val_dice"]
    evaluated = evaluate_run(run, out=tmp_path / "ev", cases="val", figures=0, progress=False)
    assert evaluated["mean_dice_without_postprocessing"] == pytest.approx(logged, abs=1e-6)
    if not summary["postprocessing"]:
        assert evaluated["mean_dice"] == pytest.approx(logged, abs=1e-6)
    assert evaluated["evaluated"] == "selection" and "optimistic" in evaluated["cases_role"]


def test_evaluate_reports_test_cases_by_default(trained_2d, tmp_path):
    split = json.loads((trained_2d / "split.json").read_text())
    summary = evaluate_run(trained_2d, out=tmp_path / "ev", figures=0, progress=False)
    with open(tmp_path / "ev" / "per_case.csv") as handle:
        cases = {row["case"] for row in csv.DictReader(handle)}
    assert cases == set(split["test"]) and not cases & set(split["train"] + split["val"])
    assert summary["cases_role"] == "test: 2 cases, used for no choice"
    assert "used for no choice" in (tmp_path / "ev" / "summary.md").read_text()


def test_evaluate_on_the_training_data_leaves_out_what_the_run_used(trained_2d, phantoms_2d, tmp_path):
    """Cases the run trained or selected on are marked and left out of the means, matched by id (same dataset)
    and by content (a copy of a training image under another name, in another folder)."""
    import shutil

    split = json.loads((trained_2d / "split.json").read_text())
    copy = tmp_path / "copy"
    shutil.copytree(phantoms_2d, copy)
    trained_id = split["train"][0]
    for sub in ("imagesTr", "labelsTr"):
        (copy / sub / f"{trained_id}.png").rename(copy / sub / "renamed.png")
    (copy / "dataset.json").unlink()
    summary = evaluate_run(trained_2d, data=copy, out=tmp_path / "ev", figures=0, progress=False,
                           data_options={"images": "imagesTr", "masks": "labelsTr"})
    with open(tmp_path / "ev" / "per_case.csv") as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    assert rows["renamed"]["role"] == "trained" and rows["renamed"]["counted"] == "no"
    assert summary["cases"] == 12 - len(split["train"]) - len(split["val"])
    assert set(summary["left_out"]) == set(split["train"] + split["val"]) - {trained_id} | {"renamed"}
    same = evaluate_run(trained_2d, data=phantoms_2d, out=tmp_path / "ev2", figures=0, progress=False)
    assert same["cases"] == len(split["test"]) and "left out of the means" in same["cases_role"]


def test_evaluate_on_other_data_and_volumes(trained_3d, phantoms_3d, tmp_path):
    other = write_synthetic_dataset(tmp_path / "other", cases=3, dim=3, size=24, num_classes=2, seed=7)
    summary = evaluate_run(trained_3d, data=other, out=tmp_path / "ev", progress=False)
    assert summary["cases"] == 3 and summary["cases_role"].startswith("new: 3 cases")
    assert (tmp_path / "ev" / "summary.json").exists() and summary["distance_unit"] == "mm"


def test_failed_evaluation_leaves_nothing(trained_2d, tmp_path):
    data = write_synthetic_dataset(tmp_path / "three", cases=3, size=32, num_classes=3, seed=4)
    for mask in (data / "labelsTr").iterdir():  # make sure class 3 occurs, unknown to a two-class model
        PILImage.fromarray(np.full((32, 32), 3, np.uint8)).save(mask)
    with pytest.raises(MedsegError, match="unknown to this model"):
        evaluate_run(trained_2d, data=data, out=tmp_path / "ev", progress=False)
    assert not (tmp_path / "ev").exists() and not list(tmp_path.glob(".ev-*"))


def test_figures_draw_any_normalisation():
    import warnings

    from medseg.figures import display_slice, overlay

    z_scored = np.random.default_rng(0).normal(0, 2, size=(1, 16, 16)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shown = display_slice(z_scored)
        blended = overlay(z_scored, np.eye(16, dtype=np.uint8))
    assert shown.min() >= 0 and shown.max() <= 1 and blended.min() >= 0 and blended.max() <= 1


def test_evaluate_with_groups_writes_subgroup_tables(trained_2d, tmp_path):
    val = json.loads((trained_2d / "split.json").read_text())["test"]
    groups = tmp_path / "groups.csv"
    groups.write_text("case_id,scanner\n" + "".join(f"{c},{'old' if i % 2 else 'new'}\n" for i, c in enumerate(val)))
    summary = evaluate_run(trained_2d, out=tmp_path / "ev", figures=0, progress=False, groups=groups)
    report = json.loads((tmp_path / "ev" / "groups.json").read_text())
    assert set(report["attributes"]["scanner"]) == {"old", "new"} and report["missing_cases"] == []
    assert sum(g["cases"] for g in report["attributes"]["scanner"].values()) == summary["cases"]
    assert "hd95" in report["attributes"]["scanner"]["new"] and isinstance(summary["groups_behind"], list)
    with pytest.raises(MedsegError, match="groups file not found"):
        evaluate_run(trained_2d, out=tmp_path / "ev2", groups=tmp_path / "none.csv", progress=False)
    assert not (tmp_path / "ev2").exists()
