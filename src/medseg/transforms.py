"""What every image goes through before a network sees it, in training and prediction alike: intensity
normalisation, resampling, reorientation and slicing. NumPy only (prediction runs without PyTorch under
onnxruntime); what training alone does to batches of tensors is in `medseg.augment`.

Shapes: images are `(C, *spatial)`, float32; labels `(*spatial)` integers.
"""
from __future__ import annotations

import numpy as np

from medseg import arrays


def normalize_percentile(array: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip each channel to its [low, high] percentiles and scale to [0, 1]. array: (C, *spatial).

    A constant channel becomes all zeros rather than dividing by zero.
    """
    out = np.empty(array.shape, dtype=np.float32)
    for c, channel in enumerate(array.astype(np.float32)):
        lo, hi = np.percentile(channel, [low, high])
        out[c] = (np.clip(channel, lo, hi) - lo) / (hi - lo) if hi > lo else 0.0
    return out


NORMALIZATIONS = ("percentile", "zscore", "ct", "unit")


def normalize(array: np.ndarray, scheme: str = "percentile", stats: list[dict] | None = None) -> np.ndarray:
    """Intensity normalisation of (C, *spatial) per channel, by scheme:

    percentile: clip to the image's own 0.5-99.5 percentiles, scale to [0, 1] (the seed's recipe);
    zscore: subtract the image's mean, divide by its std (MRI and other uncalibrated modalities);
    ct: clip to the dataset's foreground 0.5-99.5 percentiles, then z-score with the dataset's foreground mean
        and std (`stats`, one dict per channel from the fingerprint): Hounsfield units mean the same in every scan;
    unit: divide by 255 (8-bit photographs and micrographs).
    """
    if scheme == "percentile":
        return normalize_percentile(array)
    out = array.astype(np.float32)
    if scheme == "unit":
        return out / 255.0
    for c in range(out.shape[0]):
        if scheme == "ct":
            if not stats:
                raise ValueError("ct normalisation needs the dataset's foreground intensity statistics")
            s = stats[c]
            out[c] = (np.clip(out[c], s["p00_5"], s["p99_5"]) - s["mean"]) / max(s["std"], 1e-8)
        elif scheme == "zscore":
            std = out[c].std()
            out[c] = (out[c] - out[c].mean()) / (std if std > 0 else 1.0)
        else:
            raise ValueError(f"unknown normalisation {scheme!r}; choose from {NORMALIZATIONS}")
    return out


def resampled_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: list[float]) -> tuple[int, ...]:
    """The grid size that covers the same extent at the target spacing (at least one voxel per axis), refused
    before it is made where it exceeds the voxel limit (a header claiming 150 mm voxels: `medseg.limits`)."""
    from medseg import limits

    resampled = tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target))
    limits.check_voxels(f"a {' x '.join(map(str, shape))} image at {' x '.join(f'{v:g}' for v in spacing)} mm",
                        resampled, what=f"resampled to {' x '.join(f'{v:g}' for v in target)} mm makes")
    return resampled


def resize_volume(array: np.ndarray, shape: tuple[int, ...], label: bool = False) -> np.ndarray:
    """Resample (C, X, Y, Z) images/probabilities (trilinear) or (X, Y, Z) labels (nearest) to `shape`."""
    if tuple(array.shape[-3:]) == tuple(shape):
        return array
    if label:
        return arrays.resize_nearest(array, tuple(shape))
    return arrays.resize(np.asarray(array, np.float32)[None], tuple(shape))[0]


def orientation_transform(affine: np.ndarray, codes: str, inverse: bool = False) -> np.ndarray:
    """nibabel's axis permutation and flips taking the voxel order of `affine` to `codes` (e.g. 'RAS'), or back."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    native, wanted = io_orientation(affine), axcodes2ornt(tuple(codes))
    return ornt_transform(wanted, native) if inverse else ornt_transform(native, wanted)


def reorient(array: np.ndarray, affine: np.ndarray, codes: str, inverse: bool = False) -> np.ndarray:
    """Permute and flip the spatial axes of `array` ((*spatial) or (C, *spatial), 3D) from the voxel order of
    `affine` to `codes` (e.g. 'RAS'); with `inverse`, from `codes` back to the order of `affine`. Pure axis
    operations: no interpolation, so a round trip returns the input exactly."""
    from nibabel.orientations import apply_orientation

    transform = orientation_transform(affine, codes, inverse)
    if array.ndim == 3:
        return np.ascontiguousarray(apply_orientation(array, transform))
    return np.stack([apply_orientation(channel, transform) for channel in array])


def reoriented_spacing(spacing: tuple[float, ...], affine: np.ndarray, codes: str) -> tuple[float, ...]:
    """The voxel spacing of a volume once `reorient`ed to `codes`."""
    out = [0.0] * len(spacing)
    for axis, (target, _) in enumerate(orientation_transform(affine, codes)):
        out[int(target)] = float(spacing[axis])
    return tuple(out)


def to_slices(array: np.ndarray, axis: int, context: int = 0) -> list[np.ndarray]:
    """(C, *spatial) -> list of (C * (2 * context + 1), H, W). A 2D image is one slice; a volume is cut along
    spatial `axis`, and with `context` each slice brings its neighbours on both sides as extra channels
    ("2.5D": some 3D context at 2D cost; at the volume's ends the edge slice is repeated)."""
    if array.ndim == 3:
        return [array]
    moved = np.moveaxis(array, 1 + (axis % 3), 1)
    n = moved.shape[1]
    return [np.ascontiguousarray(moved[:, np.clip(np.arange(i - context, i + context + 1), 0, n - 1)]
                                 .reshape(-1, *moved.shape[2:])) for i in range(n)]


def from_slices(slices: list[np.ndarray], axis: int) -> np.ndarray:
    """Inverse of `to_slices` for label maps: list of (H, W) -> volume (*spatial) with slices along `axis`."""
    return np.moveaxis(np.stack(slices, 0), 0, axis % 3)
