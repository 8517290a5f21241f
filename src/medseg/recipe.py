"""The default recipe: what `medseg train DATA` trains when no flag says otherwise.

A dataset fingerprint (`medseg.plan.fingerprint`) is turned into one configuration, or into an ensemble of 2D
networks on different slicing planes trained side by side, by rules that each rest on a measurement in
docs/benchmarks.md (the reason written beside each choice names it):

- 2D networks everywhere on a CPU: on MSD Hippocampus the 2D recipe reached 0.818 validation Dice in 10 minutes
  where the planned 3D configuration reached 0.757 in 9 (and 0.846 / 0.834 in 30).
- Isotropic volumes: sagittal and coronal networks averaged, side by side on one core each (the best single plane
  was sagittal, 0.886 / 0.871; coronal 0.883 / 0.866; axial 0.881 / 0.856; the pair 0.896 / 0.880). With one core,
  the sagittal network alone. Anisotropic volumes: one network on the fine in-plane slices.
- Native resolution: slices padded (or randomly cropped) to the largest in-plane extent rounded up to 16, at most
  128 (thin vessels and membranes do not survive resizing; DRIVE: 128 crops at batch 16 beat 256 crops at batch 8,
  twice the optimiser steps for the same pixels; hippocampus coronal slices padded to 48 rather than 64 halved a
  step and scored higher). Larger samples, up to the median slice (nnU-Net's rule), only where timing shows the
  budget holding LARGE_SAMPLE_STEPS steps at their size: never on this CPU (CT-like whole slices: 228 steps, no
  lesion found), maybe on a GPU.
- Per-case z-score for everything but CT (DSB 2018: 0.858 against 0.814 with [0, 1] scaling).
- Adam 1e-3 with a poly decay over the steps the budget holds, Dice + cross-entropy, batch 16, no early stopping,
  mirroring TTA along the trained axes: the recipe of every bar met so far. Networks trained with quarter turns
  are also averaged over them at prediction (`medseg.infer.tta_rotates`; on the validation cases of ISBI, DRIVE
  and DSB each gained, by 0.0001-0.0013 Dice, at twice the prediction time: docs/benchmarks.md, TTA).
- Dice counts label 0 too where label 0 covers under half the pixels (ISBI's membranes, 22%): chosen on ISBI's
  validation images (1 - accuracy 0.0777 -> 0.0766, Dice unchanged); on its test images no better (0.0760 ->
  0.0767), docs/benchmarks.md. There the cross-entropy also weighs pixels where objects come close up to 11x
  (the U-Net paper's weight map): validation 1 - accuracy 0.0771 -> 0.0762, Dice 0.9504 -> 0.9511 (a trial and
  the default's own run alike); test images unchanged (0.0757 -> 0.0758 and 0.0759).
- Mirroring only along axes where no two classes lie in a fixed order (hippocampus: left-right only). A network
  that may not be mirrored at all rotates (up to 30 degrees) and scales (0.7-1.3) half its samples instead of
  30% by 15 degrees and 0.85-1.15: the hippocampus sagittal network's gap between training and validation Dice
  fell from 0.04 to 0.01 and the pair's validation Dice held (0.8875 -> 0.8876; docs/benchmarks.md).
- 90-degree rotations only for 2D data with no up: a foreground atlas that is flat (cells, membranes) or looks the
  same when turned (a fundus); on the hippocampus, rotations cost 0.07 Dice in an 8-minute A/B.
- 2D networks on volumes see each slice with one neighbour on both sides as extra channels (2.5D, `--context 1`):
  on MSD Hippocampus the coronal network's best validation Dice rose from 0.8849 / 0.8842 to 0.8912 / 0.8937 (two
  initial seeds, 30 minutes each, at the same cost per step) and the pair's by 0.0026 / 0.0031; the sagittal
  network neither gained nor lost (the pair +-0.0006; docs/benchmarks.md).
- Width 16, or 8 where timing training steps on this device shows that the budget would show the network fewer
  pixels than `medseg.plan.MIN_SAMPLES` 64x64 slices at 16 (hippocampus: width 16 seeing 45k slices in 15 minutes
  reached 0.83, width 32 seeing 18k reached 0.67).
"""
from __future__ import annotations

import math
import os

