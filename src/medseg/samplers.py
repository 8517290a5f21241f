"""Training batches cut from loaded cases: augmented 2D slices or 3D patches, as tensors.

`SliceSampler` serves slices of 2D images or volumes (resized once, or padded/cropped per batch);
`PatchSampler` serves 3D patches, a share of them centred on foreground. Both take cases held in memory
(`LoadedCase`) or cached on disk (`medseg.cache.DiskCase`); from disk, each batch reads only its slices or patch
regions, and the batches are the same as from memory for the same seed.
"""
from __future__ import annotations

import numpy as np
import torch

from medseg import arrays
from medseg.augment import augment, pad_or_crop, resize_label
from medseg.cache import DiskCase
from medseg.config import TrainConfig
from medseg.data import LoadedCase, foreground_points
from medseg.transforms import to_slices


def stack_and_augment(pairs: list, cfg: TrainConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (1, C, ...), label (1, ...)) samples -> one augmented batch."""
    image, label = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    if not cfg.augment:
        return image, label
    return augment(image, label, generator, affine_p=cfg.affine_p, max_rotation_deg=cfg.max_rotation,
                   max_scale=cfg.max_scale, rotate90=cfg.rotate90, flip_axes=cfg.flip_axes, elastic_p=cfg.elastic_p)


class SliceSampler:
    """Training slices of the cases, served as augmented batches of fixed size (B, C, size, size).

    fit="resize": slices are resized to size (once, here, for cases in memory; per batch from disk); fit="pad":
    slices keep their resolution and each batch pads or randomly crops them to size.
    """

    def __init__(self, cases: list, cfg: TrainConfig, generator: torch.Generator):
        self.cfg, self.generator = cfg, generator
        self.disk = [case for case in cases if isinstance(case, DiskCase)]
        if self.disk:  # (case, slice) pairs, read when drawn
            self.index = [(k, i) for k, case in enumerate(self.disk) for i in range(_slice_count(case, cfg.axis))]
            return
        images, labels = [], []
        for case in cases:
            images += to_slices(case.image.array, cfg.axis, cfg.context)
            labels += [s[0] for s in to_slices(case.label[None], cfg.axis)]
        self.images = [self._fitted(torch.from_numpy(i)[None])[0] for i in images]
        self.labels = [self._fitted_label(torch.from_numpy(l.astype(np.int64))[None])[0] for l in labels]

    def _fitted(self, image: torch.Tensor) -> torch.Tensor:
        return arrays.resize(image, self.cfg.patch_size) if self.cfg.fit == "resize" else image

    def _fitted_label(self, label: torch.Tensor) -> torch.Tensor:
        return resize_label(label, self.cfg.patch_size) if self.cfg.fit == "resize" else label

    def __len__(self) -> int:
        return len(self.index) if self.disk else len(self.images)

    def _slice(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slice i as (1, C, H, W) and (1, H, W), fitted: from memory, or read from the cache."""
        if not self.disk:
            return self.images[i][None], self.labels[i][None]
        k, position = self.index[i]
        case, cfg = self.disk[k], self.cfg
        if len(case.spatial_shape) == 2:
            image, label = case.read()
        else:  # the slice and its --context neighbours, as `to_slices` stacks them
            axis = cfg.axis % 3
            around = np.arange(position - cfg.context, position + cfg.context + 1)
            image, label = case.take(axis, np.clip(around, 0, case.spatial_shape[axis] - 1))
            moved = np.moveaxis(image, 1 + axis, 1)  # (C, neighbours, H, W)
            image, label = moved.reshape(-1, *moved.shape[2:]), np.moveaxis(label, axis, 0)[cfg.context]
        return (self._fitted(torch.from_numpy(np.ascontiguousarray(image))[None]),
                self._fitted_label(torch.from_numpy(label.astype(np.int64))[None]))

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [pad_or_crop(*self._slice(i), self.cfg.patch_size, self.generator) for i in indices]
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


def _slice_count(case: DiskCase, axis: int) -> int:
    return 1 if len(case.spatial_shape) == 2 else case.spatial_shape[axis % 3]


class PatchSampler:
    """3D training patches (B, C, *patch) from whole volumes, a share of them centred on foreground.

    Without oversampling, small structures (a hippocampus in a head, a tumour in a liver) would rarely be seen;
    nnU-Net centres a third of its patches on a foreground voxel, and so does this sampler by default. Each patch
    reads only its region of the volume (from memory, or from the disk cache).
    """

    def __init__(self, cases: list, cfg: TrainConfig, generator: torch.Generator):
        self.cfg, self.generator, self.cases = cfg, generator, cases
        # in memory: each case's foreground points; on disk they stay in the cache, read per patch
        self.foreground = [None if isinstance(c, DiskCase) else foreground_points(c.label) for c in cases]
        self.centred = 0  # how many patches were centred on foreground (reported by tests and logs)

    def __len__(self) -> int:
        return len(self.cases)

    def patch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        case = self.cases[index]
        points = case.foreground() if isinstance(case, DiskCase) else self.foreground[index]
        centre = None
        if len(points) and float(torch.rand(1, generator=self.generator)) < self.cfg.foreground_fraction:
            centre = tuple(int(v) for v in points[int(torch.randint(0, len(points), (1,), generator=self.generator))])
            self.centred += 1
        shape = case.spatial_shape if isinstance(case, DiskCase) else case.label.shape
        window, pads = patch_window(shape, self.cfg.patch_size, None if centre else self.generator, centre)
        if isinstance(case, DiskCase):
            image, label = case.read(window)
        else:
            image, label = case.image.array[(slice(None), *window)], case.label[window]
        image = np.pad(image, [(0, 0)] + pads).astype(np.float32, copy=False)
        label = np.pad(label, pads).astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(image))[None], torch.from_numpy(label)[None]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        return stack_and_augment([self.patch(i) for i in indices], self.cfg, self.generator)

    def epoch_batches(self, steps: int):
        """`steps` batches of cases drawn uniformly at random, one patch per case."""
        for _ in range(steps):
            yield self.batch(torch.randint(0, len(self), (self.cfg.batch_size,), generator=self.generator).tolist())


def patch_window(shape: tuple[int, ...], size: tuple[int, ...], generator: torch.Generator | None = None,
                 centre: tuple[int, ...] | None = None) -> tuple[tuple[slice, ...], list[tuple[int, int]]]:
    """The region of a volume a patch of `size` covers, and the zero padding around it where the volume is
    smaller: centred by default, random with a generator, or around `centre` (a voxel), kept inside the volume
    padded to at least `size` (as `medseg.augment.pad_or_crop` places its window, drawing the same numbers)."""
    window, pads = [], []
    for axis, (n, s) in enumerate(zip(shape, size)):
        extra = max(0, s - n)
        if centre is not None:
            start = min(max(centre[axis] + extra // 2 - s // 2, 0), n + extra - s)
        elif generator is not None:
            start = int(torch.randint(0, n + extra - s + 1, (1,), generator=generator))
        else:
            start = (n + extra - s) // 2
        low = start - extra // 2  # in the unpadded volume
        first, last = max(low, 0), min(low + s, n)
        window.append(slice(first, last))
        pads.append((first - low, low + s - last))
    return tuple(window), pads
