"""Metrics over connected components and skeletons, where voxel overlap says too little.

- Lesion-wise detection (as BraTS 2023 and autoPET report it): ground-truth lesions and predicted components are
  the connected components of each mask (full connectivity: 8 in 2D, 26 in 3D); a ground-truth lesion is found
  (TP) when a predicted component overlaps it, missed (FN) otherwise; a predicted component that overlaps no
  ground-truth lesion is a false alarm (FP). Lesion F1 = 2TP / (2TP + FP + FN); each lesion's Dice is taken
  against the predicted components that overlap it (0 for a missed lesion); BraTS's lesion-wise Dice averages
  those over TP + FN + FP (false alarms count 0). Sizes are equivalent diameters in mm (of a sphere, or a disc in
  2D, with the lesion's volume), binned < 10, 10-20 and > 20 mm.
- Instance average precision (the 2018 Data Science Bowl's metric): instances matched one to one at IoU > t;
  precision TP / (TP + FP + FN) averaged over t = 0.5, 0.55, ..., 0.95 per image.
- clDice (Shit et al. 2021) for tubular structures: the harmonic mean of the share of the predicted skeleton inside
  the ground truth and of the ground-truth skeleton inside the prediction.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

SIZE_BINS = ((0.0, 10.0, "< 10 mm"), (10.0, 20.0, "10-20 mm"), (20.0, math.inf, "> 20 mm"))
AP_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask with full connectivity (8 in 2D, 26 in 3D), as BraTS counts them."""
    return ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))


def diameter_mm(voxels: int, spacing: tuple[float, ...]) -> float:
    """Equivalent diameter of `voxels` voxels of `spacing`: of a sphere (3D) or a disc (2D) of the same size."""
    size = voxels * float(np.prod(spacing))
    return float((6 * size / math.pi) ** (1 / 3)) if len(spacing) == 3 else float(math.sqrt(4 * size / math.pi))


def size_bin(diameter: float) -> str:
    return next(name for low, high, name in SIZE_BINS if low <= diameter < high)


def lesion_matches(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] | None = None) -> dict:
    """Lesion-wise matching of two boolean masks of one class: {"lesions": [{"diameter_mm", "detected", "dice"}
    per ground-truth lesion], "false_positives": count, "false_positive_diameters_mm": [...]}."""
    spacing = tuple(spacing) if spacing else (1.0,) * truth.ndim
    truth_parts, n_truth = components(truth.astype(bool))
    pred_parts, n_pred = components(pred.astype(bool))
    # overlaps[i, j]: voxels of ground-truth lesion i+1 inside predicted component j+1
    joint = np.bincount(truth_parts.ravel().astype(np.int64) * (n_pred + 1) + pred_parts.ravel(),
                        minlength=(n_truth + 1) * (n_pred + 1)).reshape(n_truth + 1, n_pred + 1)
    overlaps, truth_sizes, pred_sizes = joint[1:, 1:], joint[1:].sum(1), joint[:, 1:].sum(0)
    lesions = []
    for i in range(n_truth):
        hit = overlaps[i] > 0
        matched = int(pred_sizes[hit].sum())
        dice = 2 * int(overlaps[i, hit].sum()) / (truth_sizes[i] + matched) if hit.any() else 0.0
        lesions.append({"diameter_mm": round(diameter_mm(int(truth_sizes[i]), spacing), 2),
                        "detected": bool(hit.any()), "dice": float(dice)})
    alone = np.flatnonzero(overlaps.sum(0) == 0) if n_truth else np.arange(n_pred)
    return {"lesions": lesions, "false_positives": int(len(alone)),
            "false_positive_diameters_mm": [round(diameter_mm(int(pred_sizes[j]), spacing), 2) for j in alone]}


