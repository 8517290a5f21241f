"""Figures: training curves, and input / ground truth / prediction / overlay panels."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or assumed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medseg.transforms import normalize_percentile  # noqa: E402

# Class colours for overlays (index 0, background, is transparent).
PALETTE = np.array([[0, 0, 0], [230, 60, 60], [60, 200, 90], [70, 120, 240], [240, 200, 40],
                    [200, 80, 220], [60, 210, 220], [250, 140, 40]], dtype=np.float32) / 255


def plot_curves(history: list[dict], path: str | Path) -> Path:
    """Loss, Dice and accuracy per epoch, training against validation, in one PNG."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("loss", "dice", "accuracy"), ("Loss", "Dice (foreground mean)", "Accuracy")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], "o-", label="train", ms=3)
        ax.plot(epochs, [row[f"val_{key}"] for row in history], "o-", label="validation", ms=3)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def display_slice(image: np.ndarray) -> np.ndarray:
    """(C, H, W) under any normalisation -> [0, 1] for display: grey (H, W) or RGB (H, W, 3)."""
    image = normalize_percentile(image)
    if image.shape[0] == 3:
        return np.moveaxis(image, 0, -1)
    return image[0]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend class colours over a (C, H, W) image; returns RGB (H, W, 3) float in [0, 1]."""
    base = display_slice(image)
    rgb = np.repeat(base[..., None], 3, -1) if base.ndim == 2 else base.copy()
    colours = PALETTE[np.asarray(label) % len(PALETTE)]
    mask = (np.asarray(label) > 0)[..., None]
    return np.where(mask, (1 - alpha) * rgb + alpha * colours, rgb)


def plot_case(image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray, path: str | Path,
              title: str = "") -> Path:
    """One row: input, ground truth, prediction, prediction overlaid on the input. image (C, H, W)."""
    panels = [("input", display_slice(image))]
    if truth is not None:
        panels.append(("ground truth", truth))
    panels += [("prediction", pred), ("overlay", overlay(image, pred))]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.5))
    for ax, (name, data) in zip(axes, panels):
        if name in ("ground truth", "prediction"):  # the overlay's colours, on black
            ax.imshow(PALETTE[np.asarray(data) % len(PALETTE)], interpolation="nearest")
        else:
            ax.imshow(data, cmap="gray", vmin=0, vmax=1)
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def most_informative_slice(label: np.ndarray, axis: int) -> int:
    """Index of the slice along `axis` with the most foreground (the middle one when all are empty)."""
    moved = np.moveaxis(label, axis % label.ndim, 0)
    counts = (moved > 0).reshape(moved.shape[0], -1).sum(1)
    return int(counts.argmax()) if counts.any() else moved.shape[0] // 2


def save_overlay_png(image: np.ndarray, label: np.ndarray, path: str | Path, axis: int = -1) -> Path:
    """An overlay PNG for a 2D image (C, H, W) or for the most informative slice of a volume (C, X, Y, Z)."""
    from PIL import Image as PILImage

    if image.ndim == 4:
        index = most_informative_slice(label, axis)
        image = np.take(image, index, axis=1 + axis % 3)
        label = np.take(label, index, axis=axis % 3)
    rgb = (overlay(image, label) * 255).round().astype(np.uint8)
    PILImage.fromarray(rgb).save(path)
    return Path(path)
