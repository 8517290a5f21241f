"""Post-processing per class, each rule kept only where it raised that class's validation Dice.

A hippocampus or a liver is one connected structure: stray islands of its class are false positives, and keeping
the largest component removes them. Lesions and cells come in numbers: the largest alone would destroy them, but
specks smaller than any the annotators drew are still noise, and removing components below half the smallest one
in the training labels removes them. Neither is assumed: after training, each class keeps the rule that raised its
mean validation Dice the most, or none.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

from medseg.metrics import nanmean, scored_metrics

RULES = ("none", "largest", "small")


def keep_largest_component(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """For each class in `classes`, keep its largest connected component (face connectivity); the rest -> 0."""
    out = labels.copy()
    for k in classes:
        parts, sizes = _components(labels == k)
        out[(parts > 0) & ~np.isin(parts, _largest(sizes))] = 0
    return out


def remove_small_components(labels: np.ndarray, min_sizes: dict[int, int]) -> np.ndarray:
    """For each class k in `min_sizes`, remove its components (face connectivity) of fewer than min_sizes[k]
    voxels (-> 0)."""
    out = labels.copy()
    for k, size in min_sizes.items():
        parts, sizes = _components(labels == k)
        out[(parts > 0) & ~np.isin(parts, _at_least(sizes, size))] = 0
    return out


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The connected components of a boolean mask (face connectivity) and their sizes (component i: sizes[i - 1])."""
    parts, _ = ndimage.label(mask)
    return parts, np.bincount(parts.ravel())[1:]


def _largest(sizes: np.ndarray) -> list[int]:
    return [1 + int(sizes.argmax())] if len(sizes) else []


def _at_least(sizes: np.ndarray, size: int) -> np.ndarray:
    return np.flatnonzero(sizes >= size) + 1


def smallest_components(labels: Iterable[np.ndarray], classes: list[int]) -> dict[int, int]:
    """Per class, half the voxels of the smallest connected component (face connectivity) in `labels` (the
    training labels, one case at a time): what `remove_small_components` may remove without touching anything
    the size of what annotators drew. Each class is labelled inside its bounding box only."""
    smallest: dict[int, int] = {}
    for label in labels:
        boxes = ndimage.find_objects(label)
        for k in classes:
            if k - 1 < len(boxes) and boxes[k - 1] is not None:
                parts, count = ndimage.label(label[boxes[k - 1]] == k)
                if count:
                    size = int(np.bincount(parts.ravel())[1:].min())
                    smallest[k] = min(size, smallest.get(k, size))
    return {k: max(1, v // 2) for k, v in smallest.items()}


def apply_rules(labels: np.ndarray, largest: list[int], min_sizes: dict[int, int]) -> np.ndarray:
    """The chosen rules: largest component for `largest`, small components removed for `min_sizes`."""
    out = keep_largest_component(labels, largest) if largest else labels
    return remove_small_components(out, min_sizes) if min_sizes else out


def choose_classes(cases: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None]], class_names: list[str],
                   min_sizes: dict[int, int] | None = None) -> dict:
    """Per foreground class: mean validation Dice with no rule, with the largest component only, and with
    components under `min_sizes[k]` removed (cases where the class is undefined left out, as everywhere); each
    class keeps the rule that raised it most. `cases` yields (prediction, ground truth, region of interest or
    None) one case at a time, so only each case's scores are kept. Scored with `scored_metrics`, as evaluation
    scores."""
    min_sizes = min_sizes or {}
    scores = {k: {rule: [] for rule in RULES} for k in range(1, len(class_names))}
    for pred, truth, roi in cases:
        plain = scored_metrics(pred, truth, class_names, roi=roi)
        for k, by_rule in scores.items():
            by_rule["none"].append(plain[class_names[k]]["dice"])
            # one labelling of the class's components serves both rules (a CT volume: 0.3 s each)
            parts, sizes = _components(pred == k)
            by_rule["largest"].append(_dice(np.isin(parts, _largest(sizes)), truth == k, roi))
            if k in min_sizes:
                by_rule["small"].append(_dice(np.isin(parts, _at_least(sizes, min_sizes[k])), truth == k, roi))
    report, largest, small = {}, [], {}
    for k, by_rule in scores.items():
        means = {rule: nanmean(values) for rule, values in by_rule.items() if values}
        report[str(k)] = {f"dice_{rule}": value for rule, value in means.items()}
        best = max((rule for rule in means if means[rule] > means["none"]), key=means.get, default="none")
        report[str(k)]["chosen"] = best
        if best == "largest":
            largest.append(k)
        elif best == "small":
            small[str(k)] = min_sizes[k]
            report[str(k)]["min_size"] = min_sizes[k]
    return {"rule": "per class: keep the largest connected component, or remove components smaller than half the "
                    "smallest in the training labels, where it raised validation Dice",
            "classes": largest, "min_sizes": small, "validation": report}


def _dice(pred: np.ndarray, truth: np.ndarray, roi) -> float:
    """Dice of two boolean masks inside `roi` (None: everywhere); NaN where both are empty, as `scored_metrics`."""
    if roi is not None:
        pred, truth = pred[roi], truth[roi]
    total = int(pred.sum()) + int(truth.sum())
    return 2 * int((pred & truth).sum()) / total if total else float("nan")
