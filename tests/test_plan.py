"""Fingerprint and plan: the rules, the calibration, and training from a plan."""
import json

import numpy as np
import pytest

from medseg.cli import main
from medseg.config import TrainConfig
from medseg.datasets import find_cases
from medseg.plan import (choose_normalization, class_order, config_from_plan, fingerprint, make_plan,
                         mirror_axes, patch_and_depth)
from medseg.transforms import normalize
from conftest import save_png, shared_dataset


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
    assert choose_normalization({"dims": 2, "dtypes": ["uint8"], "modality": []})[0] == "zscore"
    array = np.random.default_rng(0).normal(40, 5, size=(1, 10, 10, 10))
    z = normalize(array, "zscore")
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3
    stats = [{"mean": 40.0, "std": 5.0, "p00_5": 30.0, "p99_5": 50.0, "median": 40.0}]
    ct = normalize(np.array([[[0.0, 40.0, 100.0]]]), "ct", stats)
    assert ct.tolist() == [[[-2.0, 0.0, 2.0]]]
    assert normalize(np.full((1, 2, 2), 255), "unit").max() == 1


def test_plan_calibrates_and_trains(phantoms_3d, tmp_path):
    plan = make_plan(phantoms_3d, budget_minutes=0.5)
    assert set(plan["configurations"]) == {"auto", "3d", "2d", "seed_2d"} and plan["default"] == "auto"
    three = plan["configurations"]["3d"]
    assert three["patch"] == [24, 24, 24] and three["normalization"] == "zscore"
    timings = plan["reasons"]["alternatives"]["3d_width"]["timings"]
    assert set(timings) == {"8", "16", "32"} and all(t["seconds_per_step"] > 0 for t in timings.values())
    assert three["base_channels"] in (8, 16, 32)
    assert three["flip_axes"] == [0, 1, 2]  # one foreground class: nothing to swap, every mirror allowed
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    cfg = config_from_plan(tmp_path / "plan.json", "seed_2d")
    assert cfg.size == 128 and cfg.base_channels == 64 and cfg.lr == 1e-4
    code = main(["train", "--plan", str(tmp_path / "plan.json"), "--configuration", "3d", "--out",
                 str(tmp_path / "run"), "--epochs", "1", "--steps-per-epoch", "2", "--base-channels", "4", "--quiet"])
    assert code == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["dims"] == 3 and saved["patch"] == [24, 24, 24] and saved["optimizer"] == "sgd"


def test_plan_command_and_unknown_configuration(phantoms_2d, tmp_path, capsys):
    assert main(["plan", str(phantoms_2d), "--out", str(tmp_path / "p.json"), "--no-calibrate"]) == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["configurations"]["2d"]["normalization"] == "zscore"
    assert main(["train", "--plan", str(tmp_path / "p.json"), "--configuration", "4d", "--out",
                 str(tmp_path / "r")]) == 2
    assert "no configuration '4d'" in capsys.readouterr().err


def test_plan_for_shared_hippocampus():
    fp_plan = make_plan(shared_dataset("msd_hippocampus", "Task04_Hippocampus"), calibrate=False)
    assert fp_plan["configurations"]["3d"]["patch"] == [40, 56, 40]
    assert fp_plan["configurations"]["3d"]["normalization"] == "zscore"
    assert fp_plan["fingerprint"]["cases"] == 160 and len(fp_plan["fingerprint"]["held_out"]["test"]) == 40
    # anterior lies in front of and below the posterior part in every case: mirror left-right only
    assert [e["axis"] for e in fp_plan["fingerprint"]["class_order"]] == [1, 2]
    assert fp_plan["configurations"]["3d"]["flip_axes"] == [0]
    assert fp_plan["configurations"]["2d"]["axis"] == 2 and fp_plan["configurations"]["2d"]["flip_axes"] == [0]
    # axial slices, median 36 x 50 voxels: each side rounded up to a multiple of 8 (depth 3), not padded square
    assert fp_plan["configurations"]["2d"]["patch"] == [40, 56] and fp_plan["configurations"]["2d"]["depth"] == 3


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


