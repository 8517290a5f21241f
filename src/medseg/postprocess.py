"""Keep-largest-component post-processing, applied per class only where it improved validation Dice.

A hippocampus or a liver is one connected structure; stray islands of its class are false positives. Cells and
vessels are not: removing components would destroy them. So the choice is measured, never assumed: after
training, each class keeps the rule only if mean validation Dice of that class goes up.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from medseg.metrics import nanmean, scored_metrics


def keep_largest_component(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """For each class in `classes`, keep its largest connected component (face connectivity); the rest -> 0."""
    out = labels.copy()
    for k in classes:
        components, count = ndimage.label(labels == k)
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            out[(components > 0) & (components != 1 + int(sizes.argmax()))] = 0
    return out


def choose_classes(predictions: list[np.ndarray], truths: list[np.ndarray], class_names: list[str],
                   rois: list | None = None) -> dict:
    """Per foreground class: mean validation Dice without and with the rule (cases where the class is undefined
    left out, as everywhere); `classes` lists where it helped. `rois` (one boolean array or None per case)
    restricts scoring to each case's region of interest. Scored with `scored_metrics`, as evaluation scores."""
    report, chosen = {}, []
    rois = rois or [None] * len(truths)
    plain = [scored_metrics(p, t, class_names, roi=r) for p, t, r in zip(predictions, truths, rois)]  # once
    for k in range(1, len(class_names)):
        before = nanmean([scores[class_names[k]]["dice"] for scores in plain])
        after = nanmean([_dice(keep_largest_component(p, [k]), t, r, class_names, k)
                         for p, t, r in zip(predictions, truths, rois)])
        report[str(k)] = {"dice_without": before, "dice_with": after}
        if after > before:
            chosen.append(k)
    return {"rule": "keep largest connected component", "classes": chosen, "validation": report}


def _dice(pred: np.ndarray, truth: np.ndarray, roi, class_names: list[str], k: int) -> float:
    return scored_metrics(pred, truth, class_names, roi=roi)[class_names[k]]["dice"]
