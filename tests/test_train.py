import csv
import json

import numpy as np
import pytest
import torch

from medseg.checkpoint import load_run
from medseg.cli import main
from medseg.config import TrainConfig
from medseg.data import load_cases
from medseg.samplers import SliceSampler
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
    assert len(split["test"]) == 2 and len(split["val"]) == 2 and len(split["train"]) == 8  # 20% of 12, 20% of 10
    trained = load_run(trained_2d)
    assert trained.class_names == ["background", "ellipse", "ring"] and not trained.model.training
    assert torch.load(trained_2d / "last.pt", weights_only=True)["optimizer"]


def test_threads_are_the_runs_own_and_given_back(phantoms_2d, tmp_path):
    """train(threads=1) in a notebook must not leave the rest of the session on one thread (it did: every test
    after one such run trained on one core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(tiny_config(phantoms_2d, tmp_path / "run", epochs=1, steps_per_epoch=1, threads=1))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_init_seed_changes_the_weights_but_not_the_split(phantoms_2d, tmp_path):
    """Ensemble members that differ only in --init-seed must share their validation and test cases."""
    runs = {name: train(tiny_config(phantoms_2d, tmp_path / name, epochs=1, steps_per_epoch=1, **extra))
            for name, extra in (("plain", {}), ("same", {"init_seed": 0}), ("other", {"init_seed": 1}))}
    splits = {name: json.loads((run / "split.json").read_text()) for name, run in runs.items()}
    assert splits["plain"] == splits["same"] == splits["other"]
    weights = {name: torch.load(run / "last.pt", weights_only=True)["model"] for name, run in runs.items()}
    first = next(iter(weights["plain"]))
    assert all(torch.equal(weights["plain"][k], weights["same"][k]) for k in weights["plain"])  # None is --seed
    assert not torch.equal(weights["plain"][first], weights["other"][first])


def test_training_learns_phantoms(phantoms_2d, tmp_path):
    """A small network must beat chance clearly within seconds: the capstone's stuck-at-50% model would fail.
    12 epochs: with 6 this seed's best validation Dice was 0.581 on a freshly built environment (0.73 with 12)."""
    run = train(tiny_config(phantoms_2d, tmp_path / "run", base_channels=8, epochs=12, steps_per_epoch=15,
                            lr=3e-3, batch_size=8))
    history = json.loads((run / "history.json").read_text())
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    assert max(row["val_dice"] for row in history) > 0.6


def test_seeded_runs_repeat(phantoms_2d, tmp_path):
    first = train(tiny_config(phantoms_2d, tmp_path / "a", epochs=1))
    second = train(tiny_config(phantoms_2d, tmp_path / "b", epochs=1))
    rows = [json.loads((r / "history.json").read_text())[0] for r in (first, second)]
    assert rows[0]["train_loss"] == pytest.approx(rows[1]["train_loss"], rel=1e-5)


def _weights(run):
    return torch.load(run / "last.pt", weights_only=True)["model"]


