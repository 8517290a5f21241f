"""Run a trained network over an image or volume at the input's own resolution.

2D models go slice by slice; 3D models slide a window of the training patch over the volume and blend the
windows with Gaussian importance weights (centres count more than edges, where context is missing).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg import arrays
from medseg.config import TrainConfig
from medseg.datasets import class_dtype
from medseg.errors import MedsegError
from medseg.io import Image, orientation_of
from medseg.postprocess import apply_rules
from medseg.regions import paint
from medseg.transforms import normalize, reorient, reoriented_spacing, resampled_shape, resize_volume, to_slices


@dataclass
class TrainedModel:
    """A network ready to predict, with what it needs around it. `model` is a PyTorch module on `device`, or an
    ONNX network (`medseg.onnx_engine.OnnxNetwork`, NumPy in and out, device "cpu")."""
    model: Any
    config: TrainConfig
    class_names: list[str]
    in_channels: int  # channels of the input image (a 2.5D network sees config.slices_per_input times as many)
    run: Path
    device: Any  # torch.device, or "cpu" for an ONNX network
    postprocess_classes: list[int] = field(default_factory=list)  # keep-largest-component, chosen on validation
    min_sizes: dict[int, int] = field(default_factory=dict)  # class -> smallest component kept, chosen likewise


def _onnx(trained: TrainedModel) -> bool:
    """Whether the network runs under onnxruntime (NumPy in and out) rather than PyTorch."""
    return getattr(trained.model, "takes_numpy", False)


def _engine_array(trained: TrainedModel, array: np.ndarray):
    """The array the network takes: a tensor on the model's device, or the NumPy array itself for ONNX."""
    array = np.ascontiguousarray(array)
    if _onnx(trained):
        return array
    import torch

    return torch.from_numpy(array).to(trained.device)


def _precision(trained: TrainedModel):
    """Autocast as the run trained (bf16/fp16 on a GPU); nothing on a CPU or under onnxruntime."""
    import contextlib

    if _onnx(trained) or trained.device.type != "cuda":
        return contextlib.nullcontext()
    from medseg import precision

    return precision.autocast(trained.device, precision.autocast_dtype(trained.device, trained.config.precision))