def lesion_summary(matches: list[dict]) -> dict:
    """Pooled over cases: TP, FP, FN, lesion F1, mean lesion Dice (missed lesions 0), BraTS's lesion-wise Dice
    (false alarms 0 too) and the detection rate per size bin ([found, lesions, rate])."""
    lesions = [lesion for m in matches for lesion in m["lesions"]]
    tp = sum(lesion["detected"] for lesion in lesions)
    fn, fp = len(lesions) - tp, sum(m["false_positives"] for m in matches)
    by_size = {}
    for _, _, name in SIZE_BINS:
        inside = [lesion for lesion in lesions if size_bin(lesion["diameter_mm"]) == name]
        found = sum(lesion["detected"] for lesion in inside)
        by_size[name] = [found, len(inside), found / len(inside) if inside else math.nan]
    dice = [lesion["dice"] for lesion in lesions]
    return {"tp": tp, "fp": fp, "fn": fn, "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan,
            "lesion_dice": float(np.mean(dice)) if dice else math.nan,
            "brats_lesion_dice": float(sum(dice) / (tp + fn + fp)) if tp + fn + fp else math.nan,
            "detection_by_size": by_size}


def instance_ap(pred: np.ndarray, truth: np.ndarray, thresholds: tuple[float, ...] = AP_THRESHOLDS) -> dict:
    """The 2018 Data Science Bowl's score of one image: instance label maps (0 background, k the k-th object);
    {"ap": mean over `thresholds` of TP / (TP + FP + FN) at IoU > t, "at": {t: that precision}}. Both empty: NaN."""
    pred_ids, pred = np.unique(pred, return_inverse=True)
    truth_ids, truth = np.unique(truth, return_inverse=True)
    n_pred, n_truth = len(pred_ids) - (pred_ids[0] == 0), len(truth_ids) - (truth_ids[0] == 0)
    if pred_ids[0] != 0:
        pred = pred + 1
    if truth_ids[0] != 0:
        truth = truth + 1
    if n_pred == 0 and n_truth == 0:
        return {"ap": math.nan, "at": {t: math.nan for t in thresholds}}
    joint = np.bincount(truth.ravel() * (n_pred + 1) + pred.ravel(),
                        minlength=(n_truth + 1) * (n_pred + 1)).reshape(n_truth + 1, n_pred + 1)
    inter = joint[1:, 1:]
    union = joint[1:].sum(1)[:, None] + joint[:, 1:].sum(0)[None] - inter
    iou = np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)
    at = {}
    for t in thresholds:  # IoU > 0.5 pairs are unique: each object overlaps at most one other by more than half
        tp = int((iou > t).sum())
        at[t] = tp / (tp + (n_pred - tp) + (n_truth - tp))
    return {"ap": float(np.mean(list(at.values()))), "at": at}


def instances_from_mask(mask: np.ndarray) -> np.ndarray:
    """Instances of a predicted semantic mask: its connected components (face connectivity, so touching
    diagonals stay apart, as most nuclei annotations are)."""
    return ndimage.label(mask.astype(bool))[0]


COMPONENTS = {"method": "components"}
WATERSHED_DISTANCES = (6, 8, 12, 16)  # pixels between watershed markers tried; DSB nuclei are 10-40 pixels across


def watershed_instances(mask: np.ndarray, min_distance: int) -> np.ndarray:
    """Touching objects of a mask split along the valleys of its distance transform: one marker per local
    maximum at least `min_distance` pixels from the next, inside each connected component."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    mask = mask.astype(bool)
    distance = ndimage.distance_transform_edt(mask)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=instances_from_mask(mask),
                           exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=mask)


def instances_of(mask: np.ndarray, method: dict | None = None) -> np.ndarray:
    """Instances of a predicted mask by a run's chosen `method` (`choose_instances`); connected components
    where none was chosen."""
    method = method or COMPONENTS
    if method["method"] == "watershed":
        return watershed_instances(mask, method["min_distance"])
    return instances_from_mask(mask)


def instance_methods() -> dict[str, dict]:
    return {"components": COMPONENTS, **{f"watershed, markers {d} px apart": {"method": "watershed",
                                                                              "min_distance": d}
                                         for d in WATERSHED_DISTANCES}}


class InstanceChoice:
    """Mean instance AP of each way of recovering instances, gathered over validation images one at a time;
    `decision()` keeps a watershed only where it beat connected components there."""

    def __init__(self):
        self.ap = {name: [] for name in instance_methods()}

    def add(self, foreground: np.ndarray, truth: np.ndarray) -> None:
        for name, method in instance_methods().items():
            ap = instance_ap(instances_of(foreground, method), truth)["ap"]
            if not math.isnan(ap):
                self.ap[name].append(ap)

    def decision(self) -> dict:
        means = {name: _nanmean(v) for name, v in self.ap.items()}
        scored = {name: v for name, v in means.items() if not math.isnan(v)}
        best = max(scored, key=scored.get, default="components")
        if scored.get(best, math.nan) <= scored.get("components", -1.0):
            best = "components"
        return {**instance_methods()[best], "name": best, "images": len(self.ap["components"]),
                "validation_map": {name: round(v, 4) for name, v in means.items()}}


def skeleton(mask: np.ndarray) -> np.ndarray:
    from skimage.morphology import skeletonize

    return skeletonize(mask.astype(bool))


def cldice(pred: np.ndarray, truth: np.ndarray) -> float:
    """clDice of two boolean masks: 2 Tprec Tsens / (Tprec + Tsens), Tprec = |S(pred) & truth| / |S(pred)| and
    Tsens = |S(truth) & pred| / |S(truth)| with S the skeleton. Both empty: NaN; one empty: 0."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not pred.any() and not truth.any():
        return math.nan
    if not pred.any() or not truth.any():
        return 0.0
    pred_skeleton, truth_skeleton = skeleton(pred), skeleton(truth)
    precision = (pred_skeleton & truth).sum() / max(pred_skeleton.sum(), 1)
    sensitivity = (truth_skeleton & pred).sum() / max(truth_skeleton.sum(), 1)
    return float(2 * precision * sensitivity / (precision + sensitivity)) if precision + sensitivity else 0.0


