"""The one predict-and-score path: a loaded case on its own grid -> probabilities -> labels -> metrics.

Training validation (checkpoint and early stopping), the post-processing choice, `medseg evaluate`, the report
and the benchmarks all score through `score_case`, so the number a choice is made on is computed exactly as the
number that is reported: on each case's native grid (a volume stored in another voxel order or spacing is
reoriented and resampled for the network and the probabilities mapped back), against its original mask, inside
its region of interest, with the empty-case policy of `medseg.metrics`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from medseg.data import LoadedCase
from medseg.infer import ensemble_probabilities, final_labels
from medseg.metrics import nanmean, scored_metrics


@dataclass
class ScoredCase:
    case: LoadedCase
    probs: np.ndarray  # (K, *spatial) probabilities (or one sigmoid per region) on the case's grid
    pred: np.ndarray  # (*spatial) uint8 labels, post-processed when asked
    scores: dict[str, dict[str, float]]  # class or region name -> metric -> value (NaN where undefined)
    seconds: float  # time to predict (not to score)

    def rows(self) -> list[dict]:
        """One row per scored class: {"case", "class", metric: value, ...}."""
        return [{"case": self.case.case_id, "class": name, **metrics} for name, metrics in self.scores.items()]


def score_case(models: list, case: LoadedCase, postprocess: bool = True, boundary: bool = False) -> ScoredCase:
    """Predict one loaded case (read with `resample=False`: its own grid) with one model or an ensemble, and
    score it. `postprocess` applies the run's chosen post-processing; `boundary` adds HD95, ASSD and NSD."""
    first = models[0]
    started = time.perf_counter()
    probs = ensemble_probabilities(models, case.image.array, case.image.spacing, case.image.affine)
    pred = final_labels(models, probs, postprocess)
    seconds = time.perf_counter() - started
    scores = scored_metrics(pred, case.label, first.class_names, first.config.regions, case.roi,
                            case.image.spacing, boundary=boundary)
    return ScoredCase(case, probs, pred, scores, seconds)


def class_means(rows: list[dict], metric: str = "dice") -> dict[str, float]:
    """Mean of `metric` over cases for each class, leaving out cases where it is undefined (NaN)."""
    values: dict[str, list[float]] = {}
    for row in rows:
        values.setdefault(row["class"], []).append(row[metric])
    return {name: nanmean(v) for name, v in values.items()}


def mean_dice(rows: list[dict]) -> float:
    """The headline figure: the mean over classes of each class's mean Dice over the cases where it is defined;
    a class undefined in every case (absent from ground truth and prediction alike) is left out."""
    return nanmean(list(class_means(rows).values()))
