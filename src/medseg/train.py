"""Train a U-Net on 2D slices or 3D patches of a dataset; a run is a folder holding everything to reproduce it.

RUN/config.json   every setting (re-run with `medseg train --config RUN/config.json`)
RUN/split.json    the case-level train/validation split
RUN/dataset.json  class names, channels and case counts as found
RUN/best.pt, last.pt   checkpoints (written atomically); best = highest validation Dice
RUN/history.csv, history.json   one row per epoch; RUN/curves.png; RUN/train_summary.json
"""
from __future__ import annotations

import csv
import json
import math
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medseg.checkpoint import TrainedModel, resolve_device, save_checkpoint
from medseg.config import TrainConfig
from medseg.data import LoadedCase, PatchSampler, SliceSampler, first_orientation, load_cases
from medseg.datasets import Dataset, find_cases, split_cases
from medseg.errors import MedsegError
from medseg.infer import predict_probabilities, to_labels
from medseg.losses import deep_supervision_loss, make_loss
from medseg.metrics import confusion, metrics_from_counts, scored_metrics
from medseg.models import create_model
from medseg.regions import region_masks, region_targets
from medseg.tracking import Tracker
from medseg.transfer import describe, encoder_parameters, load_matching, set_encoder_frozen, write_account

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "train_dice", "val_dice", "train_iou", "val_iou",
                   "train_accuracy", "val_accuracy", "lr", "seconds", "elapsed"]


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def prepare_data(cfg: TrainConfig) -> tuple[Dataset, dict, list[LoadedCase], list[LoadedCase], list[str]]:
    """Find, split and load the cases; every input error surfaces here, before anything is written."""
    dataset = find_cases(cfg.data, cfg.images, cfg.masks)
    split = split_cases([c.case_id for c in dataset.cases], cfg.val_fraction, cfg.seed, cfg.folds, cfg.fold,
                        cfg.train_fraction)
    train_ids, val_ids = set(split["train"]), set(split["val"])
    if cfg.orientation is None:  # volumes in another voxel order are reoriented to the first one's
        cfg.orientation = first_orientation([c for c in dataset.cases if c.case_id in train_ids], cfg.color)
    train_cases = load_cases([c for c in dataset.cases if c.case_id in train_ids], cfg, "training cases")
    val_cases = load_cases([c for c in dataset.cases if c.case_id in val_ids], cfg, "validation cases")
    if train_cases[0].image.array.shape[0] != val_cases[0].image.array.shape[0]:
        raise MedsegError(f"{val_cases[0].image.path}: channel count differs from the training cases; use --color gray")
    if cfg.context and train_cases[0].image.ndim != 3:
        raise MedsegError(f"{train_cases[0].image.path}: --context stacks neighbouring slices of volumes, and this "
                          "dataset holds 2D images")
    if cfg.dims == 3 and train_cases[0].image.ndim != 3:
        raise MedsegError(f"{train_cases[0].image.path}: --dims 3 trains on volumes, and this dataset holds 2D images")
    largest = max(int(c.label.max()) for c in train_cases + val_cases)
    names = list(cfg.class_names or dataset.class_names)
    if largest == 0:
        raise MedsegError(f"{cfg.data}: every mask is empty; there is nothing to learn")
    names += [f"class_{k}" for k in range(len(names), largest + 1)]
    return dataset, split, train_cases, val_cases, names


def create_run_dir(out: str | Path, overwrite: bool) -> Path:
    run = Path(out)
    if run.exists() and any(run.iterdir()):
        if not overwrite:
            raise MedsegError(f"{run}: run folder exists and is not empty; choose another --out or pass --overwrite")
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    return run