def test_default_recipe_for_isotropic_volumes_is_two_planes(phantoms_3d):
    plan = make_plan(phantoms_3d, budget_minutes=1, alternatives=False, cores=2)
    members = plan["configurations"]["auto"]["members"]
    assert list(members) == ["sagittal", "coronal"]  # RAS phantoms: axis 0 is left-right, axis 1 front-back
    assert [m["axis"] for m in members.values()] == [0, 1] and all(m["threads"] == 1 for m in members.values())
    assert all(m["size"] == 32 and m["fit"] == "pad" and m["normalization"] == "zscore" and not m.get("rotate90")
               for m in members.values())
    assert all(m["base_channels"] in (8, 16) for m in members.values())
    one_core = make_plan(phantoms_3d, budget_minutes=1, alternatives=False, cores=1, calibrate=False)
    assert list(one_core["configurations"]["auto"]["members"]) == ["sagittal"]


def test_default_recipe_rotates_only_data_without_an_up():
    from medseg.plan import foreground_layout
    from medseg.recipe import _no_up

    rng = np.random.default_rng(0)
    cells = [(rng.random((64, 64)) > 0.7).astype(float) for _ in range(10)]  # structures anywhere
    yy, xx = np.mgrid[:64, :64]
    disc = [((yy - 31.5) ** 2 + (xx - 31.5) ** 2 < (20 + k % 8) ** 2).astype(float) * (rng.random((64, 64)) > 0.5)
            for k in range(40)]  # a fundus: vessels inside a round field of view
    lungs = [(((yy > 10) & (yy < 50 + k % 3)) & (((xx > 8) & (xx < 28)) | ((xx > 36) & (xx < 56)))).astype(float)
             for k in range(10)]  # two tall lobes: an up
    fp = {"class_order": []}
    assert _no_up({**fp, "foreground_layout": foreground_layout(cells)})[0]
    assert _no_up({**fp, "foreground_layout": foreground_layout(disc)})[0]
    assert not _no_up({**fp, "foreground_layout": foreground_layout(lungs)})[0]


def test_default_recipe_for_shared_hippocampus_is_the_measured_pair():
    plan = make_plan(shared_dataset("msd_hippocampus", "Task04_Hippocampus"), 30, calibrate=False,
                     alternatives=False, cores=2)
    members = plan["configurations"]["auto"]["members"]
    sagittal, coronal = members["sagittal"], members["coronal"]
    # what the hand recipe found: sagittal slices (up to 58x47) padded to 64x48 (each side only as far as it needs)
    # and never mirrored, coronal slices (up to 43x47) padded to 48 and mirrored left-right only
    assert (sagittal["axis"], sagittal["size"], sagittal["patch"], sagittal["flip_axes"]) == (0, 64, [64, 48], [])
    assert (coronal["axis"], coronal["size"], coronal["flip_axes"]) == (1, 48, [0]) and "patch" not in coronal
    assert TrainConfig(**sagittal).patch_size == (64, 48) and sagittal["depth"] == 4
    assert sagittal["normalization"] == "zscore" and sagittal["mirror_tta"] and sagittal["lr"] == 1e-3
    assert sagittal["loss"] == coronal["loss"] == "dice_ce"
    # the never-mirrored member makes up for the views mirrors would add; the mirrored one keeps the usual affine
    assert (sagittal["affine_p"], sagittal["max_rotation"], sagittal["max_scale"]) == (0.5, 30.0, 0.3)
    assert "affine_p" not in coronal and "sagittal_augmentation" in plan["reasons"]
    assert TrainConfig(**sagittal).affine_p == 0.5 and TrainConfig(**coronal).affine_p == 0.3
    # each slice with a neighbour on both sides (2.5D): 3 input channels for the single-channel MRI
    assert sagittal["context"] == coronal["context"] == 1 and TrainConfig(**coronal).slices_per_input == 3
    assert "context" in plan["reasons"]


