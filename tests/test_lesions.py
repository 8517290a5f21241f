"""Lesion-wise detection, instance average precision and clDice, each checked against a case computed by hand."""
import json
import math

import numpy as np
import pytest

from medseg.lesions import (cldice, diameter_mm, instance_ap, instance_methods, instances_from, lesion_matches,
                            lesion_summary, size_bin)


def test_lesion_matching_by_hand():
    truth = np.zeros((40, 40), bool)
    truth[2:6, 2:6] = True  # lesion A, 16 px: found by a prediction of 8 px inside it
    truth[20:30, 20:30] = True  # lesion B, 100 px: missed
    truth[10, 30] = True  # lesion C, 1 px: found by a component that covers it and 3 px beside it
    pred = np.zeros_like(truth)
    pred[2:4, 2:6] = True  # 8 px inside A
    pred[10, 30:34] = True  # 4 px over C
    pred[35:37, 35:37] = True  # a false alarm, 4 px
    found = lesion_matches(pred, truth, spacing=(0.5, 0.5))
    c, a, b = sorted(found["lesions"], key=lambda lesion: lesion["diameter_mm"])
    assert (a["detected"], b["detected"], c["detected"]) == (True, False, True)
    assert a["dice"] == pytest.approx(2 * 8 / (16 + 8)) and b["dice"] == 0 and c["dice"] == pytest.approx(2 / 5)
    assert a["diameter_mm"] == pytest.approx(math.sqrt(4 * 16 * 0.25 / math.pi), abs=0.01)
    assert found["false_positives"] == 1
    summary = lesion_summary([found])
    assert (summary["tp"], summary["fp"], summary["fn"]) == (2, 1, 1)
    assert summary["f1"] == pytest.approx(4 / 6)
    assert summary["lesion_dice"] == pytest.approx((2 / 3 + 0 + 0.4) / 3)
    assert summary["brats_lesion_dice"] == pytest.approx((2 / 3 + 0.4) / 4)
    assert summary["detection_by_size"]["< 10 mm"] == [2, 3, pytest.approx(2 / 3)]
    # a diagonal neighbour is the same lesion (full connectivity, as BraTS counts)
    diagonal = np.zeros((5, 5), bool)
    diagonal[1, 1] = diagonal[2, 2] = True
    assert len(lesion_matches(diagonal, diagonal)["lesions"]) == 1


def test_lesion_sizes_in_mm_and_bins():
    sphere_voxels = 4 / 3 * math.pi * 6**3  # a sphere of 12 mm diameter at 1 mm
    assert diameter_mm(round(sphere_voxels), (1.0, 1.0, 1.0)) == pytest.approx(12, abs=0.05)
    assert diameter_mm(round(sphere_voxels / 2), (1.0, 1.0, 2.0)) == pytest.approx(12, abs=0.05)
    assert [size_bin(d) for d in (3, 9.99, 10, 20, 35)] == ["< 10 mm", "< 10 mm", "10-20 mm", "> 20 mm", "> 20 mm"]


def test_lesion_matching_agrees_with_counting_components_in_3d():
    rng = np.random.default_rng(0)
    truth = np.zeros((30, 30, 30), bool)
    for x, y, z in rng.integers(3, 27, size=(6, 3)):
        truth[x - 2:x + 2, y - 2:y + 2, z - 2:z + 2] = True
    empty = lesion_matches(np.zeros_like(truth), truth)
    assert empty["false_positives"] == 0 and not any(lesion["detected"] for lesion in empty["lesions"])
    same = lesion_matches(truth, truth)
    assert all(lesion["detected"] and lesion["dice"] == 1 for lesion in same["lesions"])
    only_false = lesion_matches(truth, np.zeros_like(truth))
    assert only_false["lesions"] == [] and only_false["false_positives"] == len(same["lesions"])


def test_instance_average_precision_by_hand():
    truth = np.zeros((20, 20), np.int32)
    truth[0:10, 0:10] = 1  # 100 px
    truth[12:16, 12:16] = 2  # 16 px
    pred = np.zeros_like(truth)
    pred[0:10, 0:8] = 7  # IoU 0.8 with object 1
    pred[12:16, 12:14] = 3  # IoU 0.5 with object 2: not above 0.5, so no match at any threshold
    pred[18:20, 0:2] = 9  # a false positive
    score = instance_ap(pred, truth)
    # t < 0.8: 1 TP, 2 FP, 1 FN -> 1/4; t >= 0.8 (IoU not above t): 0 TP -> 0
    expected = {t: (0.25 if 0.8 > t else 0.0) for t in score["at"]}
    assert score["at"] == pytest.approx(expected)
    assert score["ap"] == pytest.approx(np.mean(list(expected.values())))
    assert instance_ap(truth, truth)["ap"] == 1.0
    assert math.isnan(instance_ap(np.zeros_like(truth), np.zeros_like(truth))["ap"])
    assert instance_ap(np.zeros_like(truth), truth)["ap"] == 0.0


