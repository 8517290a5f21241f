"""Training throughput side by side (issue 14, item 1): the same network, data, crop and batch size through

  (a) a bare PyTorch loop on tensors already in memory (crops taken once, no augmentation): the ceiling;
  (b) medseg's training pipeline: its sampler (cropping, flips, affine in 2D, intensity jitter) and its step,
      eager and compiled (as `--compile auto` trains time-budgeted CPU runs; the other pipelines step eagerly,
      as their users' loops would unless they compile too);
  (c) the pipeline a MONAI user would write: CacheDataset of dictionary transforms (load, channel first,
      normalise, cached; then random crop, flips, affine in 2D, intensity scale/shift) and a DataLoader with
      persistent workers;
  (d) where nnU-Net v2's venv exists (.venv-nnunet, made by benchmarks/nnunet.py): nnU-Net's own data loader and
      default augmentation, on its preprocessed copy of the same cases, with the worker count nnU-Net allows on this
      machine, built by its default trainer (benchmarks/nnunet_loader.py, run in that venv, one process per timed
      window); only its patch and batch size are set to the shared ones.

2D: 64 synthetic 256x256 PNG phantoms (medseg synth), crops 128x128; 3D: the MSD hippocampus training volumes,
patches 32^3 (hippocampus volumes are ~35x50x35). Steps per second are medians of three timed windows per
pipeline, the pipelines interleaved so that each meets the same machine. nnU-Net's preprocessing (its planner on
the same cases, once per run, under runs/throughput_nnunet/) is not timed, as medseg's loading is not.

    python benchmarks/throughput.py [--steps 20]

Writes docs/benchmarks/throughput.json and the THROUGHPUT section of docs/benchmarks.md. Run it alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from docs_section import write_section
from medseg import compiling, precision
from medseg.config import TrainConfig
from medseg.data import load_cases
from medseg.datasets import find_cases
from medseg.losses import make_loss
from medseg.models import create_model
from medseg.samplers import PatchSampler, SliceSampler
from medseg.synth import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
HIPPOCAMPUS = ROOT.parent / "shared" / "datasets" / "msd_hippocampus" / "Task04_Hippocampus"


def setting(dims: int, data: Path) -> TrainConfig:
    if dims == 2:
        return TrainConfig(data=str(data), dims=2, size=128, fit="pad", base_channels=16, depth=4, batch_size=16,
                           norm="instance", normalization="zscore", progress=False)
    return TrainConfig(data=str(data), dims=3, patch=[32, 32, 32], base_channels=16, depth=3, batch_size=4,
                       norm="instance", normalization="zscore", progress=False)


def crop(cfg: TrainConfig) -> list[int]:
    """The spatial size of every pipeline's training samples."""
    return [cfg.size] * 2 if cfg.dims == 2 else list(cfg.patch_size)


class Trainer:
    """One optimiser step of the shared network on a batch (the part every pipeline has in common), on `device`
    in the precision medseg trains in there (bf16 autocast on a GPU that has it, fp32 on a CPU)."""

    def __init__(self, cfg: TrainConfig, channels: int, classes: int, device: torch.device, compile_step=False):
        torch.manual_seed(0)
        self.device, self.dtype = device, precision.autocast_dtype(device, "auto")
        self.model = create_model("unet", **cfg.model_args(channels, classes)).train().to(device)
        self.network = compiling.compiled(self.model) if compile_step else self.model  # compiles in the warm-up
        self.optimizer = torch.optim.Adam(self.model.parameters(), 1e-3)
        self.loss = make_loss("dice_ce", classes)

    def step(self, image: torch.Tensor, label: torch.Tensor) -> None:
        if self.device.type == "cuda":
            image, label = image.pin_memory(), label.pin_memory()
        image, label = image.to(self.device, non_blocking=True), label.to(self.device, non_blocking=True)
        with precision.autocast(self.device, self.dtype):
            loss = self.loss(self.network(image), label)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # a step counts once its kernels are done


def steps_per_second(batches, trainer: Trainer, steps: int, warmup: int = 2) -> float:
    """Steps per second over `steps` steps, after `warmup` steps."""
    for _ in range(warmup):
        trainer.step(*next(batches))
    started = time.perf_counter()
    for _ in range(steps):
        trainer.step(*next(batches))
    return steps / (time.perf_counter() - started)


def bare_batches(sampler, cfg: TrainConfig):
    """Batches of crops made once, in memory, without augmentation: only indexing and stacking per step."""
    pool_cfg = dataclasses.replace(cfg, augment=False)
    sampler.cfg = pool_cfg
    images, labels = zip(*(sampler.batch([i % len(sampler)] * 1) for i in range(64)))
    sampler.cfg = cfg
    images, labels = torch.cat(images), torch.cat(labels)
    generator = torch.Generator().manual_seed(0)
    while True:
        index = torch.randint(0, len(images), (cfg.batch_size,), generator=generator)
        yield images[index], labels[index]


