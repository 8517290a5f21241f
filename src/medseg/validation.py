"""Validation during training on a fixed set of validation samples (nnU-Net's pseudo-Dice), for runs whose full
validation would eat the budget if repeated every epoch.

A full validation predicts every validation case on its own grid with test-time mirroring, exactly as `medseg
evaluate` does (`medseg.scoring`): on small sets it costs seconds and runs every epoch. On CT-sized volumes one
pass took 336 s of a 20-minute budget, so there the epochs are scored on samples instead: drawn once from the
validation cases brought to the network's grid, as training draws its samples (class-aware, unaugmented), and
predicted in one pass per epoch with TP/FP/FN pooled per class over all of them. The checkpoint is chosen on that
figure; the full validation then runs once, at the end, on the chosen checkpoint, and gives the run's validation
Dice and its post-processing (`medseg.train.choose_postprocessing`).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from medseg.cache import as_loaded
from medseg.data import to_network_grid
from medseg.metrics import metrics_from_counts, nanmean

SAMPLES = 192  # validation samples scored every epoch, spread over the validation cases
SEED = 1234  # the samples are the same in every run of the same data and settings


class SampledValidation:
    """The fixed validation samples of a run and their scoring: `score(loop)` -> the row a validation adds."""

    def __init__(self, val_cases: list, cfg):
        from medseg.samplers import PatchSampler, SliceSampler

        plain = replace(cfg, augment=False)
        generator = torch.Generator().manual_seed(SEED)
        per_case = max(1, SAMPLES // len(val_cases))
        images, labels = [], []
        for case in val_cases:  # one case on the network's grid at a time, dropped once sampled
            grid = to_network_grid(as_loaded(case), cfg)
            sampler = (PatchSampler if cfg.dims == 3 else SliceSampler)([grid], plain, generator)
            sampler.counting = False
            drawn = torch.randint(0, len(sampler), (per_case,), generator=generator).tolist()
            image, label = sampler.batch(drawn)
            images.append(image)
            labels.append(label)
        self.images, self.labels = torch.cat(images), torch.cat(labels)

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def score(self, loop, trained) -> dict:
        """Loss, pseudo-Dice (TP/FP/FN pooled per class over every sample), IoU and accuracy of the samples, as
        `trained` (the run's network, or a copy of it) predicts them."""
        model = trained.model
        model.eval()
        counts, correct, losses = None, 0, []
        for start in range(0, len(self), loop.cfg.batch_size):
            image = self.images[start:start + loop.cfg.batch_size].to(trained.device)
            label = self.labels[start:start + loop.cfg.batch_size].to(trained.device)
            logits = model(image)
            logits = logits[0] if isinstance(logits, list) else logits
            losses.append(float(loop.loss_fn(logits, label)) * len(image))
            batch_counts, batch_correct = loop.batch_counts(logits, label)
            counts = batch_counts if counts is None else counts + batch_counts
            correct += batch_correct
        pooled = [metrics_from_counts(*row) for row in counts]
        return {"val_loss": float(np.sum(losses) / len(self)), "val_dice": nanmean([m["dice"] for m in pooled]),
                "val_iou": nanmean([m["iou"] for m in pooled]), "val_accuracy": correct / self.labels.numel()}
