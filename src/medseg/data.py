"""Read cases into memory, checked and normalised (NumPy only: prediction uses the same readers without PyTorch).

A `LoadedCase` keeps the whole image (normalised, channels-first) and its class-index label, so that validation
and evaluation work per case (per volume); `medseg.samplers` cuts training batches from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medseg import arrays
from medseg.console import progress, show_bars
from medseg.config import TrainConfig
from medseg.datasets import Case, labels_to_classes
from medseg.errors import MedsegError
from medseg.io import Image, orientation_of, read_image
from medseg.transforms import (normalize, orientation_transform, reorient, reoriented_spacing, resampled_shape,
                               resize_volume)


@dataclass
class LoadedCase:
    case_id: str
    image: Image  # array normalised as configured, (C, *spatial)
    label: np.ndarray  # (*spatial) class indices, uint8 (uint16 past 255 classes)
    roi: np.ndarray | None = None  # (*spatial) bool: where metrics count (None: everywhere)
    points: dict | None = field(default=None, repr=False)  # class_points(label), made when first asked for

    # the reading interface the samplers use, shared with `medseg.cache.DiskCase`
    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.label.shape

    def read(self, index: tuple = ()) -> tuple[np.ndarray, np.ndarray]:
        """(image (C, ...), label (...)) of the region `index` (slices over the spatial axes), as views."""
        return self.image.array[(slice(None), *index)], self.label[index]

    def take(self, axis: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image and label at `indices` along spatial `axis` (slices and their neighbours), copied."""
        return arrays.take(self.image.array, indices, 1 + axis), arrays.take(self.label, indices, axis)

    def class_points(self) -> dict[int, np.ndarray]:
        if self.points is None:
            self.points = class_points(self.label)
        return self.points


MAX_POINTS_PER_CLASS = 10_000  # per case and class: enough to centre samples on, small for 100+ classes


def class_points(label: np.ndarray) -> dict[int, np.ndarray]:
    """Voxel indices (N, ndim) int32 of each foreground class in `label`, at most MAX_POINTS_PER_CLASS per class
    (a fixed sample, the same in every run): where the samplers centre the samples they give to a class. One sort
    of the foreground voxels, so 100+ classes cost no more than one."""
    flat = np.flatnonzero(label)
    values = label.ravel()[flat]
    order = np.argsort(values, kind="stable")
    flat, values = flat[order], values[order]
    classes, starts = np.unique(values, return_index=True)
    rng = np.random.default_rng(0)
    points = {}
    for k, (start, end) in zip(classes.tolist(), zip(starts, [*starts[1:], len(flat)])):
        chosen = flat[start:end]
        if len(chosen) > MAX_POINTS_PER_CLASS:
            chosen = np.sort(rng.choice(chosen, MAX_POINTS_PER_CLASS, replace=False))
        points[int(k)] = np.stack(np.unravel_index(chosen, label.shape), 1).astype(np.int32)
    return points


def read_case_image(paths: list, color: str, npy_layout: str = "auto") -> Image:
    """Read one case's image, stacking per-channel files (nnU-Net `_0000`, `_0001`, ...) into channels; an image
    holding NaN or infinite values is refused (one would turn a z-scored image, and its prediction, into NaN)."""
    images = [read_image(p, color=color, npy_layout=npy_layout) for p in paths]
    for image in images:
        check_finite(image)
    first = images[0]
    for other in images[1:]:
        if other.spatial_shape != first.spatial_shape:
            raise MedsegError(f"{other.path}: shape {other.spatial_shape} differs from {first.path} "
                              f"{first.spatial_shape}; channels of one case must align")
    if len(images) > 1:
        first.array = np.concatenate([i.array for i in images], 0)
    return first


def check_finite(image: Image) -> None:
    if np.issubdtype(image.array.dtype, np.floating) and not np.isfinite(image.array).all():
        bad = int((~np.isfinite(image.array)).sum())
        raise MedsegError(f"{image.path}: {bad} voxel(s) are NaN or infinite; fix or mask them before training or "
                          "prediction (medseg does not guess values)")


def read_label(case: Case, cfg: TrainConfig) -> tuple[Image, np.ndarray]:
    """The case's mask as read, and as class indices by the configured mask rule."""
    mask = read_image(case.mask, npy_layout=cfg.npy_layout)
    named = len(cfg.class_names) - 1 if cfg.class_names else None
    most = max(v for v in (case.largest_label, named) if v is not None) if case.largest_label or named else None
    return mask, labels_to_classes(mask.array, case.mask, cfg.binary_masks, cfg.mask_threshold, cfg.mask_levels,
                                   most)