def medseg_batches(sampler):
    while True:
        yield from sampler.epoch_batches(1000)


def monai_batches(cases, cfg: TrainConfig, workers: int):
    """What a MONAI user writes for the same crops and augmentation."""
    from monai import transforms as mt
    from monai.data import CacheDataset, DataLoader

    keys = ["image", "label"]
    spatial = crop(cfg)
    cached = [mt.LoadImaged(keys), mt.EnsureChannelFirstd(keys), mt.NormalizeIntensityd("image", channel_wise=True),
              mt.EnsureTyped(keys, dtype=[torch.float32, torch.long])]
    cropping = ([mt.SpatialPadd(keys, spatial), mt.RandSpatialCropd(keys, spatial, random_size=False)]
                if cfg.dims == 2 else
                [mt.SpatialPadd(keys, spatial), mt.RandCropByPosNegLabeld(keys, "label", spatial, pos=1, neg=2,
                                                                         num_samples=1)])
    augment = [mt.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(cfg.dims)]
    if cfg.dims == 2:
        augment.append(mt.RandAffined(keys, prob=0.3, rotate_range=0.26, scale_range=0.15, mode=["bilinear", "nearest"],
                                      padding_mode="reflection"))  # as medseg.augment
    augment += [mt.RandScaleIntensityd("image", 0.2, prob=0.5), mt.RandShiftIntensityd("image", 0.1, prob=0.5)]
    data = [{"image": str(c.images[0]), "label": str(c.mask)} for c in cases]
    dataset = CacheDataset(data, mt.Compose(cached + cropping + augment), progress=False, num_workers=1)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    while True:
        for batch in loader:
            yield batch["image"].as_tensor().float(), batch["label"].as_tensor()[:, 0].long()


