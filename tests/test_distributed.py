"""Training on two processes (DistributedDataParallel, gloo, torchrun) against one process with the same global
batch: the processes end with identical weights, and those weights match the single process's."""
import json

import pytest
import torch

from conftest import tiny_config
from medseg.cli import main


@pytest.fixture(scope="module")
def settings(phantoms_2d, tmp_path_factory):
    """A tiny 2D run with instance norm (per sample, so a batch split over processes normalises as one batch)."""
    path = tmp_path_factory.mktemp("ddp") / "config.json"
    tiny_config(phantoms_2d, path.parent / "unused", norm="instance", epochs=2, steps_per_epoch=4, batch_size=4,
                threads=1).save(path)
    return path


def weights(run):
    return torch.load(run / "last.pt", weights_only=False)["model"]


def test_two_processes_train_what_one_process_trains(settings, tmp_path):
    assert main(["train", "--config", str(settings), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    assert main(["train", "--config", str(settings), "--out", str(tmp_path / "two"), "--nproc", "2", "--quiet"]) == 0
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["distributed"] == {"processes": 2, "backend": "gloo", "batch_per_process": 2,
                                      "parameters_identical_across_processes": True}
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    # same samples, same augmentation, gradients averaged over the halves, the soft Dice summed over both:
    # only the order of floating-point sums differs
    worst = max(float((one[k].float() - two[k].float()).abs().max()) for k in one)
    assert worst < 1e-5, worst  # measured: 1.2e-7
    first_epoch = torch.load(tmp_path / "one" / "best.pt", weights_only=False)
    assert first_epoch["epoch"] == 1  # the second epoch's four steps move the weights far more than that
    moved = max(float((one[k].float() - first_epoch["model"][k].float()).abs().max()) for k in one)
    assert moved > 1e-3
    history_one = json.loads((tmp_path / "one" / "history.json").read_text())
    history_two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [row["epoch"] for row in history_two] == [1, 2]
    for a, b in zip(history_one, history_two):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 and abs(a["val_loss"] - b["val_loss"]) < 1e-5


def test_a_batch_that_does_not_split_over_the_processes_is_refused(settings, tmp_path, capfd):
    assert main(["train", "--config", str(settings), "--out", str(tmp_path / "odd"), "--nproc", "2",
                 "--batch-size", "3", "--quiet"]) == 2
    assert "--batch-size 3 does not split over 2 processes" in capfd.readouterr().err


def test_two_processes_agree_on_a_time_budget(settings, tmp_path):
    """The budget is turned into steps once, from rank 0's timing, and every process trains exactly those."""
    assert main(["train", "--config", str(settings), "--out", str(tmp_path / "budget"), "--nproc", "2",
                 "--time-budget", "0.3", "--epochs", "50", "--quiet"]) == 0
    config = json.loads((tmp_path / "budget" / "config.json").read_text())
    summary = json.loads((tmp_path / "budget" / "train_summary.json").read_text())
    assert config["calibration"]["seconds_per_step"] > 0 and config["steps"] >= 1
    assert summary["distributed"]["parameters_identical_across_processes"] is True
    assert summary["steps"] == (config.get("stop_at") or config["steps"])


def test_train_data_nproc_plans_once_then_trains_on_two_processes(phantoms_2d, tmp_path):
    """The README's `medseg train DATA --nproc N`: the launcher plans (timing the machine once), the processes
    train the plan's network, and the run keeps its plan like a one-process run."""
    assert main(["train", str(phantoms_2d), "--out", str(tmp_path / "run"), "--nproc", "2", "--time-budget", "0.3",
                 "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["distributed"]["processes"] == 2
    assert summary["distributed"]["parameters_identical_across_processes"] is True
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["configurations"]
