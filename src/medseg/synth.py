"""Seeded phantom datasets: noisy, low-contrast "scans" with one to three labelled structures, in the MSD layout.

Each class has its own shape family and a small intensity offset, so the task is learnable but not trivial:
class 1 ellipses/ellipsoids (brighter), class 2 rings/shells (darker), class 3 rounded boxes (brighter, textured).
Backgrounds carry a smooth bias field and Gaussian noise, as MRI does.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError

CLASS_NAMES = ["background", "ellipse", "ring", "box"]


def make_phantom(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int = 2,
                 noise: float = 0.12) -> tuple[np.ndarray, np.ndarray]:
    """One phantom. Returns (image float32 in about [0, 1], label uint8), both of `shape` (2D or 3D).

    Every phantom holds at least one structure; each class appears with probability 0.75.
    """
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    label = np.zeros(shape, np.uint8)
    present = rng.random(num_classes) < 0.75
    present[rng.integers(num_classes)] = True
    for cls in np.flatnonzero(present) + 1:
        label[_shape_mask(rng, grid, int(cls)) & (label == 0)] = cls
    bias = ndimage.gaussian_filter(rng.normal(size=shape), sigma=max(shape) / 6)
    bias = 0.15 * bias / (np.abs(bias).max() + 1e-8)
    image = 0.45 + bias + rng.normal(0, noise, size=shape)
    offsets = {1: 0.22, 2: -0.2, 3: 0.18}
    for cls, offset in offsets.items():
        image[label == cls] += offset
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 1.0)
    image[label == 3] += 0.3 * texture[label == 3] / (texture.std() + 1e-8) * noise
    image = ndimage.gaussian_filter(image, 0.6)
    return image.astype(np.float32), label


def _shape_mask(rng: np.random.Generator, grid: np.ndarray, cls: int) -> np.ndarray:
    ndim = grid.shape[-1]
    centre = rng.uniform(-0.45, 0.45, ndim)
    radii = rng.uniform(0.18, 0.38, ndim)
    rotation = _random_rotation(rng, ndim)
    local = (grid - centre) @ rotation
    if cls == 1:
        return (((local / radii) ** 2).sum(-1)) <= 1
    if cls == 2:
        r = np.sqrt(((local / radii) ** 2).sum(-1))
        return (r <= 1) & (r >= 0.55)
    return (np.abs(local / (radii * 0.8)) ** 4).sum(-1) <= 1  # a superellipse: a box with rounded corners


def _random_rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(ndim, ndim)))
    return q * np.sign(np.diag(r))


def write_synthetic_dataset(out: str | Path, cases: int = 100, dim: int = 2, size: int = 64,
                            num_classes: int = 2, seed: int = 0) -> Path:
    """Write a phantom dataset in the MSD layout: dataset.json, imagesTr/, labelsTr/.

    2D phantoms are 8-bit PNGs (as nnU-Net stores 2D data); 3D phantoms are NIfTI volumes with 1 mm spacing.
    """
    if dim not in (2, 3):
        raise MedsegError(f"--dim {dim}: phantoms are 2D or 3D")
    if not 1 <= num_classes <= 3:
        raise MedsegError(f"--classes {num_classes}: phantoms hold one to three structures")
    if cases < 2:
        raise MedsegError(f"--cases {cases}: at least 2 cases are needed to train and validate")
    out = Path(out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".png" if dim == 2 else ".nii.gz"
    training = []
    for i in range(cases):
        image, label = make_phantom(rng, (size,) * dim, num_classes)
        name = f"phantom_{i:03d}{suffix}"
        _save(out / "imagesTr" / name, image, is_label=False)
        _save(out / "labelsTr" / name, label, is_label=True)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": f"medseg phantoms {dim}D", "description": "synthetic, seeded, learnable phantoms",
        "tensorImageSize": f"{dim}D", "modality": {"0": "synthetic"}, "file_ending": suffix,
        "labels": {str(i): n for i, n in enumerate(CLASS_NAMES[: num_classes + 1])},
        "numTraining": cases, "numTest": 0, "seed": seed, "training": training, "test": [],
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return out


def _save(path: Path, array: np.ndarray, is_label: bool) -> None:
    if path.name.endswith(".png"):
        from PIL import Image as PILImage

        data = array if is_label else np.clip(array * 255, 0, 255).round()
        PILImage.fromarray(data.astype(np.uint8)).save(path)
    else:
        import nibabel as nib

        nib.save(nib.Nifti1Image(array.astype(np.uint8 if is_label else np.float32), np.eye(4)), str(path))
