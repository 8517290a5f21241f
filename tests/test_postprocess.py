import json

import numpy as np

from medseg.checkpoint import load_run
from medseg.postprocess import choose_classes, keep_largest_component


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
    assert report["1"]["dice_with"] > report["1"]["dice_without"]
    assert report["2"]["dice_with"] < report["2"]["dice_without"]


def test_training_records_the_decision(trained_2d):
    decision = json.loads((trained_2d / "postprocessing.json").read_text())
    assert set(decision["validation"]) == {"1", "2"}
    assert load_run(trained_2d).postprocess_classes == decision["classes"]
