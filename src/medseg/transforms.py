"""Intensity normalisation, slicing, resizing/padding and batch augmentation.

Shapes: images are `(C, H, W)` per slice or `(B, C, H, W)` per batch, float32; labels `(H, W)` / `(B, H, W)` int64.
Padding and augmentation also take volumes: `(B, C, X, Y, Z)` and `(B, X, Y, Z)`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


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
    """The grid size that covers the same extent at the target spacing (at least one voxel per axis)."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target))


def resize_volume(array: np.ndarray, shape: tuple[int, ...], label: bool = False) -> np.ndarray:
    """Resample (C, X, Y, Z) images/probabilities (trilinear) or (X, Y, Z) labels (nearest) to `shape`."""
    if tuple(array.shape[-3:]) == tuple(shape):
        return array
    if label:
        tensor = torch.from_numpy(array.astype(np.float32))[None, None]
        return F.interpolate(tensor, size=shape, mode="nearest-exact")[0, 0].numpy().astype(array.dtype)
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    return F.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)[0].numpy()


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


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, *size), bilinear (also used on class probabilities)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) int -> (B, *size), nearest neighbour so that no new label values appear."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return F.interpolate(label[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()


def pad_or_crop(image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, ...],
                generator: torch.Generator | None = None, centre: tuple[int, ...] | None = None):
    """Pad (zeros; label 0) or crop (B, C, *spatial) to `size`, 2D or 3D.

    The window is centred by default, random when a generator is given, or around `centre` (a voxel index of the
    unpadded input, e.g. a foreground voxel), clipped so that it stays inside the padded input.
    """
    spatial = image.shape[2:]
    extra = [max(0, s - n) for s, n in zip(size, spatial)]
    if any(extra):
        pads = []
        for e in reversed(extra):
            pads += [e // 2, e - e // 2]
        image = F.pad(image, pads)
        label = F.pad(label, pads) if label is not None else None
    starts = []
    for axis, (n, s) in enumerate(zip(image.shape[2:], size)):
        if centre is not None:
            start = min(max(centre[axis] + extra[axis] // 2 - s // 2, 0), n - s)
        elif generator is not None:
            start = int(torch.randint(0, n - s + 1, (1,), generator=generator))
        else:
            start = (n - s) // 2
        starts.append(slice(start, start + s))
    image = image[(..., *starts)]
    label = label[(..., *starts)] if label is not None else None
    return image, label


def augment(image: torch.Tensor, label: torch.Tensor, generator: torch.Generator,
            affine_p: float = 0.3, max_rotation_deg: float = 15.0, max_scale: float = 0.15,
            intensity_p: float = 0.5, rotate90: bool = False,
            flip_axes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips along every spatial axis (or only `flip_axes`, counted from 0 over the sample's spatial
    axes), a small affine (2D only), intensity jitter and, with `rotate90`, 90-degree
    rotations in the last plane when it is square, per sample. The same spatial transform is applied to image
    and label. Rotations by 90 degrees suit data without a canonical orientation (EM, microscopy); for anatomy
    they ask the network to learn every orientation of a structure it only ever meets one way.

    image: (B, C, *spatial), any normalisation; label: (B, *spatial); 2D or 3D.
    """
    def rand(*shape):
        return torch.rand(shape, generator=generator)

    image, label = image.clone(), label.clone()
    b, spatial = image.shape[0], image.ndim - 2
    square = image.shape[-1] == image.shape[-2]
    for i in range(b):
        for axis in range(spatial) if flip_axes is None else flip_axes:
            if rand(1) < 0.5:
                axis = axis - spatial  # spatial index -> negative tensor axis
                image[i], label[i] = image[i].flip(axis), label[i].flip(axis)
        if square and rotate90:
            k = int(rand(1) * 4) % 4
            image[i], label[i] = image[i].rot90(k, (-2, -1)), label[i].rot90(k, (-2, -1))
    if spatial == 2:
        image, label = _random_affine(image, label, rand, affine_p, max_rotation_deg, max_scale)
    if intensity_p > 0:
        shape = (b,) + (1,) * (image.ndim - 1)
        jitter = rand(b) < intensity_p
        contrast = 1 + (rand(*shape) - 0.5) * 0.4
        brightness = (rand(*shape) - 0.5) * 0.2
        gamma = torch.exp((rand(*shape) - 0.5) * 0.6)
        low, span = _intensity_range(image)
        # gamma on each sample rescaled to [0, 1] and mapped back (as nnU-Net): z-scored negatives are curved,
        # not clipped; brightness scales with the range, so [0, 1] and z-scored data both work
        jittered = (((image - low) / span) ** gamma * span + low) * contrast + brightness * span
        image = torch.where(jitter.view(shape), jittered, image)
    return image, label


def _intensity_range(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample minimum and (non-zero) range, shaped (B, 1, ...) to broadcast over the sample."""
    flat, shape = image.flatten(1), (-1,) + (1,) * (image.ndim - 1)
    low = flat.amin(1)
    return low.view(shape), (flat.amax(1) - low).clamp(min=1e-6).view(shape)


def _random_affine(image, label, rand, p, max_rotation_deg, max_scale):
    b = image.shape[0]
    chosen = rand(b) < p
    if not chosen.any():
        return image, label
    angle = (rand(b) * 2 - 1) * math.radians(max_rotation_deg)
    scale = 1 + (rand(b) * 2 - 1) * max_scale
    shift = (rand(b, 2) * 2 - 1) * 0.05
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(b, 2, 3)
    theta = torch.where(chosen.view(b, 1, 1), theta, identity)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    label = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False)[:, 0].long()
    return image, label
