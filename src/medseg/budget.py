"""Turn a time budget into a number of optimiser steps, once, at the start of a run.

A schedule that follows the wall clock does not repeat: the same seed gives other weights on a busier machine.
So `--time-budget M` times a few training steps and one validation pass on copies (the run's model, optimiser
and random streams are left as they were), solves for the steps that fit, and writes them into config.json;
from then on the run is a fixed number of steps, and `medseg train --config RUN/config.json` repeats it.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch

from medseg import distributed
from medseg.validation import SAMPLES

WARMUP_STEPS = 2  # the first steps pay for allocation and kernel selection
MEASURE_STEPS = 40
MEASURE_SECONDS = 15.0  # long enough that members calibrating side by side measure each other's contention
MEASURE_SHARE = 0.1  # of the budget, at most, spent timing steps: a short budget is not eaten by its calibration
# Steps over a whole run came out 8-17% slower than over the calibration's (two members side by side on the
# hippocampus): the schedule is planned for 95% of the estimate, and the training loop's clock guard stops a run
# that still runs late (recording where, so that a re-run repeats it).
SAFETY = 0.95
SAFETY_ALONE = 0.99  # one network alone ran its steps as fast as calibrated (CT-like set: 0.517 s planned 0.529)
# Set by `medseg.autotrain` in each member of an ensemble trained side by side: the members wait for each other
# before timing, so each measures its steps while the others run too (measured alone, a member's steps looked
# 25-40% faster than they were once both ran).
SIDE_BY_SIDE = None
CHECKPOINT_SECONDS = 1.0  # per epoch: two checkpoints, the history, a line of output
GUARD_SLACK_SECONDS = 2.0  # the clock guard's margin beyond the last validation and the post-processing pass
VALIDATION_SHARE = 0.05  # of the budget, at most, when medseg chooses the epoch length
# a full validation (every case on its own grid, with TTA) that would take more than this share of the budget is
# run once, at the end; the epochs are scored on fixed validation samples instead (medseg.validation). Measured on
# the CT-like set: one full pass of 8 volumes took 336 s of a 20-minute budget before
FULL_VALIDATION_SHARE = 0.02
# and where that one final pass, with test-time mirroring, would still take more than this share, the run predicts
# without it (evaluation and prediction too, as config.json then says): on the CT-like set at 1.6 mm the final pass
# took 179 s of 1,200 with four mirrored views, 15% of the budget that training needed
FINAL_VALIDATION_SHARE = 0.08
SAMPLED_GAIN = 4.0  # and only where the samples' pass is at most a quarter of a full one (not for 19 small images)


def calibrate_steps(loop, budget_seconds: float) -> tuple[int, dict]:
    """The number of optimiser steps that fit `budget_seconds` (this calibration, validation after every epoch and
    the final full validation with the post-processing choice included), at most the configured epochs, and how it
    was found. Where the epoch length is not set, epochs are lengthened so that validation takes at most
    VALIDATION_SHARE of the budget. A full validation estimated (from its smallest case) at more than
    FULL_VALIDATION_SHARE of the budget switches the epochs to sampled validation (`loop.use_sampled_validation`)."""
    started = time.perf_counter()
    _together()
    seconds_per_step = _time_steps(loop, min(MEASURE_SECONDS, MEASURE_SHARE * budget_seconds))
    _together()
    final, tta = _estimate_full_validation(loop), None
    # the samples' pass: a forward pass is about a third of a training step, batch by batch
    sampled = seconds_per_step * SAMPLES / loop.cfg.batch_size / 3
    if final > max(FULL_VALIDATION_SHARE * budget_seconds, SAMPLED_GAIN * sampled) and not distributed.active():
        views = tta_views(loop.cfg)
        if views > 1 and final > FINAL_VALIDATION_SHARE * budget_seconds:
            loop.cfg.mirror_tta, final = False, final / views
            tta = (f"off: {views} mirrored views would make the final validation {final * views:.0f} s, more than "
                   f"{FINAL_VALIDATION_SHARE:.0%} of the budget")
        loop.use_sampled_validation(tta)
    else:  # small enough to run every epoch: timed in full (with several processes, rank 0's)
        final = None
    seconds_per_validation = _time_validation(loop)
    final = final or seconds_per_validation  # the end's full pass: the post-processing choice (and, sampled, the
    # run's validation Dice). What is left once it and the guard's slack are set aside: the plan ends where the
    # clock guard (guard_reserve) would let it, so only a slower machine, not the plan, trips the guard
    available = budget_seconds - (time.perf_counter() - started) - final - GUARD_SLACK_SECONDS
    if loop.cfg.steps_per_epoch is None:
        most_validations = max(1, int(VALIDATION_SHARE * budget_seconds / max(seconds_per_validation, 1e-3)))
        rough_steps = available / seconds_per_step
        loop.steps = max(loop.steps, math.ceil(rough_steps / most_validations))
    per_epoch = seconds_per_validation + CHECKPOINT_SECONDS
    safety = SAFETY if SIDE_BY_SIDE is not None else SAFETY_ALONE
    steps = int(safety * available / (seconds_per_step + per_epoch / loop.steps))  # the clock guards the rest
    steps = max(1, min(steps, loop.cfg.epochs * loop.steps))
    found = steps, {"budget_seconds": round(budget_seconds, 1), "seconds_per_step": round(seconds_per_step, 4),
                    "seconds_per_validation": round(seconds_per_validation, 2),
                    "seconds_per_final_validation": round(final, 2),
                    "validation": "sampled" if loop.sampled else "full", "steps_per_epoch": loop.steps,
                    "tta": tta or ("as configured" if loop.cfg.mirror_tta else "off"),
                    "calibration_seconds": round(time.perf_counter() - started, 1), "epochs": math.ceil(steps / loop.steps),
                    "capped_by_epochs": steps == loop.cfg.epochs * loop.steps}
    loop.steps, found = distributed.from_main((loop.steps, found))  # with several processes: rank 0's plan
    return found


def _together() -> None:
    """Wait for the other members of a side-by-side ensemble (if any); a broken barrier (a member failed) is
    not waited on again."""
    global SIDE_BY_SIDE
    if SIDE_BY_SIDE is None:
        return
    try:
        SIDE_BY_SIDE.wait()
    except Exception:  # BrokenBarrierError through the manager's proxy
        SIDE_BY_SIDE = None


def tta_views(cfg) -> int:
    """How many views test-time augmentation averages for `cfg`: each combination of mirrored axes, times two for
    quarter turns."""
    from medseg.infer import tta_axes, tta_rotates

    return 2 ** len(tta_axes(cfg)) * (2 if tta_rotates(cfg) else 1)


def guard_reserve(calibration: dict) -> float:
    """Seconds a budgeted run keeps in hand when the clock guard stops it: the validation of the epoch it stops
    in, the final full validation with the post-processing choice, and a slack."""
    validation = calibration["seconds_per_validation"]
    return validation + calibration.get("seconds_per_final_validation", validation) + GUARD_SLACK_SECONDS


def _time_steps(loop, measure_seconds: float) -> float:
    """Mean seconds of a training step as the loop takes it (sampling, augmentation, the step, its metrics), timed
    on a copy of the model and optimiser: the run's own are left as they were."""
    sampler, generator = loop.sampler, loop.sampler.generator
    saved = generator.get_state(), torch.get_rng_state(), getattr(sampler, "centred", None)
    shadow = copy.copy(loop)
    model = copy.deepcopy(loop.trained.model).train()
    shadow.trained = dataclasses.replace(loop.trained, model=model)
    shadow.optimizer = type(loop.optimizer)(model.parameters(), **loop.optimizer.defaults)  # same kind, on the copy
    shadow.network = loop.wrap(model)  # as the run trains: compiled, or across processes, where it does
    shadow.scaler = copy.deepcopy(loop.scaler)
    try:
        batches = sampler.epoch_batches(WARMUP_STEPS + MEASURE_STEPS)
        timed, started = 0, None
        for i, (image, label) in enumerate(batches):
            if i == WARMUP_STEPS:  # a compiled network compiles in the first of these
                started = time.perf_counter()
            image, label = distributed.share(image), distributed.share(label)
            logits, _ = shadow.step(image, label)
            shadow.batch_counts(logits, label)
            if started is not None:
                timed += 1
                if distributed.any_rank(time.perf_counter() - started > measure_seconds):
                    break
        return (time.perf_counter() - started) / timed if timed else measure_seconds
    finally:
        generator.set_state(saved[0])
        torch.set_rng_state(saved[1])
        if saved[2] is not None:
            sampler.centred = saved[2]


