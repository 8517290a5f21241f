"""Overlap metrics per class from confusion counts, with an explicit policy for empty masks.

Empty-case policy (per class, per case), as Metrics Reloaded recommends:
- Dice and IoU: ground truth and prediction both empty -> undefined (NaN): there was nothing to find and
  nothing was claimed, so the case says nothing about that class; it is left out of the class's mean and counted
  as 'undefined' beside it. (Scoring it 1.0 inflates means: a true 0.667 was once reported as 0.952.)
  Absent from the ground truth but predicted -> 0.0, so a false positive on an empty case is charged, never hidden.
- Precision (TP / (TP + FP)) with nothing predicted, recall (TP / (TP + FN)) with nothing to find, and
  specificity (TN / (TN + FP)) with no negatives are undefined: NaN, left out of means and counted apart.
- Accuracy is always defined.
- Boundary metrics (HD95 and ASSD in mm from the spacing, in pixels where a file has none; NSD at a tolerance
  in the same unit): both empty -> undefined (NaN), as Dice; exactly one empty -> the worst value (HD95 = ASSD = the image diagonal in mm, NSD = 0), so, as for Dice,
  a miss or a false alarm is charged, never left out of the mean.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

METRICS = ("dice", "iou", "precision", "recall", "specificity", "accuracy")
BOUNDARY_METRICS = ("hd95", "assd", "nsd")
POLICY = ("a class absent from both ground truth and prediction is undefined (NaN) for every metric but "
          "accuracy, left out of means and counted as 'undefined'; absent from the ground truth but predicted (or "
          "the reverse): Dice/IoU 0, HD95/ASSD the image diagonal, NSD 0; precision/recall/specificity with a zero "
          "denominator are undefined (NaN) likewise")


def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, 4) counts of TP, FP, FN, TN per class (one-vs-rest) for label maps of equal shape."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    joint = np.bincount(target.ravel().astype(np.int64) * num_classes + pred.ravel().astype(np.int64),
                        minlength=num_classes**2).reshape(num_classes, num_classes)  # [target, pred]
    tp = np.diag(joint)
    fp = joint.sum(0) - tp
    fn = joint.sum(1) - tp
    tn = joint.sum() - tp - fp - fn
    return np.stack([tp, fp, fn, tn], 1)


def nanmean(values) -> float:
    """Mean of the defined (non-NaN) values; NaN when none is defined. How every mean here treats 'undefined'."""
    defined = [float(v) for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def metrics_from_counts(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    both_empty = tp + fp + fn == 0
    return {
        "dice": math.nan if both_empty else 2 * tp / (2 * tp + fp + fn),
        "iou": math.nan if both_empty else tp / (tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),  # NaN only for no pixels at all (an empty region of interest)
    }


def case_metrics(pred: np.ndarray, target: np.ndarray, num_classes: int,
                 roi: np.ndarray | None = None) -> dict[int, dict[str, float]]:
    """Metrics for each foreground class (1..K-1) of one case; with a boolean `roi` of the same shape, only the
    pixels inside it count (e.g. DRIVE's field of view)."""
    if roi is not None:
        if roi.shape != target.shape:
            raise ValueError(f"region of interest {roi.shape} and target {target.shape} differ in shape")
        pred, target = pred[roi], target[roi]
    counts = confusion(pred, target, num_classes)
    return {k: metrics_from_counts(*counts[k].tolist()) for k in range(1, num_classes)}


def surface_metrics(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...] | None = None,
                    tolerance: float = 1.0) -> dict[str, float]:
    """Boundary metrics of two boolean masks in the units of `spacing` (mm), defined as MONAI defines them:

    hd95: the larger of the two directed 95th percentiles of boundary-to-boundary distances;
    assd: the mean of all those distances, both directions pooled;
    nsd:  normalised surface Dice, the share of both boundaries lying within `tolerance` of the other.
    Both empty: undefined (NaN; left out of means, as Dice). Only one empty: there is no distance to measure, so the worst
    possible is charged (hd95 = assd = the image diagonal, nsd = 0) and a miss or false alarm is never hidden.
    Distance transforms run once per mask and only boundary voxels are looked up.
    """
    pred, target = pred.astype(bool), target.astype(bool)
    spacing = tuple(float(s) for s in spacing) if spacing else (1.0,) * pred.ndim
    if not pred.any() and not target.any():
        return {"hd95": math.nan, "assd": math.nan, "nsd": math.nan}
    if not pred.any() or not target.any():
        diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing))))
        return {"hd95": diagonal, "assd": diagonal, "nsd": 0.0}
    pred_edge, target_edge = _boundary(pred), _boundary(target)
    to_target = ndimage.distance_transform_edt(~target_edge, sampling=spacing)[pred_edge]
    to_pred = ndimage.distance_transform_edt(~pred_edge, sampling=spacing)[target_edge]
    both = np.concatenate([to_target, to_pred])
    return {"hd95": float(max(np.percentile(to_target, 95), np.percentile(to_pred, 95))),
            "assd": float(both.mean()), "nsd": float((both <= tolerance).mean())}


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a face neighbour outside it (the image border counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                          border_value=0)


def scored_metrics(pred: np.ndarray, target: np.ndarray, class_names: list[str], regions: dict | None = None,
                   roi: np.ndarray | None = None, spacing: tuple[float, ...] | None = None,
                   boundary: bool = False, tolerance: float = 1.0) -> dict[str, dict[str, float]]:
    """Metrics by name for what a run is scored on: each foreground class, or each region (a set of labels,
    e.g. BraTS whole tumour = labels 1-4) read from the label maps. With `boundary`, also HD95, ASSD and NSD
    (at `tolerance` mm)."""
    units = regions or {class_names[k]: [k] for k in range(1, len(class_names))}
    scores = {}
    for name, labels in units.items():
        pred_mask, target_mask = np.isin(pred, labels), np.isin(target, labels)
        scores[name] = case_metrics(pred_mask.astype(np.uint8), target_mask.astype(np.uint8), 2, roi)[1]
        if boundary:
            inside = np.ones_like(target_mask) if roi is None else roi
            scores[name].update(surface_metrics(pred_mask & inside, target_mask & inside, spacing, tolerance))
    return scores


def threshold_counts(probability: np.ndarray, target: np.ndarray,
                     thresholds: np.ndarray = np.linspace(0, 1, 11)) -> np.ndarray:
    """(len(thresholds), 4) TP, FP, FN, TN of `probability > t` against the boolean `target`, one row per
    threshold; rows from several images add up to pooled counts."""
    target = target.astype(np.uint8)
    return np.stack([confusion((probability > t).astype(np.uint8), target, 2)[1] for t in thresholds])


def maximal_f_score(counts: np.ndarray, thresholds: np.ndarray = np.linspace(0, 1, 11)) -> tuple[float, float]:
    """The best F-score over the thresholds of `threshold_counts` rows, and the threshold that gives it.

    The ISBI 2012 EM challenge scored 'pixel error' as 1 - this, with the non-membrane pixels (label > 0) as
    positives, the counts pooled over the stack and thresholds 0, 0.1, ..., 1 (Fiji's PixelError)."""
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    f = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(len(counts)), where=(2 * tp + fp + fn) > 0)
    best = int(np.argmax(f))
    return float(f[best]), float(thresholds[best])
