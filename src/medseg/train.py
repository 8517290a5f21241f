"""Train a U-Net on 2D slices or 3D patches of a dataset; a run is a folder holding everything to reproduce it.

RUN/config.json   every setting (re-run with `medseg train --config RUN/config.json`), including the number of
                  optimiser steps a --time-budget was turned into, so a re-run repeats the same steps
RUN/split.json    the case-level train / validation / test split (and a content hash per case)
RUN/dataset.json  class names, channels and case counts as found
RUN/best.pt, last.pt   checkpoints (written atomically); best = highest validation Dice
RUN/history.csv, history.json   one row per epoch; RUN/curves.png; RUN/train_summary.json
"""
from __future__ import annotations

import csv
import io
import json
import math
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medseg.cache import as_loaded, cache_cases, channels_of, labels_of, ndim_of, path_of, use_disk
from medseg.checkpoint import resolve_device, save_checkpoint, torch_threads
from medseg.folders import mark, replace_folder
from medseg.config import TrainConfig
from medseg.budget import budget_account, budget_line, calibrate_steps, guard_reserve
from medseg import compiling, distributed, precision
from medseg.console import flush_notes, show_bars
from medseg.data import LoadedCase, first_orientation, load_cases, read_label
from medseg.datasets import (Dataset, case_hash, check_label_values, content_hash, detect_grey_levels, find_cases,
                             manifest_hash, split_dataset)
from medseg.errors import MedsegError
from medseg.io import read_image, write_text_atomic
from medseg.losses import deep_supervision_loss, make_loss, region_targets
from medseg.metrics import confusion, metrics_from_counts, nanmean
from medseg.infer import TrainedModel
from medseg.scoring import class_means, mean_dice, score_case
from medseg.models import create_model, place
from medseg.regions import region_masks
from medseg.samplers import PatchSampler, SliceSampler
from medseg.resume import check_same_split, random_states, read_resume_state, set_random_states
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
    """Find, split and load the cases; every input error surfaces here, before anything is written.

    Training cases are loaded as the network sees them (reoriented, resampled); validation cases on their own
    grid, where `medseg.scoring` scores them exactly as `medseg evaluate` scores test cases. Test masks are read
    too, only to check their values: a stray label should stop a run, not its evaluation an hour later."""
    dataset = find_cases(cfg.data, cfg.images, cfg.masks, cfg.allow_unmatched)
    split = split_dataset(dataset, cfg.val_fraction, cfg.seed, cfg.folds, cfg.fold, cfg.train_fraction,
                          cfg.test_fraction)
    chosen = {role: [c for c in dataset.cases if c.case_id in set(split[role])] for role in ("train", "val", "test")}
    if cfg.orientation is None:  # volumes in another voxel order are reoriented to the first one's
        cfg.orientation = first_orientation(chosen["train"], cfg.color)
    if cfg.mask_levels is None:  # classes coded as grey levels (the plan looks for them too)
        cfg.mask_levels = detect_grey_levels(chosen["train"] + chosen["val"], dataset.declared_labels, cfg)
    load = cache_cases if use_disk(cfg, chosen["train"] + chosen["val"]) else load_cases
    train_cases = load(chosen["train"], cfg, "training cases")
    val_cases = load(chosen["val"], cfg, "validation cases", resample=False)
    first = train_cases[0]
    if channels_of(first) != channels_of(val_cases[0]):
        raise MedsegError(f"{path_of(val_cases[0])}: channel count differs from the training cases; use --color gray")
    if cfg.context and ndim_of(first) != 3:
        raise MedsegError(f"{path_of(first)}: --context stacks neighbouring slices of volumes, and this "
                          "dataset holds 2D images")
    if cfg.dims == 3 and ndim_of(first) != 3:
        raise MedsegError(f"{path_of(first)}: --dims 3 trains on volumes, and this dataset holds 2D images")
    present = {str(case.mask): labels_of(loaded)
               for case, loaded in zip(chosen["train"] + chosen["val"], train_cases + val_cases)}
    for case in chosen["test"]:
        present[str(case.mask)] = set(np.unique(read_label(case, cfg)[1]).tolist())
    check_label_values(present, dataset.declared_labels, cfg.class_names)
    flush_notes()
    largest = max(max(values) for values in present.values())
    if largest == 0:
        raise MedsegError(f"{cfg.data}: every mask is empty; there is nothing to learn")
    return dataset, split, train_cases, val_cases, class_names_for(cfg, dataset, largest)