@pytest.mark.parametrize("name,binary,loss", [("isbi2012_em", False, "dice_ce_all"), ("drive", False, "dice_ce"),
                                              ("dsb2018", True, "dice_ce")])
def test_default_recipe_for_the_shared_2d_sets(name, binary, loss):
    plan = make_plan(shared_dataset(name), 30, calibrate=False, alternatives=False,
                     data_options={"binary_masks": binary or None})
    (member,) = plan["configurations"]["auto"]["members"].values()
    assert member["rotate90"] and member["size"] == 128 and member["normalization"] == "zscore"
    # ISBI's label 0 is the membranes (22% of pixels): a structure, counted in the Dice term
    assert member["loss"] == loss and plan["reasons"]["loss"].startswith("label 0 covers")
    # and its cross-entropy weighs the membranes between close cells (the U-Net paper's map); the others not
    assert member["border_weight"] == (10.0 if loss == "dice_ce_all" else 0.0)
    # the usual affine where mirrors are allowed; elastic deformation only when asked (tried on ISBI, not adopted)
    assert TrainConfig(**member).affine_p == 0.3 and TrainConfig(**member).elastic_p == 0


def test_a_size_of_the_users_replaces_the_planned_2d_sample():
    from medseg.autotrain import configs_from_plan

    member = {"data": "x", "dims": 2, "axis": 0, "fit": "pad", "size": 64, "patch": [64, 48]}
    plan = {"configurations": {"auto": {"members": {"sagittal": member}}}}
    assert configs_from_plan(plan, "auto", None, {})["sagittal"].patch_size == (64, 48)
    assert configs_from_plan(plan, "auto", None, {"size": 96})["sagittal"].patch_size == (96, 96)
    assert configs_from_plan(plan, "auto", None, {"rotate90": True})["sagittal"].patch_size == (64, 64)
    assert configs_from_plan(plan, "auto", None, {"patch": [32, 64]})["sagittal"].patch_size == (32, 64)


def test_a_size_of_the_users_replaces_a_saved_2d_sample_too(tmp_path):
    from medseg.cli import _config_from_args, build_parser

    TrainConfig(data="x", dims=2, size=64, patch=[64, 48]).save(tmp_path / "config.json")

    def rerun(*flags):
        return _config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / "config.json"),
                                                            *flags])).patch_size

    assert rerun() == (64, 48)
    assert rerun("--size", "96") == (96, 96)
    assert rerun("--patch", "32,64") == (32, 64)
    assert rerun("--lr", "0.01") == (64, 48)  # a flag that says nothing of the sample keeps its sides


def test_loss_rule_counts_label_0_where_it_is_not_the_majority():
    from medseg.recipe import _loss

    assert _loss({"class_frequency": {"0": 0.22, "1": 0.78}})[:2] == ("dice_ce_all", 10.0)
    assert _loss({"class_frequency": {"0": 0.49, "1": 0.3, "2": 0.21}})[:2] == ("dice_ce_all", 10.0)
    assert _loss({"class_frequency": {"0": 0.5, "1": 0.5}})[:2] == ("dice_ce", 0.0)
    assert _loss({"class_frequency": {"0": 0.95, "1": 0.05}})[:2] == ("dice_ce", 0.0)


def test_train_with_no_recipe_flag_trains_the_planned_ensemble(phantoms_3d, tmp_path, capfd):
    assert main(["train", str(phantoms_3d), "--out", str(tmp_path / "run"), "--steps", "4", "--base-channels", "4",
                 "--time-budget", "1", "--quiet"]) == 0
    out = capfd.readouterr().out  # the members print from their own processes
    assert out.startswith("Plan: 2 2D networks averaged (sagittal slices padded to 32 and coronal")
    assert "\nYour flags override the plan: --base-channels 4.\n" in out  # the paragraph's width is not what runs
    assert "\nYour flags add to the plan: --steps 4.\n" in out  # a setting the plan leaves at medseg's default
    assert "sagittal: epoch 1/1" in out and "coronal: epoch 1/1" in out
    run = tmp_path / "run"
    assert (run / "ensemble.json").exists() and (run / "plan.json").exists()
    saved = [json.loads((run / m / "config.json").read_text()) for m in ("sagittal", "coronal")]
    assert [c["axis"] for c in saved] == [0, 1] and all(c["steps"] == 4 and c["base_channels"] == 4 for c in saved)
    assert main(["evaluate", str(run), "--figures", "0", "--quiet"]) == 0
    assert "test: 1 case, used for no choice" in capfd.readouterr().out


