"""Training batches cut from loaded cases: augmented 2D slices or 3D patches, as tensors.

`SliceSampler` serves slices of 2D images or volumes (resized once, or padded/cropped per batch);
`PatchSampler` serves 3D patches, a share of them centred on foreground.
"""
from __future__ import annotations

import numpy as np
import torch

from medseg import arrays
from medseg.augment import augment, pad_or_crop, resize_label
from medseg.config import TrainConfig
from medseg.data import LoadedCase
from medseg.transforms import to_slices


def stack_and_augment(pairs: list, cfg: TrainConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (1, C, ...), label (1, ...)) samples -> one augmented batch."""
    image, label = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    if not cfg.augment:
        return image, label
    return augment(image, label, generator, rotate90=cfg.rotate90, flip_axes=cfg.flip_axes)


class SliceSampler:
    """Training slices of the loaded cases, served as augmented batches of fixed size (B, C, size, size).

    fit="resize": slices are resized once, here; fit="pad": slices keep their resolution and each batch
    pads or randomly crops them to size.
    """

    def __init__(self, cases: list[LoadedCase], cfg: TrainConfig, generator: torch.Generator):
        self.cfg, self.generator = cfg, generator
        images, labels = [], []
        for case in cases:
            images += to_slices(case.image.array, cfg.axis, cfg.context)
            labels += [s[0] for s in to_slices(case.label[None], cfg.axis)]
        size = (cfg.size, cfg.size)
        if cfg.fit == "resize":
            self.images = [arrays.resize(torch.from_numpy(i)[None], size)[0] for i in images]
            self.labels = [resize_label(torch.from_numpy(l.astype(np.int64))[None], size)[0] for l in labels]
        else:
            self.images = [torch.from_numpy(i) for i in images]
            self.labels = [torch.from_numpy(l.astype(np.int64)) for l in labels]

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        size = (self.cfg.size, self.cfg.size)
        pairs = [pad_or_crop(self.images[i][None], self.labels[i][None], size, self.generator) for i in indices]
        return stack_and_augment(pairs, self.cfg, self.generator)

    def epoch_batches(self, steps: int):
        """`steps` batches of the configured size drawn without replacement, reshuffling whenever the slices run
        out; with fewer slices than a batch (a few-image fine-tune), a batch repeats slices, each with its own
        random crop and augmentation, so every run takes the same batch size."""
        order: list[int] = []
        bs = self.cfg.batch_size
        for _ in range(steps):
            while len(order) < bs:
                order += torch.randperm(len(self), generator=self.generator).tolist()
            yield self.batch(order[:bs])
            del order[:bs]


class PatchSampler:
    """3D training patches (B, C, *patch) from whole volumes, a share of them centred on foreground.

    Without oversampling, small structures (a hippocampus in a head, a tumour in a liver) would rarely be seen;
    nnU-Net centres a third of its patches on a foreground voxel, and so does this sampler by default.
    """

    MAX_FOREGROUND_POINTS = 20_000  # per case: enough to pick centres from, small enough for BraTS-sized cases

    def __init__(self, cases: list[LoadedCase], cfg: TrainConfig, generator: torch.Generator):
        self.cfg, self.generator = cfg, generator
        self.images = [torch.from_numpy(np.ascontiguousarray(c.image.array)) for c in cases]
        self.labels = [torch.from_numpy(c.label.astype(np.int64)) for c in cases]
        rng = np.random.default_rng(cfg.seed)
        self.foreground = []
        for case in cases:
            points = np.argwhere(case.label > 0)
            if len(points) > self.MAX_FOREGROUND_POINTS:
                points = points[rng.choice(len(points), self.MAX_FOREGROUND_POINTS, replace=False)]
            self.foreground.append(points)
        self.centred = 0  # how many patches were centred on foreground (reported by tests and logs)

    def __len__(self) -> int:
        return len(self.images)

    def patch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        points = self.foreground[index]
        centre = None
        if len(points) and float(torch.rand(1, generator=self.generator)) < self.cfg.foreground_fraction:
            centre = tuple(points[int(torch.randint(0, len(points), (1,), generator=self.generator))])
            self.centred += 1
        image, label = pad_or_crop(self.images[index][None], self.labels[index][None], self.cfg.patch_size,
                                   None if centre else self.generator, centre)
        return image, label

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        return stack_and_augment([self.patch(i) for i in indices], self.cfg, self.generator)

    def epoch_batches(self, steps: int):
        """`steps` batches of cases drawn uniformly at random, one patch per case."""
        for _ in range(steps):
            yield self.batch(torch.randint(0, len(self), (self.cfg.batch_size,), generator=self.generator).tolist())
