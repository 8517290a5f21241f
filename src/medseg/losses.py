"""Segmentation losses on logits (B, K, H, W) and class-index targets (B, H, W); K includes background.

"focal" is focal loss + soft Dice and "tversky" is cross-entropy + Tversky: both for rare structures.
"bce" is the seed's binary cross-entropy: for two classes, softmax over (background, foreground) logits equals
a sigmoid on their difference, so BCE on the foreground probability is exactly 2-class cross-entropy.
With a border weight, every cross-entropy term weighs each pixel by the U-Net paper's map (`border_weights`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medseg.distributed import global_sum
from medseg.errors import MedsegError


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5,
                   background: bool = False) -> torch.Tensor:
    """1 - mean soft Dice over foreground classes (every class with `background`), summed over the whole batch
    ("batch Dice", as nnU-Net)."""
    probs = logits.softmax(1)
    one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0,) + tuple(range(2, logits.ndim))
    first = 0 if background else 1
    intersection = global_sum((probs * one_hot).sum(dims)[first:])  # over every rank's share of the batch
    total = global_sum((probs + one_hot).sum(dims)[first:])
    return 1 - ((2 * intersection + eps) / (total + eps)).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Cross-entropy scaled by (1 - p_true)**gamma (Lin et al. 2017): easy background pixels count for little,
    so a rare structure is not drowned by the majority class."""
    log_p = F.log_softmax(logits, 1).gather(1, target[:, None])[:, 0]
    return (-(1 - log_p.exp()) ** gamma * log_p).mean()


def tversky_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.3, beta: float = 0.7,
                 eps: float = 1e-5) -> torch.Tensor:
    """1 - mean Tversky index over foreground classes (Salehi et al. 2017). beta > alpha weighs misses (FN) more
    than false alarms (FP), which favours recall on small structures; alpha = beta = 0.5 is soft Dice."""
    probs = logits.softmax(1)
    one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0,) + tuple(range(2, logits.ndim))
    tp = global_sum((probs * one_hot).sum(dims)[1:])
    fp = global_sum((probs * (1 - one_hot)).sum(dims)[1:])
    fn = global_sum(((1 - probs) * one_hot).sum(dims)[1:])
    return 1 - ((tp + eps) / (tp + alpha * fp + beta * fn + eps)).mean()