import numpy as np

from medseg.config import TrainConfig
from medseg.plan import (calibrate_width, choose_normalization, choose_target_spacing, class_count, mirror_axes,
                         time_augmentation)

MAX_SIDE = 128
WIDTHS = (8, 16)  # 16 is every measured recipe's width; 8 only where the budget holds too few samples for 16
BATCH = 16
DEPTH = 4
PLANES = {"LR": "sagittal", "AP": "coronal", "SI": "axial"}
# a flat foreground atlas (structures anywhere) or one that looks the same turned by 90 degrees: no up
FLAT_ATLAS, ROTATION_ALIKE = 0.5, 0.5
BACKGROUND_MAJORITY = 0.5  # below this share label 0 is a structure, and Dice counts it too
BORDER_WEIGHT = 10.0  # and the CE weighs where objects come close up to 11x: the U-Net paper's w0
# a network that may not be mirrored at all (classes in a fixed order along every in-plane axis) sees fewer distinct
# views of its cases: stronger rotations and scalings (nnU-Net's ranges) make up for the mirrors it loses
UNMIRRORED_AFFINE = {"affine_p": 0.5, "max_rotation": 30.0, "max_scale": 0.3}
USUAL_AFFINE = {name: getattr(TrainConfig, name) for name in UNMIRRORED_AFFINE}  # TrainConfig's defaults
# a 2D network cut from a volume sees each slice with this many neighbours on both sides as extra channels (2.5D):
# some of the third dimension at the cost of a wider first convolution
CONTEXT = 1


