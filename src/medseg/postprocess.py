"""Keep-largest-component post-processing, applied per class only where it improved validation Dice.

A hippocampus or a liver is one connected structure; stray islands of its class are false positives. Cells and
vessels are not: removing components would destroy them. So the choice is measured, never assumed: after
training, each class keeps the rule only if mean validation Dice of that class goes up.
"""
from __future__ import annotations

from collections.abc import Iterable

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


def choose_classes(cases: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None]], class_names: list[str]) -> dict:
    """Per foreground class: mean validation Dice without and with the rule (cases where the class is undefined
    left out, as everywhere); `classes` lists where it helped. `cases` yields (prediction, ground truth, region of
    interest or None) one case at a time, so only each case's scores are kept, never all predictions at once.
    Scored with `scored_metrics`, as evaluation scores."""
    before: dict[int, list[float]] = {k: [] for k in range(1, len(class_names))}
    after: dict[int, list[float]] = {k: [] for k in before}
    for pred, truth, roi in cases:
        plain = scored_metrics(pred, truth, class_names, roi=roi)
        for k in before:
            before[k].append(plain[class_names[k]]["dice"])
            after[k].append(_dice(keep_largest_component(pred, [k]), truth, roi, class_names, k))
    report = {str(k): {"dice_without": nanmean(before[k]), "dice_with": nanmean(after[k])} for k in before}
    chosen = [k for k in before if report[str(k)]["dice_with"] > report[str(k)]["dice_without"]]
    return {"rule": "keep largest connected component", "classes": chosen, "validation": report}


def _dice(pred: np.ndarray, truth: np.ndarray, roi, class_names: list[str], k: int) -> float:
    return scored_metrics(pred, truth, class_names, roi=roi)[class_names[k]]["dice"]