def deep_supervision_loss(loss_fn, outputs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Weighted sum over resolutions (weights 1, 1/2, 1/4, ..., normalised to 1), each output against the target
    at its scale.

    Output i (i >= 1) covers the network's padded input at 1/2**i: a side not divisible by 2**depth was padded
    (edge values, centred; see `pad_to_multiple`) before the encoder. The target is padded the same way to
    2**i times the output's size, then each 2**i block is represented by its centre pixel, so every auxiliary
    target lines up with what its output saw, at any input size.
    """
    weights = torch.tensor([0.5**i for i in range(len(outputs))])
    weights = weights / weights.sum()
    total = loss_fn(outputs[0], target) * weights[0]
    for i, (weight, output) in enumerate(zip(weights[1:], outputs[1:]), start=1):
        total = total + weight * loss_fn(output, scaled_target(target, output.shape[2:], 2**i))
    return total


def scaled_target(target: torch.Tensor, size: tuple[int, ...], factor: int) -> torch.Tensor:
    """Class-index target (B, *spatial) for an output of `size` at 1/`factor` of the padded input."""
    padded = target[:, None].float()
    extras = [n * factor - s for n, s in zip(size, target.shape[1:])]
    if any(e < 0 for e in extras):
        raise ValueError(f"output {tuple(size)} x {factor} is smaller than the target {tuple(target.shape[1:])}")
    pads = []
    for extra in reversed(extras):
        pads += [extra // 2, extra - extra // 2]
    if any(extras):
        padded = F.pad(padded, pads, mode="replicate")
    centre = factor // 2
    index = (slice(None), 0, *(slice(centre, None, factor) for _ in size))
    return padded[index].long()


BORDER_SIGMA = 5.0  # pixels: the U-Net paper's sigma for its weight map


def border_weights(target: torch.Tensor, w0: float, sigma: float = BORDER_SIGMA) -> torch.Tensor:
    """The U-Net paper's weight map (Ronneberger et al. 2015) for each sample of a class-index target (B, *spatial):
    1 + w0 * exp(-(d1 + d2)**2 / (2 sigma**2)), d1 and d2 a pixel's distances to the nearest and second-nearest
    object (a connected component of labels > 0; 0 inside one). Pixels where two objects come close weigh most:
    the thin label-0 gap between them and the objects' pixels on either side alike, so the map draws the loss to
    where objects touch without favouring one class there."""
    from scipy import ndimage

    labels = target.cpu().numpy()
    weights = np.ones(labels.shape, np.float32)
    reach = int(4 * sigma)  # objects further apart add under w0 * exp(-8) to a pixel's weight
    for sample, weight in zip(labels, weights):
        objects, _ = ndimage.label(sample > 0)
        nearest = np.full(sample.shape, np.inf, np.float32)
        second = nearest.copy()
        for number, box in enumerate(ndimage.find_objects(objects), start=1):
            # distances beyond the reach weigh nothing: each object's transform needs only its box widened by it
            box = tuple(slice(max(s.start - reach, 0), min(s.stop + reach, n)) for s, n in zip(box, sample.shape))
            distance = ndimage.distance_transform_edt(objects[box] != number).astype(np.float32)
            second[box] = np.minimum(second[box], np.maximum(nearest[box], distance))
            nearest[box] = np.minimum(nearest[box], distance)
        weight += w0 * np.exp(-(nearest + second) ** 2 / (2 * sigma**2))
    return torch.from_numpy(weights).to(target.device)


def cross_entropy(border_weight: float = 0.0):
    """Cross-entropy, each pixel weighed by `border_weights` where `border_weight` > 0 (a weighted mean)."""
    if not border_weight:
        return F.cross_entropy

    def weighted(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = border_weights(target, border_weight)
        return (F.cross_entropy(logits, target, reduction="none") * weight).sum() / weight.sum()
    return weighted


def make_loss(name: str, num_classes: int, regions: dict | None = None, border_weight: float = 0.0):
    if regions:
        return lambda logits, target: region_loss(logits, target, regions)
    if name == "bce" and num_classes != 2:
        raise MedsegError(f"--loss bce is for one foreground class; this dataset has {num_classes - 1}: use ce")
    ce = cross_entropy(border_weight)
    if name in ("ce", "bce"):
        return ce
    if name == "dice":
        return soft_dice_loss
    if name == "dice_ce":
        return lambda logits, target: ce(logits, target) + soft_dice_loss(logits, target)
    if name == "dice_ce_all":
        return lambda logits, target: ce(logits, target) + soft_dice_loss(logits, target, background=True)
    if name == "focal":
        return lambda logits, target: focal_loss(logits, target) + soft_dice_loss(logits, target)
    if name == "tversky":
        return lambda logits, target: ce(logits, target) + tversky_loss(logits, target)
    raise MedsegError(f"unknown loss {name!r}")


def region_targets(label: torch.Tensor, regions: dict[str, list[int]]) -> torch.Tensor:
    """Class-index labels (B, *spatial) -> region masks (B, R, *spatial) float."""
    return torch.stack([torch.isin(label, torch.tensor(v, device=label.device)) for v in regions.values()],
                       1).float()


def region_loss(logits: torch.Tensor, label: torch.Tensor, regions: dict[str, list[int]],
                eps: float = 1e-5) -> torch.Tensor:
    """BCE on each region's sigmoid plus 1 - mean soft Dice over regions (batch Dice), for logits (B, R, ...)."""
    target = region_targets(label, regions)
    probs = logits.sigmoid()
    dims = (0,) + tuple(range(2, logits.ndim))
    dice = (2 * global_sum((probs * target).sum(dims)) + eps) / (global_sum((probs + target).sum(dims)) + eps)
    return F.binary_cross_entropy_with_logits(logits, target) + 1 - dice.mean()
