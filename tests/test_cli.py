"""Errors a user will meet: one line naming the file and the fix, exit code 2, no traceback, nothing written."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from medseg.cli import main
from conftest import save_png


def pairs(tmp_path: Path, n: int = 3, mask=None, size=(16, 16)) -> Path:
    for i in range(n):
        save_png(tmp_path / "data" / "images" / f"{i}.png", np.random.default_rng(i).integers(0, 255, size))
        save_png(tmp_path / "data" / "masks" / f"{i}.png", np.zeros(size) if mask is None else mask)
    return tmp_path / "data"


def fails_cleanly(capsys, argv, *expected, out=None):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("medseg: error: ") and "Traceback" not in err
    for text in expected:
        assert text in err
    if out is not None:
        assert not Path(out).exists(), "a failed command left output behind"
    return err


def train_args(data, out):
    return ["train", str(data), "--out", str(out), "--size", "16", "--base-channels", "2", "--depth", "1",
            "--epochs", "1", "--steps-per-epoch", "2", "--quiet"]


def test_missing_dataset(capsys, tmp_path):
    fails_cleanly(capsys, train_args(tmp_path / "nowhere", tmp_path / "run"), "nowhere", "not found",
                  out=tmp_path / "run")


def test_unreadable_image(capsys, tmp_path):
    data = pairs(tmp_path)
    (data / "images" / "1.png").write_bytes(b"\x89PNG broken")
    fails_cleanly(capsys, train_args(data, tmp_path / "run"), "1.png", "cannot be read", out=tmp_path / "run")


def test_image_mask_shape_mismatch(capsys, tmp_path):
    data = pairs(tmp_path)
    save_png(data / "masks" / "2.png", np.zeros((8, 8)))
    fails_cleanly(capsys, train_args(data, tmp_path / "run"), "2.png", "same size", out=tmp_path / "run")


def test_empty_dataset(capsys, tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    fails_cleanly(capsys, train_args(tmp_path / "data", tmp_path / "run"), "no labelled cases",
                  out=tmp_path / "run")


def test_unexpected_label_values(capsys, tmp_path):
    data = pairs(tmp_path)
    save_png(data / "masks" / "0.png", np.full((16, 16), 128))
    save_png(data / "masks" / "1.png", np.where(np.eye(16) > 0, 200, 0))
    fails_cleanly(capsys, train_args(data, tmp_path / "run"), "masks/", "class indices", out=tmp_path / "run")


def test_all_masks_empty(capsys, tmp_path):
    fails_cleanly(capsys, train_args(pairs(tmp_path), tmp_path / "run"), "every mask is empty", out=tmp_path / "run")


def test_run_without_checkpoint(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    fails_cleanly(capsys, ["evaluate", str(tmp_path / "run")], "no checkpoint", "medseg train")
    fails_cleanly(capsys, ["predict", str(tmp_path / "run"), str(tmp_path), "--out", str(tmp_path / "o")],
                  "no checkpoint", out=tmp_path / "o")


def test_predict_missing_input(capsys, trained_2d, tmp_path):
    fails_cleanly(capsys, ["predict", str(trained_2d), str(tmp_path / "gone.nii.gz"), "--out", str(tmp_path / "o")],
                  "gone.nii.gz", "not found", out=tmp_path / "o")


def test_console_script_end_to_end(tmp_path):
    """The installed `medseg` command: synth, train, evaluate, predict, and the exit code of an error."""
    exe = shutil.which("medseg", path=str(Path(sys.executable).parent)) or shutil.which("medseg")
    assert exe, "the medseg console script is not installed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def run(*args):
        return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)

    assert run("synth", "--out", tmp_path / "d", "--cases", "6", "--size", "32").returncode == 0
    trained = run(*train_args(tmp_path / "d", tmp_path / "r"))
    assert trained.returncode == 0 and "best validation Dice" in trained.stdout
    assert run("evaluate", tmp_path / "r", "--quiet").returncode == 0
    predicted = run("predict", tmp_path / "r", tmp_path / "d" / "imagesTr", "--out", tmp_path / "p", "--quiet")
    assert predicted.returncode == 0 and len(list((tmp_path / "p").glob("*.png"))) == 6
    failed = run("evaluate", tmp_path / "nothing")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr and len(failed.stderr.splitlines()) == 1


def test_every_training_setting_has_a_flag():
    """A recipe written in the docs must be typeable: each TrainConfig field is a train flag, except the few
    set another way (positional DATA, --out, --quiet, --no-augment) or only by a plan (dataset statistics)."""
    from dataclasses import fields

    from medseg.cli import TRAIN_OPTIONS
    from medseg.config import TrainConfig

    flags = {flag[2:].replace("-", "_") for flag, _, _ in TRAIN_OPTIONS}
    set_elsewhere = {"data", "out", "progress", "augment", "intensity_stats", "target_spacing", "calibration", "stop_at",
                     "planning_seconds"}
    assert {f.name for f in fields(TrainConfig)} - set_elsewhere - flags == set()


def test_reading_flags_are_the_reading_settings():
    from medseg.cli import DATA_OPTIONS
    from medseg.config import READING_FIELDS

    assert [flag[2:].replace("-", "_") for flag, _, _ in DATA_OPTIONS] == list(READING_FIELDS)