def test_width_rule_counts_pixels_seen(monkeypatch):
    """Width 16 where the budget shows it as many pixels as 50k 64x64 slices: a 128x128 crop counts four times."""
    import medseg.plan as plan

    monkeypatch.setattr(plan, "_time_width", lambda model, *args: 1.0)  # one second a step, any width
    # 30 minutes, batch 16: 28,800 samples; enough at 128x128 (4.7e8 pixels), not at 64x64 (1.2e8)
    assert plan.calibrate_width(2, [128, 128], 4, 1, 2, 16, 30, widths=(8, 16))[0] == 16
    assert plan.calibrate_width(2, [64, 64], 4, 1, 2, 16, 30, widths=(8, 16))[0] == 8


def test_sample_grows_to_whole_slices_only_where_the_budget_holds_enough_steps():
    """CT at 1.6 mm (median slice 409 mm: 256 px): a CPU's 0.5 s steps keep 128 crops and time nothing more; a
    device 100x faster trains whole slices; one where whole slices step too slowly takes the largest crop that
    still holds LARGE_SAMPLE_STEPS."""
    from medseg.plan import time_augmentation
    from medseg.recipe import LARGE_SAMPLE_STEPS, larger_sample

    assert 0 < time_augmentation(16, 3, [32, 32], 1) < time_augmentation(16, 3, [256, 256], 1)  # 64x the pixels

    fp = {"dims": 3, "extent_mm": {"median": [409.6, 409.6, 150.0]}, "spacing": {"median": [0.8, 0.8, 2.5]}}

    def member():
        return {"axis": 2, "size": 128, "target_spacing": [1.6, 1.6, 2.5]}

    def never_timed(sides):
        raise AssertionError(f"timed {sides} although no larger sample could reach the bar")

    cpu = member()
    assert "256" in larger_sample(fp, cpu, 0.5, never_timed, 20) and cpu["size"] == 128 and "patch" not in cpu
    fast = member()  # steps cost in proportion to pixels
    why = larger_sample(fp, fast, 0.005, lambda sides: 0.005 * sides[0] * sides[1] / 128**2, 20)
    assert fast["size"] == 256 and why.startswith("whole slices of 256")
    # whole slices at 0.06 s (16k steps in 20 minutes) fall short; 192 crops at 0.03 s (32k) do not
    middling = member()
    larger_sample(fp, middling, 0.005, lambda sides: {256: 0.06, 192: 0.03}[sides[0]], 20)
    assert middling["size"] == 192 and 0.8 * 20 * 60 / 0.03 >= LARGE_SAMPLE_STEPS
    image_set = {"dims": 2, "shape": {"median": [584, 565]}}  # DRIVE: a non-square median image, seen whole
    fundus = {"size": 128}
    larger_sample(image_set, fundus, 0.001, lambda sides: 0.001 * sides[0] * sides[1] / 128**2, 60)
    assert fundus["size"] == 592 and fundus["patch"] == [592, 576]
    turned = {"size": 128, "rotate90": True}  # quarter turns: a square sample holding the whole image
    larger_sample(image_set, turned, 0.001, lambda sides: 0.001 * sides[0] * sides[1] / 128**2, 60)
    assert turned["size"] == 592 and "patch" not in turned