def marked_classes(class_names: list[str], train_cases: list, val_cases: list) -> dict:
    """The classes evaluation scores object by object, from the training and validation labels: lesion-like ones
    (absent from some cases, or named like a lesion) lesion by lesion, tubular ones (2D, thin) by clDice."""
    from medseg.lesions import lesion_like, tubular

    flat = [as_loaded(c).label for c in train_cases[:5]] if ndim_of(train_cases[0]) == 2 else []
    return {"lesion_classes": lesion_like(class_names, [labels_of(c) for c in train_cases + val_cases]),
            "tubular_classes": tubular(class_names, flat)}


def class_names_for(cfg: TrainConfig, dataset: Dataset, largest: int) -> list[str]:
    """What the data calls its classes: --class-names, dataset.json or the layout's; one unnamed class is
    'foreground', several unnamed ones class_1, class_2, ..."""
    names = list(cfg.class_names or dataset.class_names)
    if len(names) == 1 and largest == 1:
        return names + ["foreground"]
    return names + [f"class_{k}" for k in range(len(names), largest + 1)]


def create_run_dir(out: str | Path, overwrite: bool, kind: str = "run") -> Path:
    """An empty run folder, marked as medseg's; `overwrite` replaces an existing run, never a folder medseg did not
    write (medseg.folders)."""
    run = Path(out)
    if run.exists() and not run.is_dir():
        raise MedsegError(f"{run}: --out is a file; a run is a folder, so choose another --out")
    if run.exists() and any(run.iterdir()):
        if not overwrite:
            raise MedsegError(f"{run}: run folder exists and is not empty; choose another --out or pass --overwrite")
        replace_folder(run, "--out")
    run.mkdir(parents=True, exist_ok=True)
    mark(run, kind)
    return run


def train(cfg: TrainConfig, overwrite: bool = False, resume: Path | None = None) -> Path:
    """Train as configured and return the run folder; with `resume` (a run folder, whose config.json `cfg` is),
    continue that run from its last completed epoch instead (see `medseg.resume`)."""
    with torch_threads(cfg.threads):  # --threads is this run's, not the calling session's
        return _train(cfg, overwrite, resume)