LESION_WORDS = ("lesion", "tumour", "tumor", "metasta", "nodule", "cyst", "stone", "polyp", "mass", "cancer")
TUBULAR_WIDTH = 4.0  # pixels: a class whose area is at most this many times its skeleton's length is tubular


def lesion_like(class_names: list[str], present: list[set[int]]) -> list[str]:
    """Classes to score lesion by lesion: absent from some training cases (a lesion is not in every scan; an organ
    is), or named like a lesion. `present`: the classes of each training and validation mask."""
    chosen = []
    for k, name in enumerate(class_names[1:], start=1):
        sometimes = any(k in p for p in present) and not all(k in p for p in present)
        if sometimes or any(word in name.lower() for word in LESION_WORDS):
            chosen.append(name)
    return chosen


def tubular(class_names: list[str], labels: list[np.ndarray]) -> list[str]:
    """2D classes thin enough that their centreline is what matters (vessels): median over `labels` (a few
    training masks) of area / skeleton length at most TUBULAR_WIDTH pixels. Volumes are not measured (their
    skeletons cost too much to decide by), so no 3D class is called tubular unless asked (--cldice)."""
    chosen = []
    for k, name in enumerate(class_names[1:], start=1):
        widths = [float((label == k).sum()) / max(int(skeleton(label == k).sum()), 1)
                  for label in labels if label.ndim == 2 and (label == k).any()]
        if widths and float(np.median(widths)) <= TUBULAR_WIDTH:
            chosen.append(name)
    return chosen


def object_scores(pred: np.ndarray, truth: np.ndarray, units: dict[str, list[int]], lesions: set[str],
                  tubes: set[str], roi: np.ndarray | None, spacing) -> dict:
    """One case's lesion matches and clDice for the units (class or region name -> labels) marked as such."""
    inside = np.ones(truth.shape, bool) if roi is None else roi
    out = {"lesions": {}, "cldice": {}}
    for name, labels in units.items():
        if name not in lesions and name not in tubes:
            continue
        p, t = np.isin(pred, labels) & inside, np.isin(truth, labels) & inside
        if name in lesions:
            out["lesions"][name] = lesion_matches(p, t, spacing)
        if name in tubes:
            out["cldice"][name] = cldice(p, t)
    return out