def predict_probabilities(trained: TrainedModel, array: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Class probabilities (K, *spatial) float32 for a normalised image (C, *spatial); for a region-based run,
    one independent (sigmoid) probability per region (R, *spatial).

    fit="resize": each slice is resized to the training size and probabilities resized back (bilinear);
    fit="pad": the network runs on slices at their native size (zero-padded up to the training size).
    """
    with _precision(trained):
        return _probabilities(trained, array, batch_size)


# Pixels of one inference batch of 2D slices: 32 slices of 256x256. A batch of 32 whole 512x512 CT slices held
# about 3 GB of activations (width 8) and set the whole run's peak memory; 8 of them hold a quarter.
BATCH_PIXELS = 32 * 256 * 256


def slices_per_batch(shape: tuple[int, ...], batch_size: int) -> int:
    """At most `batch_size` slices of `shape`, and no more than BATCH_PIXELS pixels in all (at least one slice)."""
    return max(1, min(batch_size, BATCH_PIXELS // int(np.prod(shape))))


def _probabilities(trained: TrainedModel, array: np.ndarray, batch_size: int) -> np.ndarray:
    cfg, model, sigmoid = trained.config, trained.model, bool(trained.config.regions)
    if cfg.dims == 3:
        volume = _engine_array(trained, array[None])
        return arrays.to_numpy(sliding_window(model, volume, cfg.patch_size, cfg.overlap, mirror=tta_axes(cfg),
                                              sigmoid=sigmoid))
    rotate = tta_rotates(cfg)
    slices = to_slices(array, cfg.axis, cfg.context)
    native = slices[0].shape[-2:]
    batch_size = slices_per_batch(native, batch_size)
    out = []
    for start in range(0, len(slices), batch_size):
        batch = _engine_array(trained, np.stack(slices[start:start + batch_size]))
        if cfg.fit == "resize":
            probs = arrays.resize(forward_probabilities(model, arrays.resize(batch, cfg.patch_size),
                                                        tta_axes(cfg), sigmoid, rotate), native)
        else:
            probs = _at_least_training_size(model, batch, cfg.patch_size, tta_axes(cfg), sigmoid, rotate)
        out.append(arrays.to_numpy(probs))
    probs = np.concatenate(out, 0)  # (S, K, H, W)
    if array.ndim == 3:
        return probs[0]
    return np.moveaxis(probs, 0, 1 + cfg.axis % 3)


def tta_axes(cfg) -> tuple[int, ...]:
    """Spatial axes that mirroring TTA flips: those the network was trained to be mirrored along (a structure
    whose side carries its label, like the anterior and posterior hippocampus, must not be flipped there)."""
    if not cfg.mirror_tta:
        return ()
    return tuple(range(cfg.dims)) if cfg.flip_axes is None else tuple(cfg.flip_axes)


def tta_rotates(cfg) -> bool:
    """Whether TTA also averages over a quarter turn: for 2D networks trained with 90-degree rotations (data with
    no up), so that with both flips the prediction is averaged over all eight symmetries the training used."""
    return bool(cfg.mirror_tta and cfg.rotate90 and cfg.dims == 2)


def forward_probabilities(model, batch, mirror: tuple[int, ...] = (), sigmoid: bool = False, rotate: bool = False):
    """Softmax (or, for region outputs, sigmoid) of the model for (B, C, *spatial); averaged over every
    combination of flips along the spatial axes `mirror` (counted from 0), and with `rotate` over each of those
    turned by 90 degrees in the last two axes too."""
    axes = [2 + a for a in mirror]
    combos = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
    total, count = None, 0
    for turns in (0, 1) if rotate else (0,):
        for flip in combos:
            seen = arrays.flip(batch, flip) if flip else batch
            logits = arrays.run_network(model, arrays.rot90(seen, turns) if turns else seen)
            probs = arrays.activation(logits, sigmoid)
            probs = arrays.rot90(probs, -turns) if turns else probs
            probs = arrays.flip(probs, flip) if flip else probs
            total, count = (probs if total is None else total + probs), count + 1
    return total / count


def _at_least_training_size(model, batch, size: tuple[int, int], mirror: tuple[int, ...], sigmoid: bool = False,
                            rotate: bool = False):
    """Slices smaller than the training sample are zero-padded to it, as in training, and cropped back."""
    h, w = batch.shape[-2:]
    padded = arrays.pad_centre(batch, size)
    return arrays.crop_centre(forward_probabilities(model, padded, mirror, sigmoid, rotate), (h, w))


def gaussian_weights(patch: tuple[int, ...], sigma_scale: float = 0.125) -> np.ndarray:
    """Importance map over a patch (float32): a Gaussian with sigma = patch / 8, peak 1, never exactly zero."""
    weights = np.ones((), np.float32)
    for size in patch:
        x = np.arange(size, dtype=np.float32) - (size - 1) / 2
        weights = weights[..., None] * np.exp(-(x**2) / (2 * (sigma_scale * size) ** 2)).astype(np.float32)
    weights = weights / weights.max()
    return np.maximum(weights, weights[weights > 0].min())


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spaced window starts covering [0, size) with at least `overlap` between neighbours."""
    if size <= patch:
        return [0]
    steps = math.ceil((size - patch) / (patch * (1 - overlap))) + 1
    return sorted({round(i * (size - patch) / (steps - 1)) for i in range(steps)})


def sliding_window(model, volume, patch: tuple[int, ...], overlap: float = 0.5, batch_size: int = 2,
                   mirror: tuple[int, ...] = (), sigmoid: bool = False):
    """Gaussian-weighted sliding-window probabilities (K, *spatial) for one input (1, C, *spatial), a tensor on
    the model's device or a NumPy array (ONNX); the result is of the same kind.

    Inputs smaller than the patch are zero-padded (as training patches are) and the result cropped back.
    """
    spatial = volume.shape[2:]
    padded = arrays.pad_centre(volume, patch)
    weights = gaussian_weights(patch)
    if not isinstance(volume, np.ndarray):
        weights = volume.new_tensor(weights)
    starts = [window_starts(n, p, overlap) for n, p in zip(padded.shape[2:], patch)]
    total, norm = None, arrays.zeros(padded.shape[2:], volume)
    corners = list(itertools.product(*starts))
    if hasattr(model, "expect"):  # --engine auto: a long volume compiles at once (medseg.compiling)
        model.expect(-(-len(corners) // batch_size) * 2 ** len(mirror))
    for first in range(0, len(corners), batch_size):
        chunk = corners[first:first + batch_size]
        windows = [tuple(slice(c, c + p) for c, p in zip(corner, patch)) for corner in chunk]
        probs = forward_probabilities(model, arrays.concat([padded[(..., *w)] for w in windows]), mirror, sigmoid)
        if total is None:
            total = arrays.zeros((probs.shape[1], *padded.shape[2:]), volume)
        for window, p in zip(windows, probs):
            total[(slice(None), *window)] += p * weights
            norm[window] += weights
    return arrays.crop_centre(total / norm, tuple(spatial))


def native_probabilities(trained: TrainedModel, array: np.ndarray, spacing: tuple[float, ...] | None = None,
                         affine: np.ndarray | None = None):
    """Probabilities on the input's own grid: a volume whose voxel order (from its `affine`) differs from the
    run's is reoriented to it for the network and the probabilities reoriented back; one whose `spacing` differs
    from the run's target spacing is resampled to it and the probabilities resampled back (trilinear)."""
    codes = trained.config.orientation
    if codes and affine is not None and array.ndim == 4 and orientation_of(affine) != codes:
        probs = native_probabilities(trained, reorient(array, affine, codes),
                                     spacing and reoriented_spacing(spacing, affine, codes))
        return reorient(probs, affine, codes, inverse=True)
    target = trained.config.target_spacing
    if target and spacing and len(spacing) == 3 and not np.allclose(spacing, target):
        shape = array.shape[1:]
        resampled = resize_volume(array, resampled_shape(shape, spacing, target))
        return resize_volume(predict_probabilities(trained, resampled), shape)
    return predict_probabilities(trained, array)


def predict_labels(trained: TrainedModel, array: np.ndarray, postprocess: bool = True,
                   spacing: tuple[float, ...] | None = None, affine: np.ndarray | None = None) -> np.ndarray:
    """Class indices (*spatial) uint8 for a normalised image (C, *spatial) on its own grid (see
    `native_probabilities`), with the run's chosen post-processing."""
    return ensemble_labels([trained], array, spacing, affine, postprocess)


def uncertainty(probs: np.ndarray, regions: bool = False) -> np.ndarray:
    """Entropy of the predicted probabilities (C, *spatial) scaled to [0, 1]: 0 where the model is certain, 1
    where it is evenly split (over the classes; for sigmoid regions, the mean over regions of each one's entropy)."""
    p = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    if regions:
        q = np.clip(1 - probs.astype(np.float64), 1e-12, 1.0)
        return (-(p * np.log2(p) + q * np.log2(q))).mean(0)
    return -(p * np.log(p)).sum(0) / np.log(probs.shape[0])


def to_labels(probs: np.ndarray, trained: TrainedModel) -> np.ndarray:
    """Probabilities -> label map (*spatial) uint8 (uint16 past 255 classes): argmax over classes, or regions above 0.5 painted largest
    first (see `medseg.regions`)."""
    regions = trained.config.regions
    return paint(probs > 0.5, regions) if regions else probs.argmax(0).astype(class_dtype(probs.shape[0] - 1))


def predict_image(models: TrainedModel | list[TrainedModel], image: Image, with_probabilities: bool = False):
    """Normalise a freshly read image as in training and predict its label map (*spatial); with
    `with_probabilities`, (labels, probabilities (K, *spatial)).

    Several models (the folds of a cross-validation, the members of an ensemble) are averaged: see
    `ensemble_labels`.
    """
    models = models if isinstance(models, list) else [models]
    first = models[0]
    if image.array.shape[0] != first.in_channels:
        hint = " (use a colour/grey image like the training data)" if first.in_channels in (1, 3) else ""
        raise MedsegError(f"{image.path}: {image.array.shape[0]} channels, the model expects "
                          f"{first.in_channels}{hint}")
    cfg = first.config
    array = normalize(image.array, cfg.normalization, cfg.intensity_stats)
    probs = ensemble_probabilities(models, array, image.spacing, image.affine)
    labels = final_labels(models, probs)
    return (labels, probs) if with_probabilities else labels


def ensemble_labels(models: list[TrainedModel], array: np.ndarray, spacing: tuple[float, ...] | None = None,
                    affine: np.ndarray | None = None, postprocess: bool = True) -> np.ndarray:
    """The label map of one model, or of several by averaging their probabilities, for a normalised image (C,
    *spatial) on its own grid (see `ensemble_probabilities` and `final_labels`)."""
    return final_labels(models, ensemble_probabilities(models, array, spacing, affine), postprocess)


def ensemble_probabilities(models: list[TrainedModel], array: np.ndarray, spacing: tuple[float, ...] | None = None,
                           affine: np.ndarray | None = None) -> np.ndarray:
    """Probabilities (K, *spatial) on the input's own grid: one model's, or the mean over several."""
    return sum(native_probabilities(m, array, spacing, affine) for m in models) / len(models)


def final_labels(models: list[TrainedModel], probs: np.ndarray, postprocess: bool = True) -> np.ndarray:
    """Probabilities -> the label map a user gets: argmax (or regions), then, with `postprocess`, a class keeps
    only its largest component, or loses its small components (the median of the chosen sizes), where at least
    half of the models chose that on their validation cases."""
    labels = to_labels(probs, models[0])
    if not postprocess:
        return labels
    classes = range(1, len(models[0].class_names))
    votes = [k for k in classes if 2 * sum(k in m.postprocess_classes for m in models) >= len(models)]
    small = {k: int(np.median([m.min_sizes[k] for m in models if k in m.min_sizes])) for k in classes
             if k not in votes and 2 * sum(k in m.min_sizes for m in models) >= len(models)}
    return apply_rules(labels, votes, small)
