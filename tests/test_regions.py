import json

import numpy as np
import pytest
import torch

from medseg.errors import MedsegError
from medseg.metrics import scored_metrics
from medseg.losses import region_loss, region_targets
from medseg.regions import BRATS_REGIONS, paint, paint_labels, parse_regions, region_masks
from conftest import shared_dataset, tiny_config


def test_brats_preset_and_written_regions():
    assert parse_regions("brats") == BRATS_REGIONS
    assert paint_labels(BRATS_REGIONS) == [2, 1, 4]  # oedema, necrosis, enhancing: one label of its own each
    written = parse_regions("ET=4; WT=1,2,3,4; TC=4,3,1")
    assert list(written) == ["WT", "TC", "ET"] and written["TC"] == [1, 3, 4]  # largest first
    with pytest.raises(MedsegError, match="covered by smaller regions"):
        parse_regions("all=1,2;a=1;b=2")
    with pytest.raises(MedsegError, match="whole numbers"):
        parse_regions("WT=one")


def test_painted_label_maps_give_the_regions_back():
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 2, 3, 4], size=(20, 20))
    masks = region_masks(labels, BRATS_REGIONS)
    assert masks.shape == (3, 20, 20) and masks[0].sum() == (labels > 0).sum()
    painted = paint(masks, BRATS_REGIONS)
    assert set(np.unique(painted)) <= {0, 1, 2, 4}
    assert np.array_equal(region_masks(painted, BRATS_REGIONS), masks)
    target = region_targets(torch.from_numpy(labels)[None], BRATS_REGIONS)
    assert torch.equal(target[0].bool(), torch.from_numpy(masks))


def test_region_loss_rewards_the_right_regions():
    labels = torch.from_numpy(np.random.default_rng(1).choice([0, 1, 2, 4], size=(2, 16, 16)))
    target = region_targets(labels, BRATS_REGIONS)
    confident = region_loss((target * 2 - 1) * 20, labels, BRATS_REGIONS)
    wrong = region_loss((1 - target * 2) * 20, labels, BRATS_REGIONS)
    assert confident < 0.01 and wrong > 5


def test_region_scores_read_from_label_maps():
    truth = np.array([[2, 2, 1, 4], [0, 0, 0, 0]])
    pred = np.array([[2, 1, 1, 1], [0, 0, 0, 2]])
    scores = scored_metrics(pred, truth, ["background", "necrosis", "edema", "nonenh", "enhancing"], BRATS_REGIONS)
    assert list(scores) == list(BRATS_REGIONS)
    assert scores["whole tumour"]["dice"] == pytest.approx(8 / 9)  # 4 of 4 found, one false alarm
    assert scores["tumour core"]["dice"] == pytest.approx(2 * 2 / (3 + 2))
    assert scores["enhancing tumour"]["dice"] == 0 and scores["enhancing tumour"]["recall"] == 0


def test_region_run_trains_predicts_and_scores_regions(phantoms_2d, tmp_path):
    from medseg.evaluate import evaluate_run
    from medseg.checkpoint import load_run
    from medseg.infer import predict_labels
    from medseg.train import train

    regions = {"ring": [2], "any": [1, 2]}  # given smallest first: the run orders them
    run = train(tiny_config(phantoms_2d, tmp_path / "run", regions=regions, base_channels=8, epochs=6,
                            steps_per_epoch=15, lr=3e-3, batch_size=8))
    trained = load_run(run)
    assert list(trained.config.regions) == ["any", "ring"] and trained.model.head.out_channels == 2
    summary = evaluate_run(run, progress=False, figures=1)
    assert list(summary["per_class"]) == ["any", "ring"]
    assert summary["per_class"]["any"]["dice"]["mean"] > 0.5  # a few seconds of training find the phantoms
    history = json.loads((run / "history.json").read_text())
    assert all(0 <= row["val_accuracy"] <= 1 and row["train_dice"] >= 0 for row in history)
    assert json.loads((run / "postprocessing.json").read_text())["classes"] == []
    from medseg.data import load_case
    from medseg.datasets import find_cases

    case = load_case(find_cases(phantoms_2d).cases[0], trained.config)
    assert set(np.unique(predict_labels(trained, case.image.array))) <= {0, 1, 2}


def test_region_loss_only_with_dice_ce(phantoms_2d, tmp_path):
    with pytest.raises(MedsegError, match="region-based"):
        tiny_config(phantoms_2d, tmp_path / "r", regions={"a": [1]}, loss="focal").validate()
    with pytest.raises(MedsegError, match="border-weight"):  # the weight map is not applied to regions' BCE
        tiny_config(phantoms_2d, tmp_path / "r", regions={"a": [1]}, border_weight=10).validate()
    # where the plan chose the map (label 0 a minority) and the user asks for regions, the plan's map is dropped
    from medseg.autotrain import configs_from_plan

    plan = {"default": "auto", "configurations": {"auto": {"members": {"2d": {
        "loss": "dice_ce_all", "border_weight": 10.0, "size": 64}}}}}
    (cfg,) = configs_from_plan(plan, None, phantoms_2d, {"regions": {"a": [1]}}).values()
    assert cfg.border_weight == 0 and cfg.validate().loss == "dice_ce_all"
    (cfg,) = configs_from_plan(plan, None, phantoms_2d, {}).values()
    assert cfg.border_weight == 10


def test_shared_brats_trains_on_regions(tmp_path):
    from medseg.train import train

    data = shared_dataset("brats2015")
    run = train(tiny_config(data, tmp_path / "brats", regions=BRATS_REGIONS, size=64, epochs=1, steps_per_epoch=4,
                            val_fraction=0.2))
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["epochs_run"] == 1
    from medseg.evaluate import evaluate_run

    evaluation = evaluate_run(run, progress=False, figures=1)
    assert list(evaluation["per_class"]) == list(BRATS_REGIONS) and evaluation["cases"] == 1
    assert all(0 <= m["dice"]["mean"] <= 1 for m in evaluation["per_class"].values())


def test_a_region_run_scored_on_samples_still_reports_its_full_validation_dice(phantoms_3d, tmp_path, monkeypatch):
    """BraTS on a 6-minute budget scores its epochs on samples; the end's full pass must give the run its figure
    (it gave None, and `medseg train` ended in a TypeError once training was done)."""
    from medseg import budget
    from medseg.evaluate import evaluate_run
    from medseg.train import train

    monkeypatch.setattr(budget, "FULL_VALIDATION_SHARE", 0.0)  # any full pass counts as too dear here
    monkeypatch.setattr(budget, "SAMPLED_GAIN", 0.0)
    run = train(tiny_config(phantoms_3d, tmp_path / "run", regions={"any": [1, 2], "ring": [2]}, fit="pad",
                            epochs=1000, steps_per_epoch=None, time_budget=0.2))
    assert json.loads((run / "config.json").read_text())["calibration"]["validation"] == "sampled"
    summary = json.loads((run / "train_summary.json").read_text())
    full = evaluate_run(run, out=tmp_path / "ev", cases="val", figures=0, progress=False)
    assert summary["full_validation_dice"] == pytest.approx(full["mean_dice_without_postprocessing"], abs=1e-6)
