"""What training does to batches of tensors on their way to the network: resizing label slices to the training
size (images: `medseg.arrays.resize`), padding or cropping to it, and random augmentation.

Shapes: images are `(B, C, H, W)` float32 and labels `(B, H, W)` int64; padding, cropping and augmentation also
take volumes: `(B, C, X, Y, Z)` and `(B, X, Y, Z)`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
            intensity_p: float = 0.5, rotate90: bool = False, flip_axes: list[int] | None = None,
            elastic_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips along every spatial axis (or only `flip_axes`, counted from 0 over the sample's spatial
    axes), a small affine and, on `elastic_p` of the samples, an elastic deformation (2D only), intensity jitter
    and, with `rotate90`, 90-degree rotations in the last plane when it is square, per sample. The same spatial
    transform is applied to image and label. Rotations by 90 degrees suit data without a canonical orientation
    (EM, microscopy); for anatomy they ask the network to learn every orientation of a structure it only ever
    meets one way.

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
        image, label = _random_warp(image, label, rand, affine_p, max_rotation_deg, max_scale, elastic_p)
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


def _random_warp(image, label, rand, p, max_rotation_deg, max_scale, elastic_p):
    """A random affine on `p` of the samples and an elastic deformation on `elastic_p` of them, as one resampling."""
    b, h, w = image.shape[0], image.shape[-2], image.shape[-1]
    chosen = rand(b) < p
    bent = rand(b) < elastic_p if elastic_p > 0 else torch.zeros(b, dtype=torch.bool)
    if not chosen.any() and not bent.any():
        return image, label
    angle = (rand(b) * 2 - 1) * math.radians(max_rotation_deg)
    scale = 1 + (rand(b) * 2 - 1) * max_scale
    shift = (rand(b, 2) * 2 - 1) * 0.05
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid works in coordinates normalised per axis (x over w pixels, y over h): a rotation there shears a
    # sample that is not square, so it is taken into pixel units and back (x' = cos x - sin y h/w, ...)
    theta = torch.stack([torch.stack([cos, -sin * h / w, shift[:, 0]], 1),
                         torch.stack([sin * w / h, cos, shift[:, 1]], 1)], 1)
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(b, 2, 3)
    theta = torch.where(chosen.view(b, 1, 1), theta, identity)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    if bent.any():
        grid = grid + _elastic_field(b, h, w, rand) * bent.view(b, 1, 1, 1)
    # where the warp reaches past the sample, image and label are both mirrored in: a label padded with 0 beside
    # a replicated image border (as before) taught 2.7% of all training pixels that smeared texture is label 0
    # (9% of a warped 128x128 sample lies outside it, on average), and on ISBI label 0 is the membrane
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    label = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="reflection",
                          align_corners=False)[:, 0].long()
    return image, label


ELASTIC_SPACING, ELASTIC_PIXELS = 32, 5.0


def _elastic_field(b: int, h: int, w: int, rand) -> torch.Tensor:
    """(B, H, W, 2) smooth random displacements in grid_sample's [-1, 1] units: uniform in +-ELASTIC_PIXELS at
    control points every ELASTIC_SPACING pixels (the U-Net paper's coarse grid, scaled to the crop), bicubically
    interpolated, and tapered to zero at the edges so that no pixel is pulled in from outside the sample."""
    rows, cols = max(2, round(h / ELASTIC_SPACING) + 1), max(2, round(w / ELASTIC_SPACING) + 1)
    coarse = (rand(b, 2, rows, cols) * 2 - 1) * ELASTIC_PIXELS
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    taper = torch.sin(torch.linspace(0, math.pi, h))[:, None] * torch.sin(torch.linspace(0, math.pi, w))[None]
    field = field * taper
    return torch.stack([field[:, 0] * 2 / w, field[:, 1] * 2 / h], -1)  # grid's last axis is (x, y)