def _time_validation(loop, cases: list | None = None) -> float:
    """Seconds of one validation pass as the epochs will run it (or of a full one over `cases`), with a copy of
    the model."""
    shadow = dataclasses.replace(loop.trained, model=copy.deepcopy(loop.trained.model))
    started = time.perf_counter()
    loop.validate(shadow, cases)
    return time.perf_counter() - started


SLAB_SLICES = 8  # a 2D network's full validation is estimated from this many slices of its smallest case


def _estimate_full_validation(loop) -> float:
    """Seconds of a full validation pass, from a part of its smallest case (a slab of SLAB_SLICES slices for 2D
    networks on volumes, a box of twice the patch for 3D ones, a whole 2D image) timed and scaled by the voxels of
    all the cases: a CT case predicted whole would itself cost a minute of the budget."""
    from medseg.cache import as_loaded

    sizes = [math.prod(case.spatial_shape) for case in loop.val_cases]
    part = _part(as_loaded(loop.val_cases[min(range(len(sizes)), key=sizes.__getitem__)]), loop.cfg)
    _time_validation(loop, [part])  # the first pass pays for allocations and kernel choices: not scaled up (a
    # first pass scaled 60x estimated 1,242 s for a CT validation that takes about 300)
    return _time_validation(loop, [part]) * sum(sizes) / math.prod(part.spatial_shape)