def default_configuration(fp: dict, data: str, options: dict, budget_minutes: float, device: str = "cpu",
                          cores: int | None = None, calibrate: bool = True) -> tuple[dict, dict]:
    """The default configuration for a fingerprint: {"members": {name: settings}} (one member for a single
    network) and the reasons, each naming the measurement behind it."""
    cores = cores or os.cpu_count() or 1
    normalization, why_norm = choose_normalization(fp)
    mirrored, why_mirror = mirror_axes(fp)
    loss, border_weight, why_loss = _loss(fp)
    common = {"data": str(data), **options, "normalization": normalization, "fit": "pad", "depth": DEPTH,
              "loss": loss, "border_weight": border_weight, "optimizer": "adam", "lr": 1e-3, "lr_schedule": "poly",
              "patience": 0, "epochs": 100_000, "batch_size": BATCH, "mirror_tta": True, "time_budget": budget_minutes,
              "intensity_stats": fp["foreground_intensity"] if normalization == "ct" else None}
    reasons = {"normalization": why_norm, "mirroring": why_mirror, "loss": why_loss,
               "network": "2D U-Net, depth 4, Adam 1e-3 poly, Dice + CE, batch 16, TTA over the trained flips (and "
                          "quarter turns where training turned): the recipe of every accuracy bar met on this CPU "
                          "(docs/benchmarks.md)"}
    if fp["dims"] == 2:
        rotate, reasons["rotate90"] = _no_up(fp)
        members = {"2d": {**common, "size": _side(fp["shape"]["max"]), "rotate90": rotate,
                          "flip_axes": mirrored}}
        reasons["layout"] = "2D images: one network at native resolution"
    else:
        members, reasons["layout"] = _volume_members(fp, common, mirrored, cores)
        reasons["context"] = (f"{_context_words(CONTEXT)}, as extra channels: on MSD Hippocampus the coronal "
                              "network's validation Dice rose by 0.006-0.010 at the same cost per step "
                              "(docs/benchmarks.md)")
    threads = max(1, cores // len(members))
    for name, settings in members.items():
        settings["threads"] = threads
        if settings["flip_axes"] == []:
            settings.update(UNMIRRORED_AFFINE)
            reasons[f"{name}_augmentation"] = f"no axis may be mirrored: {affine_words(UNMIRRORED_AFFINE)} " \
                f"(otherwise {affine_words(USUAL_AFFINE)}) make up for the views the mirrors would have added"
        planned = TrainConfig(**settings)  # the sample's sides and inputs as training will read them
        sample = list(planned.patch_size)
        settings["depth"] = _depth(min(sample))
        width, timings = 16, {}
        if calibrate:
            inputs = fp["channels"] * planned.slices_per_input  # a slice and its neighbours
            width, timings = calibrate_width(2, sample, settings["depth"], inputs, class_count(fp), BATCH,
                                             budget_minutes, device, threads=threads, widths=WIDTHS, norm="batch",
                                             activation="relu")
        settings["base_channels"] = width
        reasons[f"{name}_width"] = {"chosen": width, "timings": timings, "threads": threads}
        if timings and settings.get("target_spacing"):
            pixels_per_second = BATCH * math.prod(sample) / timings[str(width)]["seconds_per_step"]
            reasons[f"{name}_resolution"] = coarser_in_plane(fp, settings, pixels_per_second, budget_minutes)
        if timings:
            def seconds_per_step(sides: list[int]) -> float:  # the network's step and the CPU's augmentation
                timed = calibrate_width(2, sides, _depth(min(sides)), inputs, class_count(fp), BATCH, budget_minutes,
                                        device, threads=threads, widths=(width,), norm="batch", activation="relu")
                augmenting = time_augmentation(BATCH, inputs, sides, threads, affine_p=planned.affine_p,
                                               max_rotation_deg=planned.max_rotation, max_scale=planned.max_scale,
                                               rotate90=planned.rotate90, flip_axes=planned.flip_axes,
                                               elastic_p=planned.elastic_p)
                return timed[1][str(width)]["seconds_per_step"] + augmenting
            reasons[f"{name}_sample"] = larger_sample(fp, settings, timings[str(width)]["seconds_per_step"],
                                                      seconds_per_step, budget_minutes)
            settings["depth"] = _depth(min(settings.get("patch") or [settings["size"]]))
    return {"members": members}, reasons


def _volume_members(fp: dict, common: dict, mirrored: list[int], cores: int) -> tuple[dict, str]:
    spacing = fp["spacing"]["median"]
    planes = _plane_axes(fp.get("orientation", ""))
    if max(spacing) > 2 * min(spacing):
        axis = int(np.argmax(spacing))
        chosen = {PLANES.get(_pair(fp.get("orientation", ""), axis), f"axis{axis}"): axis}
        why = (f"anisotropic volumes (spacing {spacing} mm): one 2D network on the in-plane slices, cut along "
               f"axis {axis}")
    else:
        order = [p for p in ("sagittal", "coronal", "axial") if p in planes]
        chosen = {p: planes[p] for p in order[:min(2, cores)]}
        why = (f"isotropic volumes: {' and '.join(chosen)} 2D networks"
               f"{', averaged, trained side by side' if len(chosen) > 1 else ''} (on MSD Hippocampus sagittal was "
               "the best single plane and sagittal + coronal averaged beat it: docs/benchmarks.md)")
    target, why_spacing = target_spacing(fp)
    # the largest extent in voxels at the spacing the network works at
    largest = [e / t for e, t in zip(fp["extent_mm"]["max"], target)] if target else fp["shape"]["max"]
    members = {}
    for name, axis in chosen.items():
        in_plane = [a for a in range(3) if a != axis]
        sides = [_side([largest[a]]) for a in in_plane]
        members[name] = {**common, "dims": 2, "axis": axis, "size": max(sides), "context": CONTEXT,
                         "flip_axes": [i for i, a in enumerate(in_plane) if a in mirrored], "target_spacing": target}
        if len(set(sides)) > 1:  # each side padded only as far as it needs, no steps spent on padding (nnU-Net's
            members[name]["patch"] = sides  # patches are not square either); 2D image sets, maybe turned, stay square
    return members, f"{why}; {why_spacing}"


SPACING_SPREAD = 1.05  # spacings further apart than this across cases are resampled to one
# In-plane resolution for the budget: the finest of these coarsenings of the target spacing at which the budget's
# optimiser steps show the network at least COVERAGE times the training slices' pixels. On the CT-like set (20
# minutes, width 16 at 0.61 Mpx/s here) that is 1.6 mm for 0.8 mm scans (coverage 3.1; 0.77 at 0.8 mm). Measured
# there on the 8 validation cases, the same 1,550 steps at 128 crops: 1.6 mm organ 0.979 / lesion 0.919, 0.8 mm
# 0.970 / 0.869 with four times the prediction cost (docs/benchmarks.md, CT). Small sets (hippocampus, 2D images)
# are covered many times over and keep their resolution, and so does CT on a GPU (coverage 11).
COARSENINGS = (1.0, 1.5, 2.0, 3.0, 4.0)
COVERAGE = 2.5
TRAINING_SHARE = 0.8  # of the budget, spent in optimiser steps


def coarser_in_plane(fp: dict, settings: dict, pixels_per_second: float, budget_minutes: float) -> str:
    """Coarsen a 2D member's in-plane target spacing (and its sample sides) as COVERAGE asks; returns why."""
    axis = settings["axis"] % 3
    target = settings["target_spacing"]
    extent = fp["extent_mm"]["median"]
    seen = pixels_per_second * budget_minutes * 60 * TRAINING_SHARE
    for factor in COARSENINGS:
        spacing = [t * factor if a != axis else t for a, t in enumerate(target)]
        pixels = fp["cases"] * math.prod(e / s for e, s in zip(extent, spacing))
        if seen >= COVERAGE * pixels or factor == COARSENINGS[-1]:
            break
    if factor > 1:
        settings["target_spacing"] = [round(s, 4) for s in spacing]
        in_plane = [a for a in range(3) if a != axis]
        sides = [_side([fp["extent_mm"]["max"][a] / spacing[a]]) for a in in_plane]
        settings["size"] = max(sides)
        settings.pop("patch", None)
        if len(set(sides)) > 1:
            settings["patch"] = sides
    return (f"in-plane {_mm([spacing[a] for a in range(3) if a != axis])} mm: the budget shows the network "
            f"{seen / 1e6:.0f} Mpx, {seen / pixels:.1f} times the training slices' {pixels / 1e6:.0f} Mpx there "
            f"(at least {COVERAGE:g} asked; finer spacings fall short)" if factor > 1 else
            f"in-plane at the target spacing: the budget shows the network {seen / pixels:.1f} times the training "
            f"slices' pixels")


# Samples larger than MAX_SIDE (whole slices or large crops) only where the budget still holds LARGE_SAMPLE_STEPS
# optimiser steps of batch 16 at that size. Everywhere measured on this CPU the smaller crop won at the same
# budget: CT-like whole slices (256 at 1.6 mm) 228 steps, no lesion found, against 1,558 steps of 128 crops, lesion
# 0.919; ISBI 256 crops at batch 4 and DRIVE 256 at batch 8 lost to 128 at batch 16 (docs/benchmarks.md). nnU-Net
# trains its 2D whole-slice patches for 250,000 steps; a tenth of that is asked here, which no CPU budget holds and
# a GPU's may. Candidate sides: the median slice (nnU-Net's patch rule), then the usual sizes below it.
LARGE_SAMPLE_STEPS = 25_000
LARGE_SIDES = (1024, 768, 512, 384, 256, 192)


def larger_sample(fp: dict, settings: dict, seconds_at_base: float, seconds_per_step, budget_minutes: float) -> str:
    """Grow a 2D member's sample towards its median slice where the budget allows (LARGE_SAMPLE_STEPS); returns
    why. `seconds_per_step(sides)` times a training step at other sides; it is called only for sides whose
    steps could reach the bar (a larger sample never steps faster than the base one), so a CPU times nothing."""
    seconds = budget_minutes * 60 * TRAINING_SHARE
    base = settings.get("patch") or [settings["size"]] * 2
    whole = median_slice(fp, settings)
    candidates = sorted({max(whole)} | {s for s in LARGE_SIDES if s < max(whole)}, reverse=True)
    for side in candidates:
        sides = [min(side, w) for w in whole]
        if settings.get("rotate90"):  # quarter turns need a square sample
            sides = [max(sides)] * 2
        if max(sides) <= max(base) or seconds / seconds_at_base < LARGE_SAMPLE_STEPS:
            continue
        steps = seconds / seconds_per_step(sides)
        if steps >= LARGE_SAMPLE_STEPS:
            settings["size"] = max(sides)
            settings.pop("patch", None)
            if len(set(sides)) > 1:
                settings["patch"] = sides
            whole_slices = all(s >= w for s, w in zip(sides, whole))
            return (f"{'whole slices' if whole_slices else 'large crops'} of {sample_words(settings)}: the "
                    f"budget holds {steps:,.0f} steps there (at least {LARGE_SAMPLE_STEPS:,} asked)")
    steps, words = seconds / seconds_at_base, "x".join(map(str, whole))
    if max(whole) <= max(base):
        return f"{sample_words(settings)} samples hold the median slice ({words}); {steps:,.0f} steps in the budget"
    return (f"{sample_words(settings)} crops: the budget holds {steps:,.0f} steps of them; larger ones (the median "
            f"slice is {words}) need {LARGE_SAMPLE_STEPS:,} steps at their size")


def median_slice(fp: dict, settings: dict) -> list[int]:
    """A 2D member's median slice in pixels at the spacing it trains at, each side rounded up to 2**DEPTH."""
    if fp["dims"] == 2:
        extents = fp["shape"]["median"][-2:]
    else:
        axis = settings["axis"] % 3
        spacing = settings.get("target_spacing") or fp["spacing"]["median"]
        extents = [fp["extent_mm"]["median"][a] / spacing[a] for a in range(3) if a != axis]
    multiple = 2**DEPTH
    return [int(math.ceil(e / multiple) * multiple) for e in extents]


def target_spacing(fp: dict) -> tuple[list[float] | None, str]:
    """The spacing volumes are resampled to for the network where cases come at different spacings (from
    several scanners), by nnU-Net's rule (`medseg.plan.choose_target_spacing`: the median; the coarse axis at its
    10th percentile beyond 3x anisotropy); None where every case shares one spacing, which is kept."""
    low, high = fp["spacing"]["min"], fp["spacing"]["max"]
    if all(h <= SPACING_SPREAD * l for l, h in zip(low, high)):
        return None, f"one spacing in every case ({_mm(fp['spacing']['median'])} mm): kept"
    target, how = choose_target_spacing(fp)
    target = [round(float(t), 4) for t in target]
    return target, (f"spacings differ across cases ({_mm(low)} to {_mm(high)} mm): resampled to {_mm(target)} mm "
                    f"for the network ({how}); masks are written on each input's own grid")


def _mm(values) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def sample_words(settings: dict) -> str:
    """A 2D member's training sample in words: '64x48', or '128' for a square one."""
    return "x".join(map(str, settings["patch"])) if settings.get("patch") else str(settings["size"])


def _context_words(context: int) -> str:
    neighbours = "its neighbour" if context == 1 else f"{context} neighbours"
    return f"each slice stacked with {neighbours} on either side (2.5D)"


def affine_words(affine: dict) -> str:
    """Random rotations and scalings in words, from the TrainConfig settings affine_p, max_rotation, max_scale."""
    return (f"rotations up to {affine['max_rotation']:g} degrees and scalings of {1 - affine['max_scale']:g}-"
            f"{1 + affine['max_scale']:g} on {affine['affine_p']:.0%} of the samples")


def _plane_axes(orientation: str) -> dict[str, int]:
    """Plane name -> the voxel axis a slice of that plane is cut along, from axis codes such as 'RAS'; volumes
    without an orientation take axes 0, 1, 2 as sagittal, coronal, axial (RAS order)."""
    if len(orientation) != 3:
        return {"sagittal": 0, "coronal": 1, "axial": 2}
    return {PLANES[_pair(orientation, axis)]: axis for axis in range(3)}


def _pair(orientation: str, axis: int) -> str:
    if len(orientation) != 3:
        return ""
    return {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}[orientation[axis]]


def _side(extents: list[float]) -> int:
    """The largest extent rounded up to a multiple of 2**DEPTH, at most MAX_SIDE."""
    multiple = 2**DEPTH
    return int(min(MAX_SIDE, math.ceil(max(extents) / multiple) * multiple))


def _depth(side: int) -> int:
    """DEPTH poolings, fewer for small slices: the bottleneck keeps at least 2x2 pixels."""
    depth = DEPTH
    while depth > 1 and side / 2**depth < 2:
        depth -= 1
    return depth


def _loss(fp: dict) -> tuple[str, float, str]:
    """Dice + CE with Dice over the foreground classes, or, where label 0 is not the majority, over every class
    and with the cross-entropy weighted to where objects come close (the U-Net paper's map, w0 BORDER_WEIGHT):
    then "background" is a structure of its own (EM membranes, 22% of ISBI's pixels) that a Dice over the other
    classes alone rewards calling foreground, and its thin stretches between objects are where the errors lie."""
    share = fp["class_frequency"].get("0", 1.0)
    if share < BACKGROUND_MAJORITY:
        return "dice_ce_all", BORDER_WEIGHT, (
            f"label 0 covers {share:.0%} of the pixels, a structure rather than background: Dice over every class, "
            f"label 0 included, + CE weighted up to {1 + BORDER_WEIGHT:g}x where objects come close (U-Net's map)")
    return "dice_ce", 0.0, f"label 0 covers {share:.0%} of the pixels: Dice over the foreground classes + CE"


def _no_up(fp: dict) -> tuple[bool, str]:
    layout = fp.get("foreground_layout") or {}
    if not layout:
        return False, "no layout measured: no rotations"
    if fp["class_order"]:
        return False, "two classes lie in a fixed order: the data has an up, no rotations"
    flat = layout["structure"] < FLAT_ATLAS
    alike = layout["rotation_similarity"] >= ROTATION_ALIKE
    if flat or alike:
        what = "lies anywhere (flat atlas)" if flat else "looks the same turned by 90 degrees"
        return True, (f"the foreground {what}: structure {layout['structure']}, rotation similarity "
                      f"{layout['rotation_similarity']}; rotations by 90 degrees add views without teaching "
                      "anything false (ISBI, DSB, DRIVE)")
    return False, (f"the foreground has a place and an up (structure {layout['structure']}, rotation similarity "
                   f"{layout['rotation_similarity']}): no rotations, which cost 0.07 Dice on anatomy")


_LOSS_WORDS = {"dice_ce": "Dice + CE", "dice_ce_all": "Dice (label 0 included) + CE"}


def _loss_words(settings: dict) -> str:
    words = _LOSS_WORDS.get(settings["loss"], settings["loss"])
    weight = settings.get("border_weight")
    return f"{words} weighted up to {1 + weight:g}x where objects come close" if weight else words


def describe(configuration: dict, reasons: dict) -> str:
    """One paragraph for the person who ran `medseg train DATA`: what was chosen and why, in short."""
    members = configuration["members"]
    first = next(iter(members.values()))
    if len(members) > 1:
        shape = " and ".join(f"{name} slices padded to {sample_words(m)}" for name, m in members.items())
        layout = f"{len(members)} 2D networks averaged ({shape}), side by side on {first['threads']} core(s) each"
    else:
        name, m = next(iter(members.items()))
        layout = f"one 2D network ({name}, padded or cropped to {sample_words(m)})"
    larger = [reasons[f"{name}_sample"].split(":")[0] for name, m in members.items() if m["size"] > MAX_SIDE]
    layout += f" ({', '.join(larger)}, as the budget holds enough steps)" if larger else ""
    widths = ", ".join(str(m["base_channels"]) for m in members.values())
    flips = "; ".join(f"{name} along {m['flip_axes'] or 'no axis'}" for name, m in members.items())
    extras = "; 90-degree rotations" if first.get("rotate90") else ""
    extras += f"; {_context_words(first['context'])}" if first.get("context") else ""
    stronger = [name for name, m in members.items() if m.get("affine_p")]
    extras += f"; wider rotations and scalings for {', '.join(stronger)} (never mirrored)" if stronger else ""
    loss = _loss_words(first)
    if first.get("target_spacing"):
        coarser = any(not reasons.get(f"{name}_resolution", "in-plane at").startswith("in-plane at")
                      for name in members)
        layout += (f", resampled to {_mm(first['target_spacing'])} mm (cases come at several spacings"
                   f"{'; in-plane coarser than the median, for what the budget can train' if coarser else ''})")
    norm = first["normalization"]
    if norm == "ct" and "recognised" in reasons.get("normalization", ""):
        norm = "CT (recognised from the intensities: no file said CT)"
    return (f"Plan: {layout}; {norm} intensities; width {widths} (timed here); mirrored {flips} "
            f"({reasons['mirroring']}){extras}; Adam 1e-3 poly, {loss}, batch {first['batch_size']}, "
            f"{first['time_budget']:g} min. Every reason: plan.json in the run folder.")