def _train(cfg: TrainConfig, overwrite: bool, resume: Path | None) -> Path:
    cfg.validate()
    # a tracking package asked for but missing fails here, before any work; with several processes, rank 0 tracks
    tracker = Tracker(cfg if distributed.is_main() else replace(cfg, tensorboard=None, mlflow=None))
    resumed = read_resume_state(resume) if resume else None
    # the budget's clock: planning (done before this process, once) and a resumed run's time count
    started = time.monotonic() - (resumed["resume"]["elapsed"] if resumed else (cfg.planning_seconds or 0.0))
    generator = seed_everything(cfg.seed if cfg.init_seed is None else cfg.init_seed)
    device = distributed.start(resolve_device(cfg.device))
    if cfg.batch_size % distributed.world_size():
        raise MedsegError(f"--batch-size {cfg.batch_size} does not split over {distributed.world_size()} processes; "
                          "choose a multiple of their number (the batch size is the global batch)")
    loading = time.monotonic()
    dataset, split, train_cases, val_cases, class_names = prepare_data(cfg)
    loading = time.monotonic() - loading
    in_channels = channels_of(train_cases[0])
    loss_fn = make_loss(cfg.loss, len(class_names), cfg.regions, cfg.border_weight)
    model_args = cfg.model_args(in_channels, len(cfg.regions) if cfg.regions else len(class_names))
    model = create_model(cfg.model, **model_args)
    init = initialise(model, cfg)  # a checkpoint that does not fit fails here, before the run folder is made
    place(model, device)
    sampler = (PatchSampler if cfg.dims == 3 else SliceSampler)(train_cases, cfg, generator)
    trained = TrainedModel(model, cfg, class_names, in_channels, Path(cfg.out), device)
    compile_step, compile_reason = compiling.decide(cfg, device, distributed.world_size())
    if cfg.compile != "off":
        say(f"torch.compile: {compile_reason}")
    loop = _Loop(cfg, trained, loss_fn, sampler, val_cases, started, tracker, compile_step)
    if cfg.steps is None and cfg.time_budget:
        cfg.steps, cfg.calibration = calibrate_steps(loop, cfg.time_budget * 60 - (time.monotonic() - started))
        cfg.steps_per_epoch = loop.steps  # written to config.json: a re-run repeats the same epochs
        say(f"time budget {cfg.time_budget:g} min -> {cfg.steps} optimiser steps "
                 f"({cfg.calibration['seconds_per_step']:.3f} s per step, "
                 f"{cfg.calibration['seconds_per_validation']:.1f} s per validation, measured here)")
    elif (cfg.calibration or {}).get("validation") == "sampled":  # resumed or re-run: as the run was calibrated
        loop.use_sampled_validation()
    if resume:
        run = Path(resume)
        check_same_split(run, split)
        if resumed:
            loop.restore(resumed)
            say(f"resuming {run} after epoch {len(loop.history)} (step {len(loop.history) * loop.steps} of "
                f"{loop.last_step})")
        else:
            say(f"resuming {run} from its start: it was stopped before its first epoch ended")
    else:
        run = Path(cfg.out)
        cfg.data = str(Path(cfg.data).resolve())  # evaluate RUN works from any folder
    if not resume and distributed.is_main():
        run = create_run_dir(cfg.out, overwrite)
        cfg.save(run / "config.json")
        used = [c for c in dataset.cases if c.case_id in set(split["train"]) | set(split["val"]) | set(split["test"])]
        split["hashes"] = {c.case_id: case_hash(c) for c in used}  # the images: a case under another name
        split["content_hashes"] = {c.case_id: content_hash(c) for c in used}  # and mask and ROI: an edited case
        write_text_atomic(run / "split.json", json.dumps(split, indent=2))
        write_text_atomic(run / "dataset.json", json.dumps({
            "data": cfg.data, "manifest_hash": manifest_hash(split["hashes"]), "layout": dataset.layout,
            "class_names": class_names,
            "in_channels": in_channels, "train_cases": len(train_cases), "val_cases": len(val_cases),
            "test_cases": len(split["test"]), "segment_codes": dataset.segment_codes,
            **marked_classes(class_names, train_cases, val_cases)}, indent=2))
        if init:
            write_account(init, run)
    distributed.barrier()  # the run folder exists before any process writes to it
    trained.run = run
    tracker.start(run, resumed["resume"].get("mlflow_run_id") if resumed else None)
    try:
        summary = loop.run(model_args)
    except BaseException:
        tracker.abort()
        raise
    if distributed.active():
        summary["distributed"] = {"processes": distributed.world_size(), "backend": distributed.backend(),
                                  "batch_per_process": cfg.batch_size // distributed.world_size(),
                                  "parameters_identical_across_processes": distributed.parameters_agree(model)}
    if not distributed.is_main():
        distributed.barrier()  # rank 0 chooses the post-processing and writes the summary
        return run
    if loop.stopped_at is not None:
        cfg.stop_at = loop.stopped_at
        cfg.save(run / "config.json")
    final = time.monotonic()
    decision = choose_postprocessing(run, val_cases, device,
                                     [c for c in dataset.cases if c.case_id in set(split["train"])],
                                     [c for c in dataset.cases if c.case_id in set(split["val"])])
    # what was chosen, in short (empty: the plain argmax): classes keeping their largest component, min sizes
    summary["postprocessing"] = {k: decision[k] for k in ("classes", "min_sizes") if decision.get(k)}
    if loop.sampled is not None:  # the epochs' figure was a pseudo-Dice; this is the full one, as evaluate's
        summary["full_validation_dice"] = decision.get("validation_dice")
    summary["budget"] = budget_account(cfg, loading, loop, time.monotonic() - final, time.monotonic() - started)
    say(budget_line(summary["budget"]))
    summary.update(parameters=sum(p.numel() for p in model.parameters()), train_samples=len(sampler),
                   device=str(device), precision=precision.name(loop.amp), compile=compile_reason,
                   seconds=round(time.monotonic() - started, 1))
    if init:
        summary["init_from"] = {k: init[k] for k in ("source", "loaded", "of")} | {"skipped": len(init["skipped"])}
    write_text_atomic(run / "train_summary.json", json.dumps(summary, indent=2))
    from medseg.figures import plot_curves

    plot_curves(loop.history, run / "curves.png")
    tracker.finish(summary, [run / "curves.png", run / "train_summary.json", run / "config.json"])
    distributed.barrier()
    return run


