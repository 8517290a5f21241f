"""Fingerprint and plan: the rules, the calibration, and training from a plan."""
import json

import numpy as np
import pytest

from medseg.cli import main
from medseg.datasets import find_cases
from medseg.plan import (choose_normalization, class_order, config_from_plan, fingerprint, make_plan,
                         mirror_axes, patch_and_depth)
from medseg.transforms import normalize
from conftest import shared_dataset


def test_fingerprint_of_phantoms(phantoms_3d):
    fp = fingerprint(find_cases(phantoms_3d))
    assert fp["dims"] == 3 and fp["cases"] == 5 and fp["shape"]["median"] == [24, 24, 24]
    assert fp["spacing"]["median"] == [1.0, 1.0, 1.0]
    assert abs(sum(fp["class_frequency"].values()) - 1) < 1e-9 and fp["class_frequency"]["0"] > 0.5
    stats = fp["foreground_intensity"][0]
    assert stats["p00_5"] < stats["median"] < stats["p99_5"] and stats["std"] > 0


def test_patch_and_depth_follow_the_median_shape():
    assert patch_and_depth([36, 50, 35], 3) == ([40, 56, 40], 3)  # nnU-Net's hippocampus patch
    patch, depth = patch_and_depth([512, 512], 2)
    assert np.prod(patch) <= 260 * 260 and depth == 5 and all(p % 32 == 0 for p in patch)


def test_normalisation_rules():
    base = {"dims": 3, "dtypes": ["int16"], "modality": ["CT"]}
    assert choose_normalization(base)[0] == "ct"
    assert choose_normalization({**base, "modality": ["MRI"]})[0] == "zscore"
    assert choose_normalization({"dims": 2, "dtypes": ["uint8"], "modality": []})[0] == "unit"
    array = np.random.default_rng(0).normal(40, 5, size=(1, 10, 10, 10))
    z = normalize(array, "zscore")
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3
    stats = [{"mean": 40.0, "std": 5.0, "p00_5": 30.0, "p99_5": 50.0, "median": 40.0}]
    ct = normalize(np.array([[[0.0, 40.0, 100.0]]]), "ct", stats)
    assert ct.tolist() == [[[-2.0, 0.0, 2.0]]]
    assert normalize(np.full((1, 2, 2), 255), "unit").max() == 1


def test_plan_calibrates_and_trains(phantoms_3d, tmp_path):
    plan = make_plan(phantoms_3d, budget_minutes=0.5)
    assert set(plan["configurations"]) == {"3d", "2d", "seed_2d"} and plan["default"] == "3d"
    three = plan["configurations"]["3d"]
    assert three["patch"] == [24, 24, 24] and three["normalization"] == "zscore"
    timings = plan["reasons"]["3d_width"]["timings"]
    assert set(timings) == {"8", "16", "32"} and all(t["seconds_per_step"] > 0 for t in timings.values())
    assert three["base_channels"] in (8, 16, 32)
    assert three["flip_axes"] == [0, 1, 2]  # one foreground class: nothing to swap, every mirror allowed
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    cfg = config_from_plan(tmp_path / "plan.json", "seed_2d")
    assert cfg.size == 128 and cfg.base_channels == 64 and cfg.lr == 1e-4
    code = main(["train", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--steps-per-epoch", "2", "--base-channels", "4", "--quiet"])
    assert code == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["dims"] == 3 and saved["patch"] == [24, 24, 24] and saved["optimizer"] == "sgd"


def test_plan_command_and_unknown_configuration(phantoms_2d, tmp_path, capsys):
    assert main(["plan", str(phantoms_2d), "--out", str(tmp_path / "p.json"), "--no-calibrate"]) == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["default"] == "2d" and plan["configurations"]["2d"]["normalization"] == "unit"
    assert main(["train", "--plan", str(tmp_path / "p.json"), "--configuration", "4d", "--out",
                 str(tmp_path / "r")]) == 2
    assert "no configuration '4d'" in capsys.readouterr().err


def test_plan_for_shared_hippocampus():
    fp_plan = make_plan(shared_dataset("msd_hippocampus", "Task04_Hippocampus"), calibrate=False)
    assert fp_plan["configurations"]["3d"]["patch"] == [40, 56, 40]
    assert fp_plan["configurations"]["3d"]["normalization"] == "zscore"
    assert fp_plan["fingerprint"]["cases"] == 200
    # anterior lies in front of and below the posterior part in every case: mirror left-right only
    assert [e["axis"] for e in fp_plan["fingerprint"]["class_order"]] == [1, 2]
    assert fp_plan["configurations"]["3d"]["flip_axes"] == [0]
    assert fp_plan["configurations"]["2d"]["axis"] == 2 and fp_plan["configurations"]["2d"]["flip_axes"] == [0]


def test_classes_in_a_fixed_order_forbid_mirroring_along_that_axis():
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(40):  # class 1 always left of class 2 on axis 1; their order on axis 0 is a coin toss
        left, right = rng.uniform(0.2, 0.4), rng.uniform(0.6, 0.8)
        first, second = rng.uniform(0.3, 0.7, size=2)
        cases.append({1: np.array([first, left]), 2: np.array([second, right])})
    cases.append({1: np.array([0.5, 0.5])})  # a case without class 2 says nothing about the order
    order = class_order(cases)
    assert [(e["axis"], e["classes"], e["a_before_b"]) for e in order] == [(1, [1, 2], 1.0)]
    axes, why = mirror_axes({"dims": 2, "class_order": order, "class_names": ["bg", "head", "tail"]})
    assert axes == [0] and "head and tail along axis 1" in why
    # one case in ten the other way round is not a fixed order
    for case in cases[:5]:
        case[1][1], case[2][1] = case[2][1], case[1][1]
    assert class_order(cases) == []
