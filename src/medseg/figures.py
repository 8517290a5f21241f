"""Figures: training curves, input / ground truth / prediction / overlay panels, contours with uncertainty, and
metric distributions."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or assumed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medseg.io import atomic_path  # noqa: E402
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
    return save_figure(fig, path, 110)


def save_figure(fig, path: str | Path, dpi: int, title: str = "") -> Path:
    """Title, tighten, write and close (figures are files here, never windows)."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
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
    return save_figure(fig, path, 100, title)


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
    with atomic_path(path) as tmp:
        PILImage.fromarray(rgb).save(tmp)
    return Path(path)


def plot_contours(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, uncertainty: np.ndarray | None,
                  path: str | Path, title: str = "") -> Path:
    """One row for a report: input, ground truth, prediction, both outlined on the input (truth solid,
    prediction dashed, one colour per class) and, when given, the uncertainty map (0 certain .. 1 undecided)."""
    base = display_slice(image)
    grey = base if base.ndim == 2 else base.mean(-1)
    panels = ["input", "ground truth", "prediction", "contours"] + (["uncertainty"] if uncertainty is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, name in zip(axes, panels):
        if name in ("ground truth", "prediction"):
            data = truth if name == "ground truth" else pred
            ax.imshow(PALETTE[np.asarray(data) % len(PALETTE)], interpolation="nearest")
        elif name == "uncertainty":
            shown = ax.imshow(uncertainty, cmap="magma", vmin=0, vmax=1)
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
        else:
            ax.imshow(base if name == "input" else grey, cmap="gray", vmin=0, vmax=1)
        if name == "contours":
            for k in sorted(set(np.unique(truth)) | set(np.unique(pred)) - {0}):
                colour = PALETTE[int(k) % len(PALETTE)]
                for mask, style in ((truth == k, "solid"), (pred == k, "dashed")):
                    if mask.any() and not mask.all():
                        ax.contour(mask, levels=[0.5], colors=[colour], linestyles=style, linewidths=1.2)
        ax.set_title(name)
        ax.axis("off")
    return save_figure(fig, path, 90, title)


def plot_distributions(rows: list[dict], classes: list[str], metrics: list[str], path: str | Path,
                       distance_unit: str = "mm") -> Path:
    """Box plots of per-case values, one panel per metric, one box per class (undefined values left out);
    distances in `distance_unit` (pixels for files without a spacing)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = [[float(r[metric]) for r in rows if r["class"] == name and not np.isnan(float(r[metric]))]
                  for name in classes]
        ax.boxplot([v if v else [np.nan] for v in values], showmeans=True)
        ax.set_xticks(range(1, len(classes) + 1), classes, rotation=20)
        ax.set_title(f"{metric} ({distance_unit})" if metric in ("hd95", "assd") else metric)
        ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path, 100)
