import csv
import json

import numpy as np
import pytest
import torch

from medseg.checkpoint import load_run
from medseg.cli import main
from medseg.config import TrainConfig
from medseg.data import SliceSampler, load_cases
from medseg.datasets import find_cases
from medseg.errors import MedsegError
from medseg.train import HISTORY_COLUMNS, train
from conftest import tiny_config


def test_run_folder_holds_everything(trained_2d):
    names = {p.name for p in trained_2d.iterdir()}
    assert {"config.json", "split.json", "dataset.json", "best.pt", "last.pt", "history.csv", "history.json",
            "curves.png", "train_summary.json"} <= names
    assert not [n for n in names if n.startswith(".tmp")]
    with open(trained_2d / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == HISTORY_COLUMNS and len(rows) == 2
    assert all(0 <= float(r["val_dice"]) <= 1 and float(r["seconds"]) > 0 for r in rows)
    split = json.loads((trained_2d / "split.json").read_text())
    assert len(split["val"]) == 2 and len(split["train"]) == 10  # 20% of 12 cases, rounded
    trained = load_run(trained_2d)
    assert trained.class_names == ["background", "ellipse", "ring"] and not trained.model.training
    assert torch.load(trained_2d / "last.pt", weights_only=False)["optimizer"]


def test_training_learns_phantoms(phantoms_2d, tmp_path):
    """A small network must beat chance clearly within seconds: the capstone's stuck-at-50% model would fail."""
    run = train(tiny_config(phantoms_2d, tmp_path / "run", base_channels=8, epochs=6, steps_per_epoch=15,
                            lr=3e-3, batch_size=8))
    history = json.loads((run / "history.json").read_text())
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    assert max(row["val_dice"] for row in history) > 0.6


def test_seeded_runs_repeat(phantoms_2d, tmp_path):
    first = train(tiny_config(phantoms_2d, tmp_path / "a", epochs=1))
    second = train(tiny_config(phantoms_2d, tmp_path / "b", epochs=1))
    rows = [json.loads((r / "history.json").read_text())[0] for r in (first, second)]
    assert rows[0]["train_loss"] == pytest.approx(rows[1]["train_loss"], rel=1e-5)


def test_time_budget_ends_training_cleanly(phantoms_2d, tmp_path):
    run = train(tiny_config(phantoms_2d, tmp_path / "run", epochs=1000, steps_per_epoch=20, time_budget=0.1,
                            patience=0))
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["stopped"] == "time budget"
    assert summary["seconds"] < 0.1 * 60 + 5 and summary["epochs_run"] < 1000
    assert (run / "best.pt").exists()


def test_early_stopping(phantoms_2d, tmp_path):
    run = train(tiny_config(phantoms_2d, tmp_path / "run", epochs=50, steps_per_epoch=1, lr=1e-9, patience=2))
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["stopped"].startswith("early stopping") and summary["epochs_run"] < 50


def test_poly_schedule_decays_and_kfold_split(phantoms_2d, tmp_path):
    run = train(tiny_config(phantoms_2d, tmp_path / "run", epochs=3, lr_schedule="poly", folds=3, fold=1))
    history = json.loads((run / "history.json").read_text())
    assert history[0]["lr"] > history[1]["lr"] > history[2]["lr"]
    split = json.loads((run / "split.json").read_text())
    assert split["folds"] == 3 and split["fold"] == 1 and len(split["val"]) == 4


def test_rerun_from_saved_config(trained_2d, tmp_path):
    assert main(["train", "--config", str(trained_2d / "config.json"), "--out", str(tmp_path / "again"),
                 "--epochs", "1", "--quiet"]) == 0
    again = TrainConfig.load(tmp_path / "again" / "config.json")
    assert again.data == TrainConfig.load(trained_2d / "config.json").data and again.epochs == 1


def test_slices_of_one_volume_stay_on_one_side(phantoms_3d, tmp_path):
    run = train(tiny_config(phantoms_3d, tmp_path / "run", epochs=1))
    split = json.loads((run / "split.json").read_text())
    assert set(split["train"]).isdisjoint(split["val"]) and len(split["val"]) == 1
    cfg = tiny_config(phantoms_3d, tmp_path / "x")
    cases = [c for c in find_cases(phantoms_3d).cases if c.case_id in split["train"]]
    sampler = SliceSampler(load_cases(cases, cfg), cfg, torch.Generator())
    assert len(sampler) == 4 * 24  # every slice of the four training volumes, none of the validation one


def test_refuses_to_overwrite_a_run(trained_2d, phantoms_2d):
    with pytest.raises(MedsegError, match="exists and is not empty"):
        train(tiny_config(phantoms_2d, trained_2d))


def test_config_checks():
    with pytest.raises(MedsegError, match="--loss"):
        TrainConfig(loss="hinge").validate()
    with pytest.raises(MedsegError, match="--size"):
        TrainConfig(size=8, depth=4).validate()
    with pytest.raises(MedsegError, match="--flip-axes"):
        TrainConfig(flip_axes=[2]).validate()
    assert TrainConfig(dims=3, size=16, flip_axes=[2]).validate().flip_axes == [2]


def test_multiclass_rejects_bce(phantoms_2d, tmp_path):
    with pytest.raises(MedsegError, match="bce"):
        train(tiny_config(phantoms_2d, tmp_path / "run", loss="bce"))
    assert not (tmp_path / "run").exists()


def test_resize_mode_trains_at_size_and_predicts_at_native(trained_2d):
    from medseg.infer import predict_probabilities

    trained = load_run(trained_2d)
    probs = predict_probabilities(trained, np.random.rand(1, 45, 30).astype(np.float32))
    assert probs.shape == (3, 45, 30)
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)


def test_pad_mode_predicts_small_slices_as_trained(trained_3d):
    """Slices smaller than the training size are zero-padded like training batches, then cropped back."""
    from medseg.infer import predict_probabilities
    from medseg.transforms import pad_or_crop

    trained = load_run(trained_3d)
    image = np.random.default_rng(0).random((1, 20, 20, 3)).astype(np.float32)
    probs = predict_probabilities(trained, image)
    assert probs.shape == (3, 20, 20, 3)
    padded, _ = pad_or_crop(torch.from_numpy(image[..., 0])[None], None, (32, 32))
    with torch.no_grad():
        direct = trained.model(padded).softmax(1)[0, :, 6:26, 6:26].numpy()
    np.testing.assert_allclose(probs[..., 0], direct, atol=1e-5)