def check_same_grid(case: Case, image: Image, mask: Image) -> None:
    """Image and mask must share a size (and, for volumes, an affine)."""
    if mask.spatial_shape != image.spatial_shape:
        raise MedsegError(f"{case.mask}: mask shape {mask.spatial_shape} differs from image {case.images[0]} "
                          f"{image.spatial_shape}; image and mask must have the same size")
    if image.affine is not None and mask.affine is not None and not np.allclose(image.affine, mask.affine, atol=1e-3):
        raise MedsegError(f"{case.mask}: spacing, orientation or origin differ from the image {case.images[0]} "
                          "(affines differ); resample the mask onto the image grid")


def load_case(case: Case, cfg: TrainConfig | None = None, resample: bool = True) -> LoadedCase:
    """Read, check and normalise one case as `cfg` says (colour, mask rule, normalisation), and resample a volume
    to `cfg.target_spacing` (image trilinear, mask nearest) unless `resample` is False."""
    cfg = cfg or TrainConfig()
    image = read_case_image(case.images, cfg.color, cfg.npy_layout)
    mask, label = read_label(case, cfg)
    check_same_grid(case, image, mask)
    roi = read_roi(case, image.spatial_shape)
    image.array = normalize(image.array, cfg.normalization, cfg.intensity_stats)
    loaded = LoadedCase(case.case_id, image, label, roi)
    return to_network_grid(loaded, cfg) if resample else loaded


def to_network_grid(loaded: LoadedCase, cfg: TrainConfig) -> LoadedCase:
    """A case read on its own grid, reoriented to the network's voxel order and resampled to its target spacing
    (image trilinear, labels and region of interest nearest), as training sees cases."""
    image, label, roi = loaded.image, loaded.label, loaded.roi
    if cfg.orientation and image.affine is not None and orientation_of(image.affine) != cfg.orientation:
        label = reorient(label, image.affine, cfg.orientation)
        roi = None if roi is None else reorient(roi, image.affine, cfg.orientation)
        image = to_orientation(image, cfg.orientation)
    if cfg.target_spacing and image.ndim == 3:
        shape = resampled_shape(image.spatial_shape, image.spacing, cfg.target_spacing)
        image = Image(resize_volume(image.array, shape), tuple(float(t) for t in cfg.target_spacing), image.affine,
                      image.path, image.meta)
        label = resize_volume(label, shape, label=True)
        roi = None if roi is None else resize_volume(roi.astype(np.uint8), shape, label=True).astype(bool)
    return LoadedCase(loaded.case_id, image, label, roi)


def to_orientation(image: Image, codes: str) -> Image:
    """The volume with its voxel axes permuted and flipped to `codes`; spacing and affine follow."""
    from nibabel.orientations import inv_ornt_aff

    affine = image.affine @ inv_ornt_aff(orientation_transform(image.affine, codes), image.spatial_shape)
    return Image(reorient(image.array, image.affine, codes), reoriented_spacing(image.spacing, image.affine, codes),
                 affine, image.path, image.meta)


def first_orientation(cases: list[Case], color: str = "keep") -> str | None:
    """Axis codes of the first case's volume (the voxel order a network trained on these cases works in); None
    for 2D images or volumes without geometry."""
    return (read_image(cases[0].images[0], color=color).orientation or None) if cases else None


def read_roi(case: Case, shape: tuple[int, ...]) -> np.ndarray | None:
    """The case's region of interest as a boolean map (*spatial): wherever any channel is non-zero; None where
    the case has none. Its shape must be the image's `shape`."""
    if case.roi is None:
        return None
    roi = read_image(case.roi)
    if roi.spatial_shape != shape:
        raise MedsegError(f"{case.roi}: region-of-interest shape {roi.spatial_shape} differs from the image "
                          f"{case.images[0]} {shape}")
    return roi.array.max(0) > 0


def load_cases(cases: list[Case], cfg: TrainConfig, what: str = "cases", resample: bool = True) -> list[LoadedCase]:
    loaded = [load_case(c, cfg, resample) for c in progress(cases, f"reading {what}", show_bars(cfg.progress))]
    check_alike([(c.image.path, c.image.ndim, c.image.array.shape[0]) for c in loaded])
    return loaded


def check_alike(facts: list[tuple]) -> None:
    """Cases given as (image path, spatial dims, channels) must agree in both: one dataset, one kind of input
    (for cases held in memory and cached on disk alike)."""
    path, ndim, channels = facts[0]
    kinds = {2: "a 2D image", 3: "a 3D volume"}
    for other, other_ndim, other_channels in facts[1:]:
        if other_ndim != ndim:
            raise MedsegError(f"{other}: {kinds[other_ndim]} among {kinds[ndim][2:]}s (first: {path}); keep 2D and "
                              "3D data in separate datasets")
        if other_channels != channels:
            raise MedsegError(f"{other}: {other_channels} channels where other cases have {channels}; use --color "
                              "gray to convert colour images")