def test_instance_matching_agrees_with_monai_panoptic_quality():
    """MONAI's panoptic quality pairs instances at IoU above a threshold as the DSB score does: its TP, FP and FN
    give the same precision TP / (TP + FP + FN) at every threshold, on random touching and overlapping discs."""
    torch = pytest.importorskip("torch")
    monai_pq = pytest.importorskip("monai.metrics.panoptic_quality")
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:96, :96]

    def discs(count: int) -> np.ndarray:
        labels = np.zeros((96, 96), np.int64)
        for k in range(1, count + 1):
            cy, cx, r = rng.integers(8, 88), rng.integers(8, 88), rng.integers(3, 9)
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
        return labels

    compared = 0
    for _ in range(12):
        truth = discs(int(rng.integers(3, 12)))
        pred = truth.copy()
        pred[rng.random(pred.shape) < 0.15] = 0  # holes lower the IoU of some pairs below some thresholds
        pred = np.roll(pred, int(rng.integers(-2, 3)), axis=1)
        pred[discs(2) > 0] = 50  # a false alarm or two
        if not (np.unique(truth) > 0).any():
            continue
        ours = instance_ap(pred, truth)["at"]
        for t in (0.5, 0.65, 0.8, 0.95):
            tp, fp, fn, _ = monai_pq.compute_panoptic_quality(
                torch.as_tensor(pred), torch.as_tensor(truth), match_iou_threshold=t,
                output_confusion_matrix=True).tolist()
            assert ours[t] == pytest.approx(tp / (tp + fp + fn)), (t, tp, fp, fn)
            compared += 1
    assert compared >= 40


def test_cldice_by_hand_and_its_robustness_to_thickness():
    truth = np.zeros((21, 21), bool)
    truth[10, 2:19] = True  # a one-pixel vessel
    assert cldice(truth, truth) == 1.0
    thick = np.zeros_like(truth)
    thick[9:12, 2:19] = True  # the same vessel drawn three pixels wide: Dice 0.5, clDice ~1 (same centreline;
    assert cldice(thick, truth) == pytest.approx(1.0, abs=0.04)  # the thick one's skeleton forks at its ends)
    from medseg.metrics import case_metrics
    assert case_metrics(thick.astype(np.uint8), truth.astype(np.uint8), 2)[1]["dice"] == pytest.approx(0.5)
    half = np.zeros_like(truth)
    half[10, 2:10] = True  # half the vessel found: precision 1, sensitivity 8/17
    assert cldice(half, truth) == pytest.approx(2 * 1 * (8 / 17) / (1 + 8 / 17), abs=0.02)
    assert cldice(np.zeros_like(truth), truth) == 0 and math.isnan(cldice(np.zeros_like(truth), np.zeros_like(truth)))


def test_evaluate_scores_lesions_instances_and_vessels(tmp_path):
    """A run on organ + lesion volumes marks the lesion class (absent from some cases) and evaluate reports it lesion
    by lesion; --lesion-metrics and --cldice extend the scores to every class."""
    import json

    import nibabel as nib

    from medseg.evaluate import evaluate_run
    from medseg.train import train
    from conftest import tiny_config

    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / "d" / sub).mkdir(parents=True)
    for i in range(8):
        label = np.zeros((24, 24, 12), np.uint8)
        label[4:20, 4:20, 2:10] = 1
        if i % 3:
            x, y = rng.integers(8, 14, 2)
            label[x:x + 3, y:y + 3, 5:8] = 2
        image = (label * 0.5 + rng.normal(0, 0.1, label.shape)).astype(np.float32)
        for sub, array in (("imagesTr", image), ("labelsTr", label)):
            nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 3.0, 1.0])), tmp_path / "d" / sub / f"c{i}.nii.gz")
    (tmp_path / "d" / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "organ",
                                                                        "2": "spot"}}))
    run = train(tiny_config(tmp_path / "d", tmp_path / "run", fit="pad", size=24, epochs=1, test_fraction=0.25))
    marked = json.loads((run / "dataset.json").read_text())
    assert marked["lesion_classes"] == ["spot"] and marked["tubular_classes"] == []
    summary = evaluate_run(run, figures=0, progress=False)
    assert set(summary["lesions"]) == {"spot"} and (run / "evaluation" / "lesions.csv").exists()
    spot = summary["lesions"]["spot"]
    assert spot["tp"] + spot["fn"] == sum(1 for c in json.loads((run / "split.json").read_text())["test"]
                                         if int(c[1:]) % 3)
    assert "Lesions, spot" in (run / "evaluation" / "summary.md").read_text()
    every = evaluate_run(run, out=tmp_path / "every", figures=0, progress=False, lesion_metrics=True, cldice=True)
    assert set(every["lesions"]) == {"organ", "spot"} and set(every["cldice"]) == {"organ", "spot"}


