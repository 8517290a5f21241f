"""The training configuration: every choice a run makes, saved as `config.json` in the run folder.

Defaults are the seed's recipe: 128x128 slices, U-Net 64-128-256-512 / 1024, Adam 1e-4, batch 16, 20 epochs,
20% validation, early stopping, augmentation, Dice + cross-entropy.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from medseg.errors import MedsegError
from medseg.transforms import NORMALIZATIONS

LOSSES = ("dice_ce", "dice_ce_all", "ce", "bce", "dice", "focal", "tversky")
CE_LOSSES = ("dice_ce", "dice_ce_all", "ce", "bce", "tversky")  # those with a cross-entropy term: --border-weight
FITS = ("resize", "pad")
SCHEDULES = ("constant", "poly")
OPTIMIZERS = ("adam", "sgd")
CACHES = ("auto", "memory", "disk")  # see medseg.cache
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # see medseg.precision
COMPILE_CHOICES = ("auto", "on", "off")  # see medseg.compiling
NPY_LAYOUTS = ("auto", "volume", "hwc", "chw")
# The settings that say how a labelled dataset is read (every command that reads one takes them)
READING_FIELDS = ("images", "masks", "binary_masks", "mask_threshold", "mask_levels", "npy_layout",
                  "allow_unmatched")


def _model_names() -> list[str]:
    from medseg.models import MODELS

    return list(MODELS)


_AXIS_PAIR = {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}


@dataclass
class TrainConfig:
    data: str = ""
    out: str = "runs/run"
    # where the cases are and how to read them
    images: str | None = None
    masks: str | None = None
    binary_masks: bool = False
    mask_threshold: float | None = None  # foreground where the mask value is at least this (grey-level masks)
    # classes coded as equally spaced grey levels ([0, 85, 170, 255]: classes 0-3), found in the masks by the plan
    # or the run (medseg.datasets.grey_levels); []: looked for, none; None: not looked for yet
    mask_levels: list[int] | None = None
    npy_layout: str = "auto"  # how a 3D .npy is read: auto/volume (X, Y, Z), hwc or chw (a 2D image with channels)
    allow_unmatched: bool = False  # use the matched cases even when many files have no partner (always listed)
    color: str = "keep"  # keep RGB channels, or "gray"
    class_names: list[str] | None = None
    regions: dict[str, list[int]] | None = None  # region-based training (e.g. BraTS): name -> labels, sigmoid each
    # preprocessing: the seed's 2D recipe
    dims: int = 2  # 2: slices of volumes (or 2D images); 3: whole volumes, trained on patches
    axis: int = -1  # volumes are cut into 2D slices along this spatial axis
    context: int = 0  # 2D on volumes: neighbouring slices on each side given as extra channels (2.5D)
    size: int = 128
    fit: str = "resize"  # "resize" every slice to size x size, or "pad": pad/crop to size, predict at full size
    normalization: str = "percentile"  # or zscore, ct, unit: see medseg.transforms.normalize
    intensity_stats: list[dict] | None = None  # per-channel foreground statistics, for "ct"
    target_spacing: list[float] | None = None  # volumes are resampled to this spacing (mm) for training
    # voxel order the network works in (axis codes, e.g. 'RAS'; set from the first training volume): other
    # volumes are reoriented to it for the network and back, as a structure's side can carry its label
    orientation: str | None = None
    patch: list[int] | None = None  # training sample: 3D patch (voxels, default size^3) or 2D sides (size x size)
    # share of each batch's samples (2D slices and 3D patches) centred on a voxel of a class drawn uniformly among
    # the classes in the case (nnU-Net's oversampling, drawing the class first); the rest are random
    foreground_fraction: float = 0.33
    overlap: float = 0.5  # 3D: sliding-window overlap at inference
    mirror_tta: bool = False  # average predictions over mirrored inputs
    # network
    model: str = "unet"
    base_channels: int = 64
    depth: int = 4
    dropout: float = 0.0
    norm: str = "batch"  # or "instance" (nnU-Net)
    activation: str = "relu"  # or "leaky_relu" (nnU-Net)
    deep_supervision: bool = False  # losses on the coarser decoder levels too (nnU-Net)
    # optimisation
    loss: str = "dice_ce"
    # w0 of the U-Net paper's weight map on the cross-entropy (pixels where objects come close weigh up to
    # 1 + w0; medseg.losses.border_weights); 0: every pixel alike
    border_weight: float = 0.0
    optimizer: str = "adam"  # or "sgd": Nesterov momentum 0.99, as nnU-Net
    lr: float = 1e-4
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    batch_size: int = 16
    epochs: int = 20
    steps_per_epoch: int | None = None  # None: one pass over the training slices, at least 50 batches
    # total optimiser steps; the schedule runs on them, so a seeded run repeats. None: epochs x steps per epoch,
    # or, with --time-budget, what a calibration at the start finds fits the budget (then written here)
    steps: int | None = None
    calibration: dict | None = None  # how --time-budget became `steps` (seconds per step and per validation)
    planning_seconds: float | None = None  # the plan's time before training (`medseg train DATA`): in the budget
    # where a time-budgeted run stopped because the clock ran out before `steps` (the schedule still spans `steps`):
    # written to config.json, so that a re-run stops at the same step and repeats the same weights
    stop_at: int | None = None
    patience: int = 10  # early stopping on validation Dice; 0 switches it off
    augment: bool = True
    rotate90: bool = False  # also rotate training samples by multiples of 90 degrees (EM, microscopy)
    flip_axes: list[int] | None = None  # axes of a training sample to mirror at random (None: all; []: none)
    # 2D: share of samples given a random rotation (up to max_rotation degrees either way) and scaling (1 +- max_scale)
    affine_p: float = 0.3
    max_rotation: float = 15.0
    max_scale: float = 0.15
    elastic_p: float = 0.0  # 2D: share of samples bent by a smooth random elastic deformation (medseg.augment)
    # transfer learning
    init_from: str | None = None  # a run folder or checkpoint: its tensors that match by name and shape start training
    freeze_encoder_epochs: int = 0  # hold the encoder still for this many first epochs
    # split
    val_fraction: float = 0.2  # of the cases left after the test cases
    test_fraction: float = 0.2  # held out for `medseg evaluate`, used for no choice; 0 with a test set of your own
    train_fraction: float = 1.0  # train on this share of the training cases (validation unchanged)
    folds: int = 0
    fold: int = 0
    seed: int = 0
    # seeds the initial weights and the order and augmentation of training samples, leaving the split to `seed`
    # (None: `seed`); ensemble members that differ only in it share their validation and test cases
    init_seed: int | None = None
    # resources
    time_budget: float | None = None  # minutes for the whole training, validation included
    device: str = "auto"
    threads: int | None = None
    cache: str = "auto"  # memory, disk (preprocessed once, read per batch), auto: disk for data over 1/10 of RAM
    compile: str = "auto"  # torch.compile the training step: auto (budgeted CPU runs), on, off; see medseg.compiling
    precision: str = "auto"  # bf16/fp16 autocast on CUDA GPUs (auto picks), fp32 on CPUs: see medseg.precision
    progress: bool = True
    # optional experiment tracking (off by default; the packages are not needed otherwise)
    tensorboard: str | None = None  # write TensorBoard scalars under DIR/<run name>
    mlflow: str | None = None  # log settings, metrics per epoch and artifacts to this MLflow tracking URI

    def validate(self) -> "TrainConfig":
        checks = [
            (self.loss in LOSSES, f"--loss {self.loss}: choose from {', '.join(LOSSES)}"),
            (self.fit in FITS, f"--fit {self.fit}: choose from {', '.join(FITS)}"),
            (self.lr_schedule in SCHEDULES, f"--lr-schedule {self.lr_schedule}: choose from {', '.join(SCHEDULES)}"),
            (self.color in ("keep", "gray"), f"--color {self.color}: choose keep or gray"),
            (self.cache in CACHES, f"--cache {self.cache}: choose from {', '.join(CACHES)}"),
            (self.compile in COMPILE_CHOICES, f"--compile {self.compile}: choose from {', '.join(COMPILE_CHOICES)}"),
            (self.precision in PRECISIONS, f"--precision {self.precision}: choose from {', '.join(PRECISIONS)}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer {self.optimizer}: choose from {', '.join(OPTIMIZERS)}"),
            (self.model in _model_names(), f"--model {self.model}: choose from {', '.join(_model_names())}"),
            (self.norm in ("batch", "instance"), f"--norm {self.norm}: choose batch or instance"),
            (self.activation in ("relu", "leaky_relu"), f"--activation {self.activation}: choose relu or leaky_relu"),
            (self.dims in (2, 3), f"--dims {self.dims}: choose 2 (slices) or 3 (volumes)"),
            (self.orientation is None or sorted(_AXIS_PAIR.get(c, c) for c in self.orientation) == ["AP", "LR", "SI"],
             f"--orientation {self.orientation}: give one letter of L/R, A/P and S/I each, e.g. RAS"),
            (self.normalization in NORMALIZATIONS, f"--normalization {self.normalization}: choose from "
                                                    f"{', '.join(NORMALIZATIONS)}"),
            (self.normalization != "ct" or bool(self.intensity_stats),
             "ct normalisation needs dataset intensity statistics: make a plan with 'medseg plan DATA'"),
            (self.patch is None or len(self.patch) == self.dims,
             f"--patch {self.patch}: give {self.dims} sides for --dims {self.dims}"),
            ((self.dims == 2 and not self.patch) or all(p >= 2**self.depth for p in self.patch_size),
             f"--patch {self.patch_size}: every side must be at least 2**depth = {2**self.depth}"),
            # a quarter turn of a sample that is not square changes its shape, and a batch holds one shape
            (not (self.rotate90 and self.dims == 2 and len(set(self.patch_size)) > 1),
             f"--rotate90 needs a square 2D sample; --patch {self.patch} is not"),
            (0 <= self.overlap < 1 and 0 <= self.foreground_fraction <= 1,
             "--overlap must lie in [0, 1) and --foreground-fraction in [0, 1]"),
            (self.size >= 2**self.depth, f"--size {self.size} is smaller than 2**depth = {2**self.depth}"),
            (0 < self.val_fraction < 1, f"--val-fraction {self.val_fraction}: must lie between 0 and 1"),
            (0 <= self.test_fraction < 1, f"--test-fraction {self.test_fraction}: must lie in [0, 1)"),
            (self.npy_layout in NPY_LAYOUTS, f"--npy-layout {self.npy_layout}: choose from {', '.join(NPY_LAYOUTS)}"),
            (self.steps is None or self.steps >= 1, "--steps must be at least 1"),
            (self.batch_size >= 1 and self.epochs >= 1, "--batch-size and --epochs must be at least 1"),
            (self.axis in (-3, -2, -1, 0, 1, 2), f"--axis {self.axis}: a volume has axes 0, 1, 2"),
            (self.flip_axes is None or all(0 <= a < self.dims for a in self.flip_axes),
             f"--flip-axes {self.flip_axes}: axes of a training sample run from 0 to {self.dims - 1}"),
            (self.context == 0 or (self.context > 0 and self.dims == 2),
             f"--context {self.context}: neighbouring slices are for 2D training on volumes (--dims 2)"),
            (self.time_budget is None or self.time_budget > 0, "--time-budget must be positive (minutes)"),
            (0 <= self.elastic_p <= 1, "--elastic-p must lie in [0, 1]"),
            (self.border_weight >= 0, "--border-weight must be 0 or more"),
            (not self.border_weight or self.loss in CE_LOSSES,
             f"--border-weight weighs a cross-entropy term; --loss {self.loss} has none"),
            (0 <= self.affine_p <= 1 and 0 <= self.max_rotation <= 180 and 0 <= self.max_scale < 1,
             "--affine-p must lie in [0, 1], --max-rotation in [0, 180] degrees and --max-scale in [0, 1)"),
            (self.freeze_encoder_epochs >= 0, "--freeze-encoder-epochs must be 0 or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise MedsegError(message)
        if self.regions:
            from medseg.regions import check_regions

            if self.loss not in ("dice_ce", "dice_ce_all"):  # the plan's Dice + CE, whichever classes it counts
                raise MedsegError(f"--loss {self.loss}: region-based training uses BCE + soft Dice per region; "
                                  "leave --loss at dice_ce")
            if self.border_weight:
                raise MedsegError("--border-weight weighs a cross-entropy over classes; region-based training "
                                  "uses BCE per region: leave it at 0")
            self.regions = check_regions(self.regions)
        return self

    def override(self, settings: dict) -> "TrainConfig":
        """Set the user's explicit settings on top of a saved or planned configuration. A 2D sample's planned sides
        follow from its size, so a size of the user's (or quarter turns, which need a square, another fit or other
        dims) replaces them, unless the user gives the sides too."""
        planned_sides = self.dims == 2 and self.patch
        for key, value in settings.items():
            setattr(self, key, value)
        if planned_sides and {"size", "fit", "rotate90", "dims"} & settings.keys() and "patch" not in settings:
            self.patch = None
        return self

    @property
    def slices_per_input(self) -> int:
        """How many slices one network input stacks as channels: the slice and its neighbours (2.5D)."""
        return 2 * self.context + 1

    @property
    def patch_size(self) -> tuple[int, ...]:
        """The spatial size of a training sample: the patch where one is set, else size in every dimension."""
        return tuple(self.patch) if self.patch else (self.size,) * self.dims

    @property
    def sample_words(self) -> str:
        """The training sample's sides in words, e.g. '64x48' (for model cards and comparisons)."""
        return "x".join(map(str, self.patch_size))

    def save(self, path: str | Path) -> None:
        from medseg.io import write_text_atomic

        write_text_atomic(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.exists():
            raise MedsegError(f"{path}: configuration not found")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise MedsegError(f"{path}: not valid JSON ({exc})") from exc
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise MedsegError(f"{path}: unknown settings {sorted(unknown)}")
        return cls(**values)

    def model_args(self, in_channels: int, num_classes: int) -> dict:
        """Network arguments for images of `in_channels` channels (times the 2.5D stack of slices)."""
        return {"in_channels": in_channels * self.slices_per_input, "num_classes": num_classes,
                "base_channels": self.base_channels,
                "depth": self.depth, "dropout": self.dropout, "spatial_dims": self.dims, "norm": self.norm,
                "activation": self.activation, "deep_supervision": self.deep_supervision}