class ObjectTally:
    """Lesion-wise, instance and clDice scores gathered case by case during evaluation, and what they add to
    the summary: `lesions` (per class marked lesion-like by the run, or every class with `every_lesion`),
    `instances` (runs on instance masks read with --binary-masks) and `cldice` (tubular classes, or every class
    with `every_tube`). Only counted cases (those that chose nothing) enter the summary."""

    def __init__(self, marked: dict, units: dict[str, list[int]], every_lesion: bool = False,
                 every_tube: bool = False, instances: bool = False, instance_method: dict | None = None):
        self.units = units
        self.lesions = set(units) if every_lesion else set(marked.get("lesion_classes", [])) & set(units)
        self.tubes = set(units) if every_tube else set(marked.get("tubular_classes", [])) & set(units)
        self.instances, self.instance_method = instances, instance_method or COMPONENTS
        self.matches: dict[str, list[dict]] = {name: [] for name in sorted(self.lesions)}
        self.cldice: dict[str, list[float]] = {name: [] for name in sorted(self.tubes)}
        self.ap: list[dict] = []
        self.rows: list[dict] = []

    @property
    def active(self) -> bool:
        return bool(self.lesions or self.tubes or self.instances)

    def add(self, case_id: str, pred: np.ndarray, truth: np.ndarray, roi, spacing, counted: bool,
            instance_truth: np.ndarray | None = None) -> None:
        scores = object_scores(pred, truth, self.units, self.lesions, self.tubes, roi, spacing)
        for name, found in scores["lesions"].items():
            self.rows += [{"case": case_id, "class": name, "kind": "lesion", "diameter_mm": lesion["diameter_mm"],
                           "detected": int(lesion["detected"]), "dice": round(lesion["dice"], 4),
                           "counted": "yes" if counted else "no"} for lesion in found["lesions"]]
            self.rows += [{"case": case_id, "class": name, "kind": "false positive", "diameter_mm": d,
                           "detected": "", "dice": 0.0, "counted": "yes" if counted else "no"}
                          for d in found["false_positive_diameters_mm"]]
            if counted:
                self.matches[name].append(found)
        for name, value in scores["cldice"].items():
            if counted:
                self.cldice[name].append(value)
        if self.instances and instance_truth is not None and counted:
            self.ap.append({"case": case_id, **instance_ap(instances_of(pred > 0, self.instance_method),
                                                           instance_truth)})

    def summary(self) -> dict:
        out = {}
        if self.matches:
            out["lesions"] = {name: lesion_summary(found) for name, found in self.matches.items()}
        if self.cldice:
            out["cldice"] = {name: {"mean": _nanmean(v), "n": int(np.sum(~np.isnan(v))) if v else 0}
                             for name, v in self.cldice.items()}
        if self.ap:
            scores = [a["ap"] for a in self.ap]
            out["instances"] = {"map": _nanmean(scores), "cases": len(scores),
                                "at": {str(t): _nanmean([a["at"][t] for a in self.ap]) for t in AP_THRESHOLDS},
                                "instances_from": instances_from(self.instance_method)}
        return out

    def markdown(self, summary: dict) -> list[str]:
        lines = []
        for name, s in summary.get("lesions", {}).items():
            sizes = "; ".join(f"{bin_} {found}/{total}" for bin_, (found, total, _) in s["detection_by_size"].items()
                              if total)
            lines += ["", f"Lesions, {name} (connected components, 26/8-connected): {s['tp']} found, {s['fn']} "
                      f"missed, {s['fp']} false alarms; lesion F1 {s['f1']:.4f}; mean Dice per lesion "
                      f"{s['lesion_dice']:.4f} (missed lesions 0); detected by size: {sizes or 'no lesions'}. "
                      "Per lesion: lesions.csv."]
        for name, s in summary.get("cldice", {}).items():
            lines += ["", f"clDice, {name}: {s['mean']:.4f} over {s['n']} cases."]
        if "instances" in summary:
            i = summary["instances"]
            lines += ["", f"Instances: mean average precision over IoU 0.5-0.95 {i['map']:.4f} ({i['cases']} images, "
                      f"AP at 0.5 {i['at']['0.5']:.4f}); instances are the {i['instances_from']}."]
        return lines


def instances_from(method: dict) -> str:
    """How instances were recovered from the predicted mask, in words."""
    if method["method"] == "watershed":
        scores = method.get("validation_map", {})
        return (f"watershed of the predicted mask's distance transform (markers at least {method['min_distance']} "
                f"pixels apart; chosen on the validation cases over connected components: mean AP "
                f"{scores.get(method.get('name'), math.nan):.4f} against {scores.get('components', math.nan):.4f})")
    return "connected components of the predicted mask (face connectivity)"


def _nanmean(values) -> float:
    values = np.asarray(values, float)
    return float(np.nanmean(values)) if values.size and not np.all(np.isnan(values)) else math.nan
