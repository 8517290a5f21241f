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


def test_evaluate_on_other_data_and_volumes(trained_3d, phantoms_3d, tmp_path):
    summary = evaluate_run(trained_3d, data=phantoms_3d, out=tmp_path / "ev", progress=False)
    assert summary["cases"] == 5 and (tmp_path / "ev" / "summary.json").exists()


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
    val = json.loads((trained_2d / "split.json").read_text())["val"]
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