class NnunetLoader:
    """Pipeline (d): nnU-Net's preprocessed copy of the cases, made once; each timed window one process in its venv."""

    def __init__(self, dims: int, data: Path, cases, channels: int, classes: int):
        import nnunet

        self.python = nnunet.VENV / "bin" / "python"
        self.dims, self.data, self.channels, self.classes = dims, data, channels, classes
        self.configuration = "2d" if dims == 2 else "3d_fullres"
        self.ident = 520 + dims
        self.name = f"Dataset{self.ident}_Throughput{dims}d"
        out = ROOT / "runs" / "throughput_nnunet" / f"{dims}d"
        self.env = {**os.environ, "nnUNet_raw": str(out / "raw"), "nnUNet_preprocessed": str(out / "preprocessed"),
                    "nnUNet_results": str(out / "results"),
                    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")])}
        labels = json.loads((data / "dataset.json").read_text())["labels"]
        dataset = {"name": self.name, "ending": ".png" if dims == 2 else ".nii.gz",
                   "channels": {str(i): f"channel{i}" for i in range(channels)},
                   "classes": [labels[str(i)] for i in range(len(labels))], "binary": False}
        ids = [c.case_id for c in cases]  # all of them train, as in the other pipelines
        parts = {"train": ids, "val": [], "test": [],
                 "files": {c.case_id: (str(c.images[0]), str(c.mask)) for c in cases}}
        nnunet.write_raw(out / "raw", parts, dataset)
        nnunet.nnunet(self.python, "nnUNetv2_plan_and_preprocess", "-d", str(self.ident), "-c", self.configuration,
                      "-np", "2", env=self.env)
        split = [{"train": ids, "val": ids[:2]}]
        (out / "preprocessed" / self.name / "splits_final.json").write_text(json.dumps(split))

    def rate(self, steps: int) -> tuple[float, int]:
        """Steps per second of one window, and nnU-Net's augmenter worker count."""
        command = [str(self.python), str(ROOT / "benchmarks" / "nnunet_loader.py"), "--dataset", self.name,
                   "--configuration", self.configuration, "--dims", str(self.dims), "--data", str(self.data),
                   "--channels", str(self.channels), "--classes", str(self.classes), "--steps", str(steps)]
        done = subprocess.run(command, env=self.env, check=True, capture_output=True, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return result["steps_per_s"], result["workers"]


def nnunet_loader(dims: int, data: Path, cases, channels: int, classes: int) -> NnunetLoader | None:
    import nnunet

    if not (nnunet.VENV / "bin" / "python").exists():
        print(f"(d) skipped: no nnU-Net venv at {nnunet.VENV} (python benchmarks/nnunet.py --probe makes it)",
              file=sys.stderr)
        return None
    return NnunetLoader(dims, data, cases, channels, classes)


def measure(dims: int, data: Path, steps: int, repeats: int, device: str = "cpu") -> dict:
    """Steps per second of each pipeline for `dims` on `device` (benchmarks/gpu.py calls it with cuda)."""
    device = torch.device(device)
    cfg = setting(dims, data)
    cases = find_cases(data).cases
    started = time.perf_counter()
    loaded = load_cases(cases, cfg)
    load_seconds = time.perf_counter() - started
    classes = int(max(c.label.max() for c in loaded)) + 1
    channels = loaded[0].image.array.shape[0]
    sampler = (PatchSampler if dims == 3 else SliceSampler)(loaded, cfg, torch.Generator().manual_seed(0))
    pipelines = {"bare": bare_batches(sampler, cfg), "medseg": medseg_batches(sampler),
                 "monai_workers0": monai_batches(cases, cfg, 0), "monai_workers2": monai_batches(cases, cfg, 2)}
    if device.type == "cpu":  # where medseg's budgeted runs compile by default (medseg.compiling)
        pipelines["medseg_compiled"] = medseg_batches(sampler)
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    peer = nnunet_loader(dims, data, cases, channels, classes) if device.type == "cpu" else None
    workers = None
    for _ in range(repeats):
        for name, batches in pipelines.items():
            trainer = Trainer(cfg, channels, classes, device, compile_step=name == "medseg_compiled")
            rates[name].append(steps_per_second(batches, trainer, steps))
        if peer:
            rate, workers = peer.rate(steps)
            rates.setdefault("nnunet", []).append(rate)
    row = {"dims": dims, "device": str(device), "data": f"{len(cases)} cases", "batch": cfg.batch_size,
           "crop": crop(cfg), "medseg_load_seconds": round(load_seconds, 1),
           **{f"{name}_steps_per_s": round(statistics.median(v), 3) for name, v in rates.items()}}
    row["medseg_over_bare"] = row["medseg_steps_per_s"] / row["bare_steps_per_s"]
    monai_best = max(row["monai_workers0_steps_per_s"], row["monai_workers2_steps_per_s"])
    row["medseg_over_monai"] = row["medseg_steps_per_s"] / monai_best
    if "medseg_compiled_steps_per_s" in row:
        row["medseg_compiled_over_monai"] = row["medseg_compiled_steps_per_s"] / monai_best
    if "nnunet_steps_per_s" in row:
        row["nnunet_workers"] = workers
        row["medseg_over_nnunet"] = row["medseg_steps_per_s"] / row["nnunet_steps_per_s"]
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        phantoms = write_synthetic_dataset(Path(folder) / "phantoms", cases=64, dim=2, size=256)
        rows = [measure(2, phantoms, args.steps, args.repeats)]
    if HIPPOCAMPUS.is_dir():
        rows.append(measure(3, HIPPOCAMPUS, args.steps, args.repeats))
    import monai

    machine = (f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
               f"MONAI {monai.__version__}, CPU")
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "throughput.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    lines = [f"Machine: {machine}. Training steps per second (median of {args.repeats} windows of {args.steps} "
             "steps, pipelines interleaved); the same U-Net (width 16, instance norm), Dice + CE, Adam.", "",
             "| data | batch x crop | (a) bare loop | (b) medseg | (b) medseg, compiled step | (c) MONAI, 0 workers | "
             "(c) MONAI, 2 workers | (d) nnU-Net v2 loader (workers) | (b)/(a) (bar 0.90) | (b)/(c) best (bar 1.3) | "
             "(b) compiled/(c) best | (b)/(d) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = "x".join(map(str, r["crop"]))
        peer = (f"{r['nnunet_steps_per_s']:.2f} ({r['nnunet_workers']})", f"{r['medseg_over_nnunet']:.2f}") \
            if "nnunet_steps_per_s" in r else ("not run", "")
        lines.append(f"| {'2D phantoms' if r['dims'] == 2 else 'MSD hippocampus'} ({r['data']}) | {r['batch']} x "
                     f"{shape} | {r['bare_steps_per_s']:.2f} | {r['medseg_steps_per_s']:.2f} | "
                     f"{r['medseg_compiled_steps_per_s']:.2f} | {r['monai_workers0_steps_per_s']:.2f} | "
                     f"{r['monai_workers2_steps_per_s']:.2f} | {peer[0]} | {r['medseg_over_bare']:.2f} | "
                     f"{r['medseg_over_monai']:.2f} | {r['medseg_compiled_over_monai']:.2f} | {peer[1]} |")
    lines += ["", "Command: `python benchmarks/throughput.py` (alone on the machine)."]
    write_section("THROUGHPUT", "benchmarks/throughput.py", lines, "Training throughput: medseg, a bare loop, MONAI")


if __name__ == "__main__":
    main()
