"""Run a trained 2D network over an image or volume, slice by slice, at the input's own resolution."""
from __future__ import annotations

import numpy as np
import torch

from medseg.checkpoint import TrainedModel
from medseg.errors import MedsegError
from medseg.io import Image
from medseg.transforms import normalize_percentile, pad_or_crop, resize_image, to_slices


@torch.no_grad()
def predict_probabilities(trained: TrainedModel, array: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Class probabilities (K, *spatial) float32 for a normalised image (C, *spatial).

    fit="resize": each slice is resized to the training size and probabilities resized back (bilinear);
    fit="pad": the network runs on slices at their native size (zero-padded up to the training size).
    """
    cfg, model = trained.config, trained.model
    slices = to_slices(array, cfg.axis)
    native = slices[0].shape[-2:]
    out = []
    for start in range(0, len(slices), batch_size):
        batch = torch.from_numpy(np.stack(slices[start:start + batch_size])).to(trained.device)
        if cfg.fit == "resize":
            probs = resize_image(model(resize_image(batch, (cfg.size, cfg.size))).softmax(1), native)
        else:
            probs = _at_least_training_size(model, batch, cfg.size)
        out.append(probs.cpu().numpy())
    probs = np.concatenate(out, 0)  # (S, K, H, W)
    if array.ndim == 3:
        return probs[0]
    return np.moveaxis(probs, 0, 1 + cfg.axis % 3)


def _at_least_training_size(model: torch.nn.Module, batch: torch.Tensor, size: int) -> torch.Tensor:
    """Slices smaller than the training size are zero-padded to it, as in training, and cropped back."""
    h, w = batch.shape[-2:]
    padded, _ = pad_or_crop(batch, None, (max(h, size), max(w, size)))
    top, left = (padded.shape[-2] - h) // 2, (padded.shape[-1] - w) // 2
    return model(padded).softmax(1)[..., top:top + h, left:left + w]


def predict_labels(trained: TrainedModel, array: np.ndarray) -> np.ndarray:
    """Class indices (*spatial) uint8 for a normalised image (C, *spatial)."""
    return predict_probabilities(trained, array).argmax(0).astype(np.uint8)


def predict_image(trained: TrainedModel, image: Image) -> np.ndarray:
    """Normalise a freshly read image as in training and predict its label map (*spatial)."""
    if image.array.shape[0] != trained.in_channels:
        hint = " (use a colour/grey image like the training data)" if trained.in_channels in (1, 3) else ""
        raise MedsegError(f"{image.path}: {image.array.shape[0]} channels, the model expects "
                          f"{trained.in_channels}{hint}")
    return predict_labels(trained, normalize_percentile(image.array))