EMA = 0.9  # weight of the running average of sampled validation scores on its previous value
LINE_PREFIX = ""  # an ensemble member's name, so that members training side by side can be told apart
PROGRESS_EVERY = 300.0  # seconds between progress lines inside an epoch when bars are off (--quiet, a log file)


def say(line: str) -> None:
    """A line for the person running training: printed even with --quiet (which only turns bars off); with
    several processes, by rank 0 only."""
    if distributed.is_main():
        print(LINE_PREFIX + line, flush=True)


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


def choose_postprocessing(run: Path, val_cases: list[LoadedCase], device: torch.device,
                          train_masks: list | None = None, val_masks: list | None = None) -> dict:
    """Decide, with the best checkpoint on the validation cases, which classes keep only their largest component
    and which lose components smaller than half the smallest one in `train_masks` (the training cases, read on
    their own grid, where predictions are made); the predictions come from `medseg.scoring`, as evaluation's do,
    one case at a time (a case cached on disk is read only for its turn). On instance masks (--binary-masks),
    also how instances are recovered from the predicted mask (`medseg.lesions.InstanceChoice`), against the
    validation cases' own instance maps (`val_masks`: their cases)."""
    from medseg.checkpoint import load_run
    from medseg.lesions import InstanceChoice
    from medseg.postprocess import choose_classes, smallest_components

    trained = load_run(run, device=str(device), unfinished=True)
    if trained.config.regions:  # nothing to choose; the validation score is still the run's full figure
        rows = [row for case in val_cases for row in score_case([trained], as_loaded(case), postprocess=False).rows()]
        decision = {"rule": "keep largest connected component", "classes": [], "min_sizes": {},
                    "validation": "not tried: region-based runs keep their predictions as they are",
                    "validation_dice": mean_dice(rows)}
    else:
        classes = list(range(1, len(trained.class_names)))
        labels = (read_label(case, trained.config)[1] for case in train_masks or [])
        min_sizes = smallest_components(labels, classes)

        masks = {c.case_id: c.mask for c in val_masks or []} if trained.config.binary_masks else {}
        instances = InstanceChoice() if masks else None

        def predictions():
            for case in val_cases:
                loaded = as_loaded(case)
                pred = score_case([trained], loaded, postprocess=False).pred
                if instances and loaded.case_id in masks:
                    instances.add(pred > 0, read_image(masks[loaded.case_id], npy_layout=trained.config.npy_layout)
                                  .array[0])
                yield pred, loaded.label, loaded.roi

        decision = choose_classes(predictions(), trained.class_names, min_sizes)
        if instances:
            decision["instances"] = instances.decision()
        # the plain predictions' mean over classes of each class's mean Dice: `scoring.mean_dice`, as evaluate's
        decision["validation_dice"] = nanmean([v["dice_none"] for v in decision["validation"].values()])
    write_text_atomic(run / "postprocessing.json", json.dumps(decision, indent=2))
    return decision


def redecide_postprocessing(run: str | Path, device: str = "auto") -> dict:
    """Choose a finished run's post-processing again, on its validation cases, with this medseg's rules (for runs
    trained before a rule existed); returns the decision written to RUN/postprocessing.json."""
    cfg = TrainConfig.load(Path(run) / "config.json")
    dataset = find_cases(cfg.data, cfg.images, cfg.masks, cfg.allow_unmatched)
    split = json.loads((Path(run) / "split.json").read_text())
    chosen = [c for c in dataset.cases if c.case_id in set(split["val"])]
    val_cases = load_cases(chosen, cfg, "validation cases", resample=False)
    training = [c for c in dataset.cases if c.case_id in set(split["train"])]
    choose_postprocessing(Path(run), val_cases, resolve_device(device), training, chosen)
    return json.loads((Path(run) / "postprocessing.json").read_text())