def train(cfg: TrainConfig, overwrite: bool = False) -> Path:
    """Train as configured and return the run folder."""
    cfg.validate()
    tracker = Tracker(cfg)  # a tracking package asked for but missing fails here, before any work
    started = time.monotonic()
    generator = seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dataset, split, train_cases, val_cases, class_names = prepare_data(cfg)
    in_channels = train_cases[0].image.array.shape[0]
    loss_fn = make_loss(cfg.loss, len(class_names), cfg.regions)
    model_args = cfg.model_args(in_channels, len(cfg.regions) if cfg.regions else len(class_names))
    model = create_model(cfg.model, **model_args)
    init = initialise(model, cfg)  # a checkpoint that does not fit fails here, before the run folder is made
    run = create_run_dir(cfg.out, overwrite)
    cfg.save(run / "config.json")
    (run / "split.json").write_text(json.dumps(split, indent=2))
    (run / "dataset.json").write_text(json.dumps({
        "data": str(cfg.data), "layout": dataset.layout, "class_names": class_names, "in_channels": in_channels,
        "train_cases": len(train_cases), "val_cases": len(val_cases)}, indent=2))
    if init:
        write_account(init, run)
    model.to(device)
    trained = TrainedModel(model, cfg, class_names, in_channels, run, device)
    sampler = (PatchSampler if cfg.dims == 3 else SliceSampler)(train_cases, cfg, generator)
    tracker.start(run)
    loop = _Loop(cfg, trained, loss_fn, sampler, val_cases, started, tracker)
    try:
        summary = loop.run(model_args)
    except BaseException:
        tracker.abort()
        raise
    summary["postprocessing"] = choose_postprocessing(run, val_cases, device)
    summary.update(parameters=sum(p.numel() for p in model.parameters()), train_samples=len(sampler),
                   device=str(device), seconds=round(time.monotonic() - started, 1))
    if init:
        summary["init_from"] = {k: init[k] for k in ("source", "loaded", "of")} | {"skipped": len(init["skipped"])}
    (run / "train_summary.json").write_text(json.dumps(summary, indent=2))
    from medseg.figures import plot_curves

    plot_curves(loop.history, run / "curves.png")
    tracker.finish(summary, [run / "curves.png", run / "train_summary.json", run / "config.json"])
    return run


def initialise(model: torch.nn.Module, cfg: TrainConfig) -> dict | None:
    """Load the matching weights of --init-from (if given) and say what was loaded; return the account."""
    if cfg.freeze_encoder_epochs:
        encoder_parameters(model)  # fails now, not after an epoch, for a model without a named encoder
    if not cfg.init_from:
        return None
    account = load_matching(model, cfg.init_from)
    if cfg.progress:
        tqdm.write(describe(account))
    return account


def train_folds(cfg: TrainConfig, overwrite: bool = False) -> list[Path]:
    """k-fold cross-validation: one run per fold, RUN/fold_0 ... RUN/fold_{k-1}; `medseg predict RUN` ensembles
    them. Each fold is a complete run (its own split, checkpoints and post-processing decision)."""
    if cfg.folds < 2:
        raise MedsegError("--all-folds needs --folds K with K >= 2")
    runs = []
    for fold in range(cfg.folds):
        fold_cfg = TrainConfig(**{**asdict(cfg), "fold": fold, "out": str(Path(cfg.out) / f"fold_{fold}")})
        runs.append(train(fold_cfg, overwrite=overwrite))
    return runs


def choose_postprocessing(run: Path, val_cases: list[LoadedCase], device: torch.device) -> list[int]:
    """Decide, with the best checkpoint on the validation cases, which classes keep only their largest component."""
    from medseg.checkpoint import load_run
    from medseg.infer import predict_labels
    from medseg.postprocess import choose_classes

    trained = load_run(run, device=str(device))
    if trained.config.regions:
        decision = {"rule": "keep largest connected component", "classes": [],
                    "validation": "not tried: region-based runs keep their predictions as they are"}
        (run / "postprocessing.json").write_text(json.dumps(decision, indent=2))
        return []
    predictions = [predict_labels(trained, case.image.array, postprocess=False) for case in val_cases]
    decision = choose_classes(predictions, [case.label for case in val_cases], len(trained.class_names),
                              [case.roi for case in val_cases])
    (run / "postprocessing.json").write_text(json.dumps(decision, indent=2))
    return decision["classes"]


