import json

import numpy as np

from medseg.checkpoint import load_run
from medseg.postprocess import (choose_classes, keep_largest_component, remove_small_components,
                                smallest_components)


def test_keeps_only_the_largest_component_of_chosen_classes():
    labels = np.zeros((10, 10), np.uint8)
    labels[1:5, 1:5] = 1  # 16 pixels
    labels[7:9, 7:9] = 1  # a 4-pixel island
    labels[0, 9] = 2
    labels[9, 0] = 2
    out = keep_largest_component(labels, [1])
    assert (out == 1).sum() == 16 and (out == 2).sum() == 2
    assert set(np.unique(keep_largest_component(labels, [1, 2]))) == {0, 1, 2}


def test_rule_is_kept_only_where_it_helps():
    truth = np.zeros((12, 12), np.uint8)
    truth[2:6, 2:6] = 1  # class 1: one blob
    truth[8:10, 1:3] = 2
    truth[8:10, 8:10] = 2  # class 2: two blobs, both real
    pred = truth.copy()
    pred[0, 11] = 1  # a false-positive island of class 1
    decision = choose_classes(iter([(pred, truth, None)]), ["background", "a", "b"])
    assert decision["classes"] == [1]
    report = decision["validation"]
    assert report["1"]["dice_largest"] > report["1"]["dice_none"] and report["1"]["chosen"] == "largest"
    assert report["2"]["dice_largest"] < report["2"]["dice_none"] and report["2"]["chosen"] == "none"


def test_training_records_the_decision(trained_2d):
    decision = json.loads((trained_2d / "postprocessing.json").read_text())
    assert set(decision["validation"]) == {"1", "2"}
    assert load_run(trained_2d).postprocess_classes == decision["classes"]


def test_small_components_go_where_lesions_come_in_numbers():
    # two real lesions of 9 and 4 pixels in every training mask: specks under half the smallest (2) are noise
    training = np.zeros((12, 12), np.uint8)
    training[1:4, 1:4] = training[6:8, 6:8] = 2
    assert smallest_components([training, training[::-1]], [1, 2]) == {2: 2}
    truth = np.zeros((12, 12), np.uint8)
    truth[1:4, 1:4] = truth[8:10, 8:10] = 2
    pred = truth.copy()
    pred[0, 11] = pred[11, 0] = 2  # two one-pixel specks
    assert (remove_small_components(pred, {2: 2}) == truth).all()
    decision = choose_classes(iter([(pred, truth, None)]), ["background", "organ", "lesion"], {2: 2})
    assert decision["min_sizes"] == {"2": 2} and decision["classes"] == []  # largest alone would drop a lesion
    lesion = decision["validation"]["2"]
    assert lesion["dice_small"] == 1.0 > lesion["dice_none"] > lesion["dice_largest"]