def test_instance_scores_for_instance_masks(tmp_path):
    from medseg.evaluate import evaluate_run
    from medseg.train import train
    from conftest import save_png, tiny_config

    rng = np.random.default_rng(1)
    for i in range(8):
        instances = np.zeros((32, 32), np.uint16)
        for k, (y, x) in enumerate(rng.integers(2, 26, size=(4, 2)), start=1):
            instances[y:y + 5, x:x + 5] = k
        save_png(tmp_path / "d" / "images" / f"n{i}.png", (instances > 0) * 150 + 50)
        from PIL import Image as PILImage
        (tmp_path / "d" / "masks").mkdir(parents=True, exist_ok=True)
        PILImage.fromarray(instances).save(tmp_path / "d" / "masks" / f"n{i}.png")
    run = train(tiny_config(tmp_path / "d", tmp_path / "run", fit="pad", epochs=1, binary_masks=True))
    summary = evaluate_run(run, figures=0, progress=False)
    assert summary["instances"]["cases"] == 2 and 0 <= summary["instances"]["map"] <= 1
    assert set(summary["instances"]["at"]) == {str(t) for t in (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)}
    decision = json.loads((run / "postprocessing.json").read_text())["instances"]  # chosen on validation
    assert set(decision["validation_map"]) == set(instance_methods()) and decision["images"] == 1
    assert summary["instances"]["instances_from"] == instances_from(decision)
    written = json.loads((run / "postprocessing.json").read_text())  # evaluate follows what the run chose
    written["instances"] = {**instance_methods()["watershed, markers 6 px apart"], "validation_map": {}}
    (run / "postprocessing.json").write_text(json.dumps(written))
    again = evaluate_run(run, out=tmp_path / "again", figures=0, progress=False)
    assert again["instances"]["instances_from"].startswith("watershed") and "6 pixels apart" in \
        again["instances"]["instances_from"]


def touching_pair(shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two discs of radius 10 whose edges overlap by 4 pixels (one connected component), and their instances."""
    yy, xx = np.mgrid[:64, :64]
    a = (yy - 32) ** 2 + (xx - 20 - shift) ** 2 <= 100
    b = ((yy - 32) ** 2 + (xx - 36 - shift) ** 2 <= 100) & ~a
    return a | b, a * 1 + b * 2


def test_touching_objects_are_split_by_a_watershed_only_where_validation_says_so():
    from medseg.lesions import InstanceChoice, instances_from_mask, instances_of, watershed_instances

    mask, truth = touching_pair()
    assert instance_ap(instances_from_mask(mask), truth)["ap"] < 0.1  # merged: half the size of neither disc
    split = watershed_instances(mask, 8)
    assert len(np.unique(split)) == 3 and instance_ap(split, truth)["ap"] > 0.8
    choice = InstanceChoice()
    for shift in (0, 4, 8):
        choice.add(*touching_pair(shift))
    decision = choice.decision()
    assert decision["method"] == "watershed" and decision["images"] == 3
    assert decision["validation_map"]["components"] < 0.1
    np.testing.assert_array_equal(instances_of(mask, decision), watershed_instances(mask, decision["min_distance"]))
    apart = InstanceChoice()  # objects that never touch: components are exact, and a tie keeps them
    separate = np.zeros((64, 64), np.uint16)
    separate[5:15, 5:15], separate[40:50, 40:50] = 1, 2
    apart.add(separate > 0, separate)
    assert apart.decision()["method"] == "components"
    assert instances_of(separate > 0, None).max() == 2  # a run without a choice: connected components