def test_time_budget_becomes_steps_and_a_rerun_repeats_the_weights(phantoms_2d, tmp_path):
    run = train(tiny_config(phantoms_2d, tmp_path / "run", epochs=1000, steps_per_epoch=20, time_budget=0.2,
                            patience=0, lr_schedule="poly"))
    summary = json.loads((run / "train_summary.json").read_text())
    cfg = TrainConfig.load(run / "config.json")
    assert cfg.steps and cfg.calibration["seconds_per_step"] > 0 and summary["stopped"] == "steps done"
    assert summary["steps"] == cfg.steps and summary["epochs_run"] == cfg.calibration["epochs"] < 1000
    assert summary["seconds"] < 0.2 * 60 + 5 and (run / "best.pt").exists()
    # the steps are in config.json: the same seed, data and steps give the same weights, whatever the clock says
    assert main(["train", "--config", str(run / "config.json"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    first, again = _weights(run), _weights(tmp_path / "again")
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_same_seed_and_steps_give_the_same_weights(phantoms_2d, tmp_path):
    runs = [train(tiny_config(phantoms_2d, tmp_path / name, steps=7, lr_schedule="poly")) for name in "ab"]
    first, second = (_weights(r) for r in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)
    history = json.loads((runs[0] / "history.json").read_text())
    assert len(history) == 3 and history[-1]["lr"] < history[0]["lr"]  # 3 + 3 + 1 steps, decaying on steps


def test_early_stopping(phantoms_2d, tmp_path):
    run = train(tiny_config(phantoms_2d, tmp_path / "run", epochs=50, steps_per_epoch=1, lr=1e-9, patience=2))
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["stopped"].startswith("early stopping") and summary["epochs_run"] < 50


def test_poly_schedule_decays_and_kfold_split(phantoms_2d, tmp_path):
    run = train(tiny_config(phantoms_2d, tmp_path / "run", epochs=3, lr_schedule="poly", folds=3, fold=1))
    history = json.loads((run / "history.json").read_text())
    assert history[0]["lr"] > history[1]["lr"] > history[2]["lr"]
    split = json.loads((run / "split.json").read_text())
    assert split["folds"] == 3 and split["fold"] == 1 and len(split["val"]) == 3 and len(split["test"]) == 2


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
    assert len(sampler) == 3 * 24  # every slice of the three training volumes, none of validation or test


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


def test_large_slices_are_predicted_in_bounded_batches(trained_3d):
    """A volume of 512x512 slices goes through the network at most BATCH_PIXELS pixels at a time (32 whole CT
    slices at once set a 2.5D run's peak memory at 4 GB), and the result equals slice-by-slice prediction."""
    from medseg import infer

    trained = load_run(trained_3d)
    seen = []

    class Recording(torch.nn.Module):
        def __init__(self, network):
            super().__init__()
            self.network = network

        def forward(self, x):
            seen.append(tuple(x.shape))
            return self.network(x)

    trained.model = Recording(trained.model)
    image = np.random.default_rng(1).random((1, 512, 512, 10)).astype(np.float32)
    probs = infer.predict_probabilities(trained, image)
    assert probs.shape[1:] == (512, 512, 10)
    assert seen and max(s[0] * s[-1] * s[-2] for s in seen) <= infer.BATCH_PIXELS
    one = infer.predict_probabilities(trained, image[..., 3:4])
    np.testing.assert_allclose(probs[..., 3], one[..., 0], atol=1e-5)


def test_pad_mode_predicts_small_slices_as_trained(trained_3d):
    """Slices smaller than the training size are zero-padded like training batches, then cropped back."""
    from medseg.infer import predict_probabilities
    from medseg.augment import pad_or_crop

    trained = load_run(trained_3d)
    image = np.random.default_rng(0).random((1, 20, 20, 3)).astype(np.float32)
    probs = predict_probabilities(trained, image)
    assert probs.shape == (3, 20, 20, 3)
    padded, _ = pad_or_crop(torch.from_numpy(image[..., 0])[None], None, (32, 32))
    with torch.no_grad():
        direct = trained.model(padded).softmax(1)[0, :, 6:26, 6:26].numpy()
    np.testing.assert_allclose(probs[..., 0], direct, atol=1e-5)



def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(phantoms_2d, tmp_path, monkeypatch):
    import sys

    train_module = sys.modules["medseg.train"]  # the package exports a function of the same name
    real = train_module.make_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)

        def wrapped(logits, target):
            calls["n"] += 1
            value = loss(logits, target)
            return value * float("nan") if calls["n"] > 4 else value  # epoch 1 (3 steps + validation) is clean
        return wrapped

    monkeypatch.setattr(train_module, "make_loss", poisoned)
    with pytest.raises(MedsegError, match=r"epoch 2, step \d+: the training loss is nan.*last.pt keeps the last "
                                          r"good epoch \(1\)"):
        train(tiny_config(phantoms_2d, tmp_path / "run", epochs=3))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_quiet_keeps_one_line_per_epoch_and_no_carriage_returns(phantoms_2d, tmp_path, capsys):
    assert main(["train", str(phantoms_2d), "--out", str(tmp_path / "run"), "--size", "32", "--base-channels", "4",
                 "--depth", "2", "--epochs", "2", "--steps-per-epoch", "2", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert [line for line in captured.out.splitlines() if line.startswith("epoch")][1].startswith("epoch 2/2: loss")
    assert "\r" not in captured.out + captured.err


def test_one_unnamed_class_is_called_foreground(tmp_path):
    from PIL import Image as PILImage

    for name in range(6):
        image = np.zeros((16, 16), np.uint8)
        image[4:12, 4:12] = 200
        for folder, array in (("images", image), ("masks", (image > 0).astype(np.uint8) * 255)):
            (tmp_path / "d" / folder).mkdir(parents=True, exist_ok=True)
            PILImage.fromarray(array).save(tmp_path / "d" / folder / f"{name}.png")
    run = train(tiny_config(tmp_path / "d", tmp_path / "run", size=16, epochs=1))
    assert json.loads((run / "dataset.json").read_text())["class_names"] == ["background", "foreground"]


def test_clock_guard_stops_a_late_run_and_a_rerun_stops_at_the_same_step(phantoms_2d, tmp_path, monkeypatch):
    """Calibration is an estimate: a run that would overrun its budget stops on the clock, records where, and a
    re-run from its config.json stops at that step with the same weights."""
    from medseg import budget

    monkeypatch.setattr(budget, "SAFETY_ALONE", 30.0)  # plan far more steps than the budget holds
    run = train(tiny_config(phantoms_2d, tmp_path / "run", epochs=100_000, steps_per_epoch=20, time_budget=0.1,
                            patience=0, lr_schedule="poly"))
    summary = json.loads((run / "train_summary.json").read_text())
    cfg = TrainConfig.load(run / "config.json")
    assert cfg.stop_at and cfg.stop_at < cfg.steps and summary["stopped"].startswith("time budget")
    assert summary["steps"] == cfg.stop_at and summary["seconds"] < 0.1 * 60 + 5
    monkeypatch.setattr(budget, "SAFETY_ALONE", 0.99)
    assert main(["train", "--config", str(run / "config.json"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    first, again = _weights(run), _weights(tmp_path / "again")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert json.loads((tmp_path / "again" / "train_summary.json").read_text())["steps"] == cfg.stop_at


def test_a_long_epoch_says_it_is_alive_without_bars(phantoms_2d, tmp_path, capsys, monkeypatch):
    """With bars off, a line every PROGRESS_EVERY seconds inside an epoch (one long epoch is a silent half hour)."""
    import sys

    monkeypatch.setattr(sys.modules["medseg.train"], "PROGRESS_EVERY", 0.0)
    assert main(["train", str(phantoms_2d), "--out", str(tmp_path / "run"), "--size", "32", "--base-channels", "4",
                 "--depth", "2", "--epochs", "1", "--steps-per-epoch", "4", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    inside = [line for line in lines if line.startswith("epoch 1: step")]
    assert [line.split(",")[0] for line in inside] == ["epoch 1: step 1/4", "epoch 1: step 2/4", "epoch 1: step 3/4"]
    assert any(line.startswith("epoch 1/1: loss") for line in lines)


def test_a_dear_full_validation_runs_once_at_the_end(phantoms_3d, tmp_path, monkeypatch, capsys):
    """Where a full validation pass would take too much of the budget, epochs are scored on fixed validation
    samples and the chosen checkpoint is validated in full once at the end; the summary says where the time went."""
    from medseg import budget
    from medseg.evaluate import evaluate_run

    monkeypatch.setattr(budget, "FULL_VALIDATION_SHARE", 0.0)  # any full pass counts as too dear here,
    monkeypatch.setattr(budget, "SAMPLED_GAIN", 0.0)  # and the samples as cheaper,
    monkeypatch.setattr(budget, "FINAL_VALIDATION_SHARE", 0.0)  # and even the final pass with mirroring
    run = train(tiny_config(phantoms_3d, tmp_path / "run", fit="pad", epochs=1000, steps_per_epoch=None,
                            time_budget=0.3, mirror_tta=True))
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "train_summary.json").read_text())
    assert config["calibration"]["validation"] == "sampled"
    assert not config["mirror_tta"] and config["calibration"]["tta"].startswith("off: 4 mirrored views")
    assert "fixed validation samples" in capsys.readouterr().out
    full = evaluate_run(run, out=tmp_path / "ev", cases="val", figures=0, progress=False)
    assert summary["full_validation_dice"] == pytest.approx(full["mean_dice_without_postprocessing"], abs=1e-6)
    account = summary["budget"]
    assert {"loading", "calibration", "training", "validation", "final_validation_and_postprocessing"} <= set(account)
    assert 0 < account["training_share"] < 1 and account["total"] <= 0.3 * 60 * 1.15
    again = train(TrainConfig(**{**config, "out": str(tmp_path / "again")}))  # a re-run validates as the run did
    history = [json.loads((r / "history.json").read_text()) for r in (run, again)]
    assert [row["val_dice"] for row in history[0]] == [row["val_dice"] for row in history[1]]
    monkeypatch.undo()
    small = train(tiny_config(phantoms_3d, tmp_path / "small", fit="pad", epochs=1000, steps_per_epoch=None,
                              time_budget=0.2))
    assert json.loads((small / "config.json").read_text())["calibration"]["validation"] == "full"
