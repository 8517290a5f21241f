"""Training batches cut from loaded cases: augmented 2D slices or 3D patches, as tensors.

`SliceSampler` serves slices of 2D images or volumes (resized, or padded/cropped to the sample size);
`PatchSampler` serves 3D patches. Both read cases held in memory (`LoadedCase`) or cached on disk
(`medseg.cache.DiskCase`) through the same calls, so each batch holds only its slices or patch regions, whole
volumes are never copied into slices, and the batches are the same from memory and from disk for the same seed.

Class-aware sampling (as nnU-Net oversamples foreground, but drawing the class first): in every batch the last
`round(batch * foreground_fraction)` samples are centred on a voxel of a class drawn uniformly among the classes
present in the case, so a 5-voxel lesion inside a large organ is a sample centre as often as the organ is; the
other samples are random. `seen` counts the samples holding each class, for the first epoch's log line.
"""
from __future__ import annotations

import numpy as np
import torch

from medseg import arrays
from medseg.augment import augment, pad_or_crop, resize_label
from medseg.config import TrainConfig


def stack_and_augment(pairs: list, cfg: TrainConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (1, C, ...), label (1, ...)) samples -> one augmented batch."""
    image, label = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    if not cfg.augment:
        return image, label
    return augment(image, label, generator, affine_p=cfg.affine_p, max_rotation_deg=cfg.max_rotation,
                   max_scale=cfg.max_scale, rotate90=cfg.rotate90, flip_axes=cfg.flip_axes, elastic_p=cfg.elastic_p)


class _Sampler:
    """What both samplers share: the cases, the class-aware draw and the count of samples holding each class."""

    def __init__(self, cases: list, cfg: TrainConfig, generator: torch.Generator):
        self.cases, self.cfg, self.generator = cases, cfg, generator
        self.centred = 0  # samples centred on a class voxel (kept by checkpoints for resuming)
        self.seen: dict[int, int] = {}  # class -> samples holding it, counted while `counting`
        self.samples_counted, self.counting = 0, True

    def centred_count(self, batch: int) -> int:
        """How many samples of a batch are centred on a class: those past round(batch x (1 - foreground_fraction)),
        as nnU-Net counts them (batch 2 at 0.33: the second; batch 16: the last 5)."""
        return batch - int(round(batch * (1 - self.cfg.foreground_fraction)))

    def class_point(self, index: int) -> np.ndarray | None:
        """A voxel (ndim,) of a class drawn uniformly among the foreground classes of case `index`, or None for a
        case without foreground."""
        points = self.cases[index].class_points()
        if not points:
            return None
        classes = sorted(points)
        chosen = points[classes[self._draw(len(classes))]]
        self.centred += 1
        return chosen[self._draw(len(chosen))]

    def _draw(self, n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=self.generator))

    def count(self, labels: torch.Tensor) -> None:
        """Count the classes each sample of a batch (B, ...) holds."""
        if not self.counting:
            return
        for label in labels:
            for k in torch.unique(label).tolist():
                self.seen[k] = self.seen.get(k, 0) + 1
        self.samples_counted += len(labels)

    def shares(self) -> dict[int, float]:
        """class -> share of the counted samples holding it."""
        return {k: n / max(self.samples_counted, 1) for k, n in sorted(self.seen.items())}

    def shares_line(self, class_names: list[str]) -> str:
        """The counted shares in words, e.g. 'organ 97%, lesion 36% of 1,200 samples held each class (5 of every 16
        centred on a class drawn uniformly among those in the case)'; with many classes, the rarest and the median."""
        shares = {k: v for k, v in self.shares().items() if k > 0}
        names = dict(enumerate(class_names))
        missing = [names.get(k, f"class {k}") for k in range(1, len(class_names)) if k not in shares]
        if len(class_names) <= 9:
            held = ", ".join(f"{names.get(k, f'class {k}')} {v:.0%}" for k, v in shares.items())
        else:
            rarest = min(shares, key=shares.get) if shares else None
            held = (f"{len(shares)} classes, the rarest ({names.get(rarest, rarest)}) in {shares[rarest]:.0%}, the "
                    f"median class in {float(np.median(list(shares.values()))):.0%}") if shares else "no class"
        bs = self.cfg.batch_size
        line = (f"samples holding each class: {held} of {self.samples_counted:,} samples ({self.centred_count(bs)} "
                f"of every {bs} centred on a class drawn uniformly among those in the case)")
        return line + (f"; never seen: {', '.join(missing[:5])}" if missing else "")