class _Loop:
    """The epoch loop: optimise, validate per case, checkpoint, stop early or when the budget is spent."""

    def __init__(self, cfg, trained, loss_fn, sampler, val_cases, started, tracker: Tracker | None = None):
        self.cfg, self.trained, self.loss_fn, self.sampler = cfg, trained, loss_fn, sampler
        self.val_cases, self.started, self.tracker = val_cases, started, tracker
        params = trained.model.parameters()
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.99, nesterov=True,
                                             weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps = cfg.steps_per_epoch or max(50, math.ceil(len(sampler) / cfg.batch_size))
        self.budget = cfg.time_budget * 60 if cfg.time_budget else None
        self.history: list[dict] = []
        self.last_val_seconds = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def out_of_time(self) -> bool:
        """True when one more step, a validation pass and the post-processing pass would overrun the budget."""
        return self.budget is not None and self.elapsed() + 2 * self.last_val_seconds >= self.budget

    def set_lr(self, step: int) -> float:
        lr = self.cfg.lr
        if self.cfg.lr_schedule == "poly":
            progress = step / (self.cfg.epochs * self.steps)
            if self.budget:
                progress = max(progress, self.elapsed() / self.budget)
            lr = self.cfg.lr * (1 - min(progress, 0.999)) ** 0.9
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def run(self, model_args: dict) -> dict:
        best, best_epoch, stale, reason = -1.0, 0, 0, "epochs done"
        for epoch in range(1, self.cfg.epochs + 1):
            epoch_start = time.monotonic()
            row = {"epoch": epoch, **self.train_epoch(epoch)}
            if row.pop("stopped"):
                reason = "time budget"
            val_start = time.monotonic()
            row.update(self.validate())
            self.last_val_seconds = time.monotonic() - val_start
            row.update(seconds=round(time.monotonic() - epoch_start, 2), elapsed=round(self.elapsed(), 1))
            self.history.append(row)
            self.write_history()
            if self.tracker:
                self.tracker.log_epoch(row)
            state = self.state(model_args, epoch, row["val_dice"])
            save_checkpoint(self.trained.run / "last.pt", {**state, "optimizer": self.optimizer.state_dict()})
            if row["val_dice"] > best:
                best, best_epoch, stale = row["val_dice"], epoch, 0
                save_checkpoint(self.trained.run / "best.pt", state)
            else:
                stale += 1
            if self.cfg.progress:
                tqdm.write(f"epoch {epoch}: loss {row['train_loss']:.4f} val loss {row['val_loss']:.4f} "
                           f"val Dice {row['val_dice']:.4f} ({row['seconds']:.0f}s)")
            if reason == "time budget" or self.out_of_time():
                reason = "time budget"
                break
            if self.cfg.patience and stale >= self.cfg.patience:
                reason = f"early stopping (no better validation Dice for {self.cfg.patience} epochs)"
                break
        return {"best_epoch": best_epoch, "best_val_dice": best, "epochs_run": len(self.history),
                "stopped": reason}

    def train_epoch(self, epoch: int) -> dict:
        model = self.trained.model
        model.train()
        if self.cfg.freeze_encoder_epochs:
            set_encoder_frozen(model, epoch <= self.cfg.freeze_encoder_epochs)
        counts, pixels, correct = None, 0, 0
        losses, stopped, lr = [], False, self.cfg.lr
        bar = tqdm(self.sampler.epoch_batches(self.steps), total=self.steps, desc=f"epoch {epoch}",
                   disable=not self.cfg.progress, leave=False)
        for step, (image, label) in enumerate(bar):
            if self.out_of_time() and losses:
                stopped = True
                break
            lr = self.set_lr((epoch - 1) * self.steps + step)
            image, label = image.to(self.trained.device), label.to(self.trained.device)
            outputs = model(image)
            if isinstance(outputs, list):  # deep supervision: full resolution first
                loss, logits = deep_supervision_loss(self.loss_fn, outputs, label), outputs[0]
            else:
                loss, logits = self.loss_fn(outputs, label), outputs
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
            batch_counts, batch_correct = self.batch_counts(logits.detach(), label)
            counts = batch_counts if counts is None else counts + batch_counts
            pixels, correct = pixels + label.numel(), correct + batch_correct
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        pooled = [metrics_from_counts(*row) for row in counts]
        return {"train_loss": float(np.mean(losses)), "train_dice": float(np.mean([m["dice"] for m in pooled])),
                "train_iou": float(np.mean([m["iou"] for m in pooled])),
                "train_accuracy": correct / max(pixels, 1), "lr": lr, "stopped": stopped}

    def batch_counts(self, logits: torch.Tensor, label: torch.Tensor) -> tuple[np.ndarray, int]:
        """TP/FP/FN/TN per scored foreground class (or region) of one batch, and its correctly labelled pixels
        (for regions: pixels whose every region is right)."""
        regions = self.cfg.regions
        if regions:
            pred, target = (logits > 0).cpu().numpy(), region_targets(label, regions).bool().cpu().numpy()
            counts = np.stack([confusion(p.astype(np.uint8), t.astype(np.uint8), 2)[1]
                               for p, t in zip(pred.swapaxes(0, 1), target.swapaxes(0, 1))])
            return counts, int((pred == target).all(1).sum())
        pred, target = logits.argmax(1).cpu().numpy(), label.cpu().numpy()
        return confusion(pred, target, len(self.trained.class_names))[1:], int((pred == target).sum())

    @torch.no_grad()
    def validate(self) -> dict:
        """Loss and metrics per validation case at the case's own resolution, then averaged over cases."""
        self.trained.model.eval()
        losses, dice, iou, accuracy = [], [], [], []
        for case in self.val_cases:
            probs = predict_probabilities(self.trained, case.image.array)
            target = torch.from_numpy(case.label.astype(np.int64))[None]
            p = torch.from_numpy(probs).clamp(1e-7, 1 - 1e-7)[None]
            # logits that give back p: softmax(log p) = p, sigmoid(log p - log(1 - p)) = p
            logits = torch.log(p) - torch.log1p(-p) if self.cfg.regions else torch.log(p)
            losses.append(float(self.loss_fn(logits, target)))
            pred = to_labels(probs, self.trained)
            scores = scored_metrics(pred, case.label, self.trained.class_names, self.cfg.regions, case.roi)
            dice.append(float(np.mean([m["dice"] for m in scores.values()])))
            iou.append(float(np.mean([m["iou"] for m in scores.values()])))
            inside = np.ones(case.label.shape, bool) if case.roi is None else case.roi
            right = ((region_masks(pred, self.cfg.regions) == region_masks(case.label, self.cfg.regions)).all(0)
                     if self.cfg.regions else pred == case.label)
            accuracy.append(float(right[inside].mean()))
        return {"val_loss": float(np.mean(losses)), "val_dice": float(np.mean(dice)),
                "val_iou": float(np.mean(iou)), "val_accuracy": float(np.mean(accuracy))}

    def state(self, model_args: dict, epoch: int, val_dice: float) -> dict:
        return {"model": self.trained.model.state_dict(), "model_name": self.cfg.model, "model_args": model_args,
                "config": asdict(self.cfg), "class_names": self.trained.class_names, "epoch": epoch,
                "val_dice": val_dice}

    def write_history(self) -> None:
        run = self.trained.run
        (run / "history.json").write_text(json.dumps(self.history, indent=2))
        with open(run / "history.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
            writer.writeheader()
            writer.writerows(self.history)