def test_a_fast_device_plans_whole_images_and_says_so(tmp_path, monkeypatch):
    """The plan itself: timings of a device 100x this CPU's give 200x300 images whole; this CPU's keep 128."""
    import medseg.recipe as recipe

    rng = np.random.default_rng(0)
    for i in range(6):
        mask = np.zeros((200, 300), np.uint8)
        mask[50:120, 60 + 20 * i:160 + 20 * i] = 255
        save_png(tmp_path / "d" / "masks" / f"c{i}.png", mask)
        save_png(tmp_path / "d" / "images" / f"c{i}.png", mask // 2 + rng.integers(0, 60, mask.shape))

    def planned(seconds_at_128):
        def timed(dims, patch, *args, widths=(16,), **kwargs):
            seconds = seconds_at_128 * patch[0] * patch[1] / 128**2
            return widths[-1], {str(w): {"seconds_per_step": seconds, "samples_in_budget": 0} for w in widths}
        monkeypatch.setattr(recipe, "calibrate_width", timed)
        monkeypatch.setattr(recipe, "time_augmentation", lambda *args, **kwargs: 0.0)
        plan = make_plan(tmp_path / "d", budget_minutes=20, alternatives=False)
        return plan["configurations"]["auto"]["members"]["2d"], recipe.describe(plan["configurations"]["auto"],
                                                                                 plan["reasons"])

    member, paragraph = planned(0.005)
    assert member["size"] == 304 and member.get("patch") in (None, [208, 304])
    assert "as the budget holds enough steps" in paragraph
    member, paragraph = planned(0.5)
    assert member["size"] == 128 and "as the budget holds" not in paragraph


def _write_case(folder, name, image, label, affine):
    import nibabel as nib

    for sub, array in (("imagesTr", image), ("labelsTr", label)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, affine), str(folder / sub / f"{name}.nii.gz"))


def test_the_test_cases_choose_nothing_in_the_plan(tmp_path):
    # split first, then fingerprint: editing a test case's intensities or labels leaves plan.json as it was
    rng = np.random.default_rng(0)
    for i in range(10):
        label = np.zeros((12, 14, 10), np.uint8)
        label[3:8, 4:9, 2:7] = 1
        image = (rng.normal(size=label.shape) * 40 + 40 * label).astype(np.int16)
        _write_case(tmp_path, f"case_{i}", image, label, np.diag([0.8, 0.8, 3.0, 1.0]))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "organ", "2": "lesion"},
                                                       "modality": {"0": "CT"}}))
    before = make_plan(tmp_path, calibrate=False)
    held = before["fingerprint"]["held_out"]
    assert len(held["test"]) == 2 and held["seed"] == 0
    assert sorted(before["fingerprint"]["cases_read"]) == sorted(f"case_{i}" for i in range(10)
                                                               if f"case_{i}" not in held["test"])
    for name in held["test"]:  # a brighter scan with a second class in it
        label = np.zeros((12, 14, 10), np.uint8)
        label[2:10, 2:12, 1:9], label[5:7, 5:7, 4:6] = 1, 2
        _write_case(tmp_path, name, (rng.normal(size=label.shape) * 300 + 900).astype(np.int16), label,
                    np.diag([0.5, 0.5, 1.0, 1.0]))
    after = make_plan(tmp_path, calibrate=False)
    assert json.dumps(after, sort_keys=True) == json.dumps(before, sort_keys=True)
    other = make_plan(tmp_path, calibrate=False, seed=1)  # another split reads other cases
    assert other["fingerprint"]["held_out"]["test"] != held["test"]


def test_fingerprint_measures_volumes_in_the_voxel_order_training_uses(tmp_path):
    # the same volume stored twice, once with axes 0 and 1 swapped (and the affine saying so)
    label = np.zeros((10, 20, 6), np.uint8)
    label[2:5, 3:15, 1:5] = 1
    image = label.astype(np.float32)
    _write_case(tmp_path, "a", image, label, np.diag([1.0, 2.0, 3.0, 1.0]))
    swapped = np.array([[0, 1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    _write_case(tmp_path, "b", image.transpose(1, 0, 2).copy(), label.transpose(1, 0, 2).copy(), swapped)
    fp = fingerprint(find_cases(tmp_path))
    assert fp["shape"]["min"] == fp["shape"]["max"] == [10, 20, 6]
    assert fp["spacing"]["min"] == fp["spacing"]["max"] == [1.0, 2.0, 3.0]