class SliceSampler(_Sampler):
    """Training slices of the cases, served as augmented batches of fixed size (B, C, *patch_size).

    fit="resize": slices are resized to the sample size per batch; fit="pad": slices keep their resolution and
    each sample pads or crops them to the sample size (around a class voxel, or at random). With --context, a slice
    brings its neighbours on both sides as extra channels (2.5D), cut from the volume when drawn.
    """

    def __init__(self, cases: list, cfg: TrainConfig, generator: torch.Generator):
        super().__init__(cases, cfg, generator)
        self.index = [(k, i) for k, case in enumerate(cases) for i in range(_slice_count(case, cfg.axis))]

    def __len__(self) -> int:
        return len(self.index)

    def _slice(self, k: int, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Slice `position` of case k as (C, H, W) and (H, W): with its --context neighbours from a volume."""
        case, cfg = self.cases[k], self.cfg
        if len(case.spatial_shape) == 2:
            return case.read()
        axis = cfg.axis % 3
        around = np.arange(position - cfg.context, position + cfg.context + 1)
        image, label = case.take(axis, np.clip(around, 0, case.spatial_shape[axis] - 1))
        moved = np.moveaxis(image, 1 + axis, 1)  # (C, neighbours, H, W), as `medseg.transforms.to_slices` stacks
        return moved.reshape(-1, *moved.shape[2:]), np.moveaxis(label, axis, 0)[cfg.context]

    def sample(self, i: int, centred: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Slice i (of `index`) fitted to the sample size, (1, C, *size) and (1, *size); `centred`: instead a slice
        of the same case through a voxel of a class it holds, cropped around that voxel."""
        k, position = self.index[i]
        point = self.class_point(k) if centred else None
        centre = None
        if point is not None and len(point) == 3:
            axis = self.cfg.axis % 3
            position, centre = int(point[axis]), tuple(int(v) for a, v in enumerate(point) if a != axis)
        elif point is not None:
            centre = tuple(int(v) for v in point)
        image, label = self._slice(k, position)
        image = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None]
        label = torch.from_numpy(label.astype(np.int64))[None]
        size = self.cfg.patch_size
        if self.cfg.fit == "resize":
            return arrays.resize(image, size), resize_label(label, size)
        return pad_or_crop(image, label, size, None if centre else self.generator, centre)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        first_centred = len(indices) - self.centred_count(len(indices))
        image, label = stack_and_augment([self.sample(i, n >= first_centred) for n, i in enumerate(indices)],
                                         self.cfg, self.generator)
        self.count(label)
        return image, label

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


def _slice_count(case, axis: int) -> int:
    return 1 if len(case.spatial_shape) == 2 else case.spatial_shape[axis % 3]


class PatchSampler(_Sampler):
    """3D training patches (B, C, *patch) from whole volumes; each patch reads only its region of the volume."""

    def __len__(self) -> int:
        return len(self.cases)

    def patch(self, index: int, centred: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        case = self.cases[index]
        point = self.class_point(index) if centred else None
        centre = None if point is None else tuple(int(v) for v in point)
        window, pads = patch_window(case.spatial_shape, self.cfg.patch_size, None if centre else self.generator,
                                    centre)
        image, label = case.read(window)
        image = np.pad(image, [(0, 0)] + pads).astype(np.float32, copy=False)
        label = np.pad(label, pads).astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(image))[None], torch.from_numpy(label)[None]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        first_centred = len(indices) - self.centred_count(len(indices))
        image, label = stack_and_augment([self.patch(i, n >= first_centred) for n, i in enumerate(indices)],
                                         self.cfg, self.generator)
        self.count(label)
        return image, label

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