class _Loop:
    """The epoch loop: optimise for a fixed number of steps, validate per case, checkpoint, stop early."""

    def __init__(self, cfg, trained, loss_fn, sampler, val_cases, started, tracker: Tracker | None = None,
                 compile_step: bool = False):
        self.cfg, self.trained, self.loss_fn, self.sampler = cfg, trained, loss_fn, sampler
        self.compile_step = compile_step
        self.val_cases, self.started, self.tracker = val_cases, started, tracker
        self.optimizer = make_optimizer(cfg, trained.model)
        self.network = self.wrap(trained.model)  # what training steps call (DDP, compiled: see wrap)
        self.amp = precision.autocast_dtype(trained.device, cfg.precision)  # None (fp32) on a CPU
        self.scaler = precision.grad_scaler(trained.device, self.amp)
        self.steps = cfg.steps_per_epoch or max(50, math.ceil(len(sampler) / cfg.batch_size))
        self.history: list[dict] = []
        self.stopped_at: int | None = None  # the step where the clock ran out, if it did
        self.best, self.best_epoch, self.stale = -1.0, 0, 0
        self.finished: str | None = None  # why the loop ended before its last epoch, once it has
        self.sampled = None  # medseg.validation.SampledValidation where a full validation is too dear per epoch
        self.spent = {"training": 0.0, "validation": 0.0}  # seconds of this process, for the budget's account

    def use_sampled_validation(self, tta: str | None = None) -> None:
        """Score epochs on fixed validation samples (drawn now) rather than every validation case in full; `tta`:
        why test-time mirroring was switched off, if it was."""
        from medseg.validation import SampledValidation

        self.sampled = SampledValidation(self.val_cases, self.cfg)
        say(f"validation: a full pass over the {len(self.val_cases)} validation cases costs too much of the budget "
            f"to repeat every epoch; epochs are scored on {len(self.sampled)} fixed validation samples "
            "(pseudo-Dice, its running average choosing the checkpoint), the chosen checkpoint in full once at the "
            f"end{f'; test-time mirroring {tta}' if tta else ''}")

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as a training step calls it: in DistributedDataParallel when several processes train, and
        compiled where `medseg.compiling` decided so."""
        if distributed.active():
            from torch.nn.parallel import DistributedDataParallel

            device = self.trained.device
            if device.type == "cuda":  # batch statistics over the global batch (PyTorch has no CPU SyncBatchNorm)
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return compiling.compiled(model) if self.compile_step else model

    @property
    def last_step(self) -> int:
        """Where training ends: every step of the schedule, or where a budgeted run once ran out of time."""
        return min(self.total_steps, self.cfg.stop_at or self.total_steps)

    def out_of_time(self) -> bool:
        """A budgeted run's guard (calibration is an estimate): true once the clock leaves no room for one
        more validation and the post-processing pass. Never on a re-run, which stops where the run stopped."""
        if not self.cfg.time_budget or self.cfg.stop_at is not None or not self.cfg.calibration:
            return False
        reserve = guard_reserve(self.cfg.calibration)
        return self.elapsed() > self.cfg.time_budget * 60 - reserve

    @property
    def total_steps(self) -> int:
        """Every optimiser step of the run: --steps (or a time budget's calibration), else epochs x steps."""
        return self.cfg.steps or self.cfg.epochs * self.steps

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def set_lr(self, step: int) -> float:
        """The learning rate at `step` of `total_steps`: the schedule follows steps, never the clock."""
        lr = self.cfg.lr
        if self.cfg.lr_schedule == "poly":
            lr = self.cfg.lr * (1 - min(step / self.total_steps, 0.999)) ** 0.9
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def run(self, model_args: dict) -> dict:
        epochs = math.ceil(self.last_step / self.steps)
        for epoch in range(len(self.history) + 1, epochs + 1):
            if self.finished:
                break
            epoch_start = time.monotonic()
            row = {"epoch": epoch, **self.train_epoch(epoch)}
            validated = time.monotonic()
            self.spent["training"] += validated - epoch_start
            row.update(self.validate())
            self.spent["validation"] += time.monotonic() - validated
            row.update(seconds=round(time.monotonic() - epoch_start, 2), elapsed=round(self.elapsed(), 1))
            self.history.append(row)
            if self.sampled is not None:  # a pseudo-Dice of a few samples is noisy: its running average chooses
                previous = self.history[-2]["val_dice_ema"] if len(self.history) > 1 else row["val_dice"]
                row["val_dice_ema"] = EMA * previous + (1 - EMA) * row["val_dice"]  # (nnU-Net's, 0.9)
            improved = row.get("val_dice_ema", row["val_dice"]) > self.best or self.best_epoch == 0
            if improved:
                self.best, self.best_epoch, self.stale = row.get("val_dice_ema", row["val_dice"]), epoch, 0
            else:
                self.stale += 1
            if self.stopped_at is not None:
                self.finished = (f"time budget: the clock ran out at step {self.stopped_at} of {self.total_steps} "
                                 "(kept as stop_at in config.json, so a re-run stops there too)")
            elif self.cfg.patience and self.stale >= self.cfg.patience:
                self.finished = f"early stopping (no better validation Dice for {self.cfg.patience} epochs)"
            if not distributed.is_main():
                continue  # rank 0 writes and reports; every process has made the same decisions above
            # checkpoints first, each holding the history up to its epoch: a run stopped between these writes
            # resumes from the last checkpoint and rewrites the history files from it. best.pt before last.pt:
            # once last.pt says this epoch was the best, a resumed run never writes best.pt for it again
            state = self.state(model_args, epoch, row["val_dice"])
            if improved:
                save_checkpoint(self.trained.run / "best.pt", state, keep_previous=True)
            save_checkpoint(self.trained.run / "last.pt", {**state, "optimizer": self.optimizer.state_dict(),
                                                           "resume": self.resume_state()}, keep_previous=True)
            self.write_history()
            if self.tracker:
                self.tracker.log_epoch(row)
            say(f"epoch {epoch}/{epochs}: loss {row['train_loss']:.4f} val loss {row['val_loss']:.4f} "
                f"val Dice {row['val_dice']:.4f} ({row['seconds']:.0f}s)")
        reason = self.finished or "steps done"
        if self.cfg.stop_at is not None:
            reason = f"stopped at step {self.cfg.stop_at} of {self.total_steps}, where the budgeted run stopped"
        done = self.stopped_at or min(self.last_step, len(self.history) * self.steps)
        return {"best_epoch": self.best_epoch, "best_val_dice": self.best, "epochs_run": len(self.history),
                "steps": done, "stopped": reason}

    def resume_state(self) -> dict:
        """What a resumed run needs beyond weights and optimiser, as of the end of the last epoch."""
        return {"history": self.history, "best": self.best, "best_epoch": self.best_epoch, "stale": self.stale,
                "finished": self.finished, "stopped_at": self.stopped_at, "elapsed": self.elapsed(),
                "random": random_states(self.sampler.generator), "centred": getattr(self.sampler, "centred", 0),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "mlflow_run_id": self.tracker.run_id if self.tracker else None}

    def restore(self, state: dict) -> None:
        """Back to the end of the epoch `state` (a last.pt) was written at."""
        self.trained.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        resume = state["resume"]
        self.history = list(resume["history"])
        self.best, self.best_epoch, self.stale = resume["best"], resume["best_epoch"], resume["stale"]
        self.finished, self.stopped_at = resume["finished"], resume["stopped_at"]
        set_random_states(resume["random"], self.sampler.generator)
        if self.scaler and resume.get("scaler"):
            self.scaler.load_state_dict(resume["scaler"])
        if hasattr(self.sampler, "centred"):
            self.sampler.centred = resume["centred"]
        if distributed.is_main():
            self.write_history()  # the files may hold an epoch the checkpoint does not

    def train_epoch(self, epoch: int) -> dict:
        model = self.trained.model
        model.train()
        if self.cfg.freeze_encoder_epochs:
            set_encoder_frozen(model, epoch <= self.cfg.freeze_encoder_epochs)
        first = (epoch - 1) * self.steps
        steps = min(self.steps, self.last_step - first)
        self.sampler.seen, self.sampler.samples_counted, self.sampler.counting = {}, 0, epoch == 1
        counts, pixels, correct, losses, lr = None, 0, 0, [], self.cfg.lr
        bars = show_bars(self.cfg.progress)
        bar = tqdm(self.sampler.epoch_batches(steps), total=steps, desc=f"epoch {epoch}", disable=not bars,
                   leave=False)
        last_line = time.monotonic()
        for step, (image, label) in enumerate(bar):
            image, label = distributed.share(image), distributed.share(label)  # this process's part of the batch
            lr = self.set_lr(first + step)
            logits, loss = self.step(image, label)
            if not math.isfinite(loss):
                raise MedsegError(f"epoch {epoch}, step {step + 1}: the training loss is {loss}; training stopped. "
                                  f"{self.trained.run / 'last.pt'} keeps the last good epoch ({epoch - 1}); "
                                  "lower --lr, or check the inputs")
            losses.append(loss)
            batch_counts, batch_correct = self.batch_counts(logits, label)
            counts = batch_counts if counts is None else counts + batch_counts
            pixels, correct = pixels + label.numel(), correct + batch_correct
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if not bars and time.monotonic() - last_line > PROGRESS_EVERY and step + 1 < steps:
                # without bars a long epoch (DSB's is a whole 30-minute budget) still says it is alive
                last_line = time.monotonic()
                say(f"epoch {epoch}: step {step + 1}/{steps}, loss {float(np.mean(losses[-50:])):.4f} "
                    f"({self.elapsed() / 60:.0f} min)")
            if distributed.any_rank(self.out_of_time()):
                self.stopped_at = first + step + 1
                break
        if epoch == 1:  # what the class-aware sampling gave, once
            say(f"sampling in epoch 1: {self.sampler.shares_line(self.trained.class_names)}")
        counts = distributed.sum_over_ranks(counts)
        pixels, correct = (int(n) for n in distributed.sum_over_ranks(np.array([pixels, correct])))  # plain ints:
        # checkpoints hold the history and load with weights_only, which refuses NumPy scalars
        pooled = [metrics_from_counts(*row) for row in counts]
        return {"train_loss": float(np.mean(losses)), "train_dice": nanmean([m["dice"] for m in pooled]),
                "train_iou": nanmean([m["iou"] for m in pooled]),
                "train_accuracy": correct / max(pixels, 1), "lr": lr}

    def step(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One optimiser step on a batch; returns the full-resolution logits (detached) and the loss. A
        non-finite loss changes no weight."""
        device = self.trained.device
        if device.type == "cuda":  # pinned host memory lets the copy overlap the previous step's kernels
            image, label = image.pin_memory(), label.pin_memory()
        image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
        try:
            with precision.autocast(device, self.amp):
                outputs = self.network(image)
                if isinstance(outputs, list):  # deep supervision: full resolution first
                    loss, logits = deep_supervision_loss(self.loss_fn, outputs, label), outputs[0]
                else:
                    loss, logits = self.loss_fn(outputs, label), outputs
            value = distributed.mean_over_ranks(loss.item())  # the global batch's; NaN on any process skips on all
            if math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler:  # fp16: scaled, so that small gradients do not vanish
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    loss.backward()
                    self.optimizer.step()
        except torch.OutOfMemoryError as exc:
            raise out_of_memory(self.cfg, tuple(image.shape), self.trained.device) from exc
        return logits.detach(), value

    def batch_counts(self, logits: torch.Tensor, label: torch.Tensor) -> tuple[np.ndarray, int]:
        """TP/FP/FN/TN per scored foreground class (or region) of one batch, and its correctly labelled pixels
        (for regions: pixels whose every region is right)."""
        regions = self.cfg.regions
        label = label.to(logits.device)
        if regions:
            pred, target = (logits > 0).cpu().numpy(), region_targets(label, regions).bool().cpu().numpy()
            counts = np.stack([confusion(p.astype(np.uint8), t.astype(np.uint8), 2)[1]
                               for p, t in zip(pred.swapaxes(0, 1), target.swapaxes(0, 1))])
            return counts, int((pred == target).all(1).sum())
        # max(...).indices, not argmax: the same first-maximum indices, measured 1.3 ms against argmax's 46 ms on a
        # 16 x 2 x 128^2 batch here (a tenth of a compiled training step)
        pred, target = logits.max(1).indices.cpu().numpy(), label.cpu().numpy()
        return confusion(pred, target, len(self.trained.class_names))[1:], int((pred == target).sum())

    @torch.no_grad()
    def validate(self, trained: TrainedModel | None = None, cases: list | None = None) -> dict:
        """Loss and metrics of the validation cases (or of `cases`) on their own grids, through `medseg.scoring`
        (as `medseg evaluate` scores); val_dice is `scoring.mean_dice`, the figure evaluation reports. Where the
        run scores epochs on samples (`use_sampled_validation`), those instead. With several processes, rank 0
        validates and the others receive its scores."""
        if not distributed.is_main():
            return distributed.from_main(None)
        trained = trained or self.trained
        if self.sampled is not None and cases is None:
            return self.sampled.score(self, trained)
        trained.model.eval()
        losses, rows, accuracy = [], [], []
        for case in map(as_loaded, cases or self.val_cases):  # from the disk cache, one case at a time
            scored = score_case([trained], case, postprocess=False)
            target = torch.from_numpy(case.label.astype(np.int64))[None]
            p = torch.from_numpy(scored.probs).clamp(1e-7, 1 - 1e-7)[None]
            # logits that give back p: softmax(log p) = p, sigmoid(log p - log(1 - p)) = p
            logits = torch.log(p) - torch.log1p(-p) if self.cfg.regions else torch.log(p)
            losses.append(float(self.loss_fn(logits, target)))
            rows += scored.rows()
            inside = np.ones(case.label.shape, bool) if case.roi is None else case.roi
            right = ((region_masks(scored.pred, self.cfg.regions) == region_masks(case.label, self.cfg.regions)).all(0)
                     if self.cfg.regions else scored.pred == case.label)
            accuracy.append(float(right[inside].mean()))
        return distributed.from_main({
            "val_loss": float(np.mean(losses)), "val_dice": mean_dice(rows),
            "val_iou": nanmean(list(class_means(rows, "iou").values())), "val_accuracy": float(np.mean(accuracy))})

    def state(self, model_args: dict, epoch: int, val_dice: float) -> dict:
        return {"model": self.trained.model.state_dict(), "model_name": self.cfg.model, "model_args": model_args,
                "config": asdict(self.cfg), "class_names": self.trained.class_names, "epoch": epoch,
                "val_dice": val_dice}

    def write_history(self) -> None:
        run = self.trained.run
        write_text_atomic(run / "history.json", json.dumps(self.history, indent=2))
        lines = io.StringIO()
        writer = csv.DictWriter(lines, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")  # val_dice_ema: json
        writer.writeheader()
        writer.writerows(self.history)
        write_text_atomic(run / "history.csv", lines.getvalue())


def out_of_memory(cfg: TrainConfig, shape: tuple[int, ...], device: torch.device) -> MedsegError:
    """Running out of accelerator memory, as what was being tried and what to lower."""
    what = f"{'x'.join(map(str, shape[2:]))} {'patches' if cfg.dims == 3 else 'slices'}"
    size_flag = "--patch" if cfg.dims == 3 or cfg.patch else "--size"
    return MedsegError(f"out of {device.type.upper()} memory training batches of {shape[0]} {what} at width "
                       f"{cfg.base_channels} ({cfg.model}, depth {cfg.depth}); lower --batch-size (now "
                       f"{cfg.batch_size}), then {size_flag} or --base-channels, or train with --device cpu")


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.99, nesterov=True,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
