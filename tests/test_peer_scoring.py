"""benchmarks/nnunet.py scores the peer's test predictions with medseg's own metrics; these tests feed it
hand-made predictions (no nnU-Net needed) and check what it reports against figures computed here."""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import save_png
from medseg.datasets import find_cases

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import nnunet  # noqa: E402  (the benchmark script, imported as a module)
from accuracy import bar_for  # noqa: E402


def em_like(tmp_path: Path) -> tuple[dict, dict, Path]:
    """Two 16x16 sections with 0/255 masks (ISBI's layout) and nnU-Net-style outputs for them: a PNG of class
    indices and an .npz of probabilities shaped (classes, 1, H, W), as nnU-Net writes them for 2D images."""
    rng = np.random.default_rng(0)
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    for case in ("1", "2"):
        truth = (rng.random((16, 16)) > 0.3).astype(np.uint8)
        save_png(tmp_path / "data" / "train" / "image" / f"{case}.png", rng.integers(0, 255, (16, 16)))
        save_png(tmp_path / "data" / "train" / "label" / f"{case}.png", truth * 255)
        cell = np.clip(truth + rng.normal(0, 0.4, truth.shape), 0, 1)  # a noisy but informative probability
        np.savez(predictions / f"{case}.npz", probabilities=np.stack([1 - cell, cell])[:, None])
        save_png(predictions / f"{case}.png", (cell > 0.5).astype(np.uint8))
    cases = find_cases(tmp_path / "data").cases
    parts = {"test": ["1", "2"], "files": {c.case_id: (str(c.images[0]), str(c.mask)) for c in cases},
             "cases": {c.case_id: c for c in cases}}
    dataset = {**nnunet.DATASETS["isbi2012_em"], "path": tmp_path / "data"}
    return parts, dataset, predictions


def test_peer_predictions_scored_with_medseg_metrics_and_challenge_pixel_error(tmp_path):
    parts, dataset, predictions = em_like(tmp_path)
    summary = nnunet.score(predictions, parts, dataset)

    cells = [np.load(predictions / f"{c}.npz")["probabilities"][1, 0] for c in ("1", "2")]
    labels = [np.array(Image.open(tmp_path / "data" / "train" / "label" / f"{c}.png")) > 0 for c in ("1", "2")]
    hard = [p > 0.5 for p in cells]
    accuracy = np.mean([np.mean(h == t) for h, t in zip(hard, labels)])
    dice = np.mean([2 * np.sum(h & t) / (h.sum() + t.sum()) for h, t in zip(hard, labels)])
    assert summary["per_class"]["cell"]["accuracy"]["mean"] == pytest.approx(accuracy, abs=1e-9)
    assert summary["per_class"]["cell"]["dice"]["mean"] == pytest.approx(dice, abs=1e-9)

    # the challenge's pixel error: 1 - the best F-score over thresholds 0, 0.1, ..., 1, counts pooled over images
    best = 0.0
    for threshold in np.linspace(0, 1, 11):
        tp = sum(np.sum((p > threshold) & t) for p, t in zip(cells, labels))
        fp = sum(np.sum((p > threshold) & ~t) for p, t in zip(cells, labels))
        fn = sum(np.sum(~(p > threshold) & t) for p, t in zip(cells, labels))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    assert summary["challenge_pixel_error"] == pytest.approx(1 - best, abs=1e-9)

    _, measured, met = bar_for("isbi2012_em", summary)
    assert f"1 - accuracy {1 - accuracy:.4f}" in measured and met == (1 - best <= 0.06 and 1 - accuracy <= 0.075)


def test_peer_without_probabilities_gets_no_pixel_error(tmp_path):
    parts, dataset, predictions = em_like(tmp_path)
    for npz in predictions.glob("*.npz"):
        npz.unlink()
    summary = nnunet.score(predictions, parts, dataset)
    assert "challenge_pixel_error" not in summary and summary["per_class"]["cell"]["dice"]["mean"] > 0.5


def test_peer_budget_fits_its_epochs_into_the_minutes():
    # the ISBI row's sizing: 30 minutes, 7.72 s per iteration, 1.93 s per validation iteration, 120 s fixed
    epochs, iterations = nnunet.plan_length(30, 7.72, 1.93, 120)
    assert (epochs, iterations) == (4, 41)
    assert epochs * (iterations * 7.72 + 50 * 1.93) + 120 <= 30 * 60