def _part(case, cfg):
    """The leading part of a loaded case that `_estimate_full_validation` times (the case itself for 2D images)."""
    from medseg.data import LoadedCase
    from medseg.io import Image

    shape = case.spatial_shape
    if len(shape) == 2:
        return case
    if cfg.dims == 2:
        window = [slice(None)] * 3
        window[cfg.axis % 3] = slice(0, SLAB_SLICES)
    else:
        window = [slice(0, 2 * p) for p in cfg.patch_size]
    window = tuple(window)
    image = case.image
    return LoadedCase(case.case_id, Image(image.array[(slice(None), *window)], image.spacing, image.affine, image.path,
                                          image.meta), case.label[window],
                      None if case.roi is None else case.roi[window])


def budget_account(cfg, loading: float, loop, final: float, total: float) -> dict:
    """Where a run's time went, in seconds: planning (before training), reading and caching the cases, the step
    calibration, the optimiser steps (sampling and augmentation included), validation during training, and the
    final full validation with the post-processing choice; and the steps' share of the whole."""
    calibration = (cfg.calibration or {}).get("calibration_seconds", 0.0)
    spent = {"planning": cfg.planning_seconds or 0.0, "loading": loading, "calibration": calibration,
             "training": loop.spent["training"], "validation": loop.spent["validation"],
             "final_validation_and_postprocessing": final}
    spent["other"] = max(0.0, total - sum(spent.values()))
    account = {name: round(seconds, 1) for name, seconds in spent.items()}
    account.update(total=round(total, 1), training_share=round(spent["training"] / max(total, 1e-9), 3))
    return account


def budget_line(account: dict) -> str:
    """The account in one line, in minutes (seconds for runs under five minutes)."""
    minutes = account["total"] >= 300
    unit, scale = ("min", 60) if minutes else ("s", 1)
    parts = ", ".join(f"{name.replace('_', ' ')} {seconds / scale:.1f}" for name, seconds in account.items()
                      if name not in ("total", "training_share") and seconds / scale >= 0.05)
    return (f"time: {account['total'] / scale:.1f} {unit} in all ({parts} {unit}); optimiser steps took "
            f"{account['training_share']:.0%}")
