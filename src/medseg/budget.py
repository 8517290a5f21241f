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

WARMUP_STEPS = 2  # the first steps pay for allocation and kernel selection
MEASURE_STEPS = 40
MEASURE_SECONDS = 15.0  # long enough that members calibrating side by side measure each other's contention
MEASURE_SHARE = 0.1  # of the budget, at most, spent timing steps: a short budget is not eaten by its calibration
# Steps over a whole run came out 8-17% slower than over the calibration's (two members side by side on the
# hippocampus): the schedule is planned for 95% of the estimate, and the training loop's clock guard stops a run
# that still runs late (recording where, so that a re-run repeats it).
SAFETY = 0.95
# Set by `medseg.autotrain` in each member of an ensemble trained side by side: the members wait for each other
# before timing, so each measures its steps while the others run too (measured alone, a member's steps looked
# 25-40% faster than they were once both ran).
SIDE_BY_SIDE = None
CHECKPOINT_SECONDS = 1.0  # per epoch: two checkpoints, the history, a line of output
GUARD_SLACK_SECONDS = 2.0  # the clock guard's margin beyond the last validation and the post-processing pass
VALIDATION_SHARE = 0.05  # of the budget, at most, when medseg chooses the epoch length


def calibrate_steps(loop, budget_seconds: float) -> tuple[int, dict]:
    """The number of optimiser steps that fit `budget_seconds` (this calibration, validation after every epoch and
    the post-processing pass included), at most the configured epochs, and how it was found. Where the epoch length
    is not set, epochs are lengthened so that validation takes at most VALIDATION_SHARE of the budget."""
    started = time.perf_counter()
    _together()
    seconds_per_step = _time_steps(loop, min(MEASURE_SECONDS, MEASURE_SHARE * budget_seconds))
    _together()
    seconds_per_validation = _time_validation(loop)  # with several processes, rank 0's (the others wait)
    # what is left once the post-processing pass and the guard's slack are set aside: the plan ends where the
    # clock guard (guard_reserve) would let it, so only a slower machine, not the plan, trips the guard
    available = budget_seconds - (time.perf_counter() - started) - seconds_per_validation - GUARD_SLACK_SECONDS
    if loop.cfg.steps_per_epoch is None:
        most_validations = max(1, int(VALIDATION_SHARE * budget_seconds / max(seconds_per_validation, 1e-3)))
        rough_steps = available / seconds_per_step
        loop.steps = max(loop.steps, math.ceil(rough_steps / most_validations))
    per_epoch = seconds_per_validation + CHECKPOINT_SECONDS
    steps = int(SAFETY * available / (seconds_per_step + per_epoch / loop.steps))  # the clock guards the rest
    steps = max(1, min(steps, loop.cfg.epochs * loop.steps))
    found = steps, {"budget_seconds": round(budget_seconds, 1), "seconds_per_step": round(seconds_per_step, 4),
                    "seconds_per_validation": round(seconds_per_validation, 2), "steps_per_epoch": loop.steps,
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


def guard_reserve(seconds_per_validation: float) -> float:
    """Seconds a budgeted run keeps in hand when the clock guard stops it: the validation of the epoch it stops
    in, the post-processing pass and a slack."""
    return 2 * seconds_per_validation + GUARD_SLACK_SECONDS


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


def _time_validation(loop) -> float:
    """Seconds of one validation pass (every validation case, on its own grid) with a copy of the model."""
    shadow = dataclasses.replace(loop.trained, model=copy.deepcopy(loop.trained.model))
    started = time.perf_counter()
    loop.validate(shadow)
    return time.perf_counter() - started
