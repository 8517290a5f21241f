"""Fingerprint a dataset and turn it into a readable plan: the settings training will use, with the reasons.

`medseg plan DATA` writes plan.json: the fingerprint (shapes, spacings, foreground intensities, class frequencies,
modality) and one or more configurations (`2d`, `3d`, and the seed's recipe `seed_2d`), each a complete set of
training settings. `medseg train DATA --plan plan.json --configuration 3d` reads only that.

Rules, after nnU-Net, sized for the device at hand:
- dims: `3d` for volumes, `2d` always (volumes as slices along their coarsest axis).
- target spacing (volumes): the median spacing; for anisotropic data the coarse axis takes its 10th percentile.
- patch: the median case shape rounded up to a multiple of 2**depth, capped by a voxel budget; depth: pool while
  every side of the patch stays at least 4 voxels, at most 5 times.
- normalisation: CT -> clip to the dataset's foreground 0.5-99.5 percentiles, z-score with its foreground mean/std;
  8-bit 2D data -> divide by 255; MRI and everything else -> per-case z-score.
- width and batch: calibrated by timing a few training steps on the device for candidate widths; the widest that
  still sees `min_samples` training samples within the time budget wins.
- mirroring: every axis, except one along which two classes lie in a fixed order (the anterior hippocampus in
  front of the posterior one in at least 95% of cases, centroids at least 5% of the extent apart): a mirror there
  would show the network each class where the other belongs.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from medseg.config import TrainConfig
from medseg.console import flush_notes, progress, show_bars
from medseg.data import check_same_grid, read_case_image, read_label
from medseg.datasets import Case, Dataset, detect_grey_levels, find_cases, split_dataset
from medseg.transforms import reorient, reoriented_spacing

PATCH_VOXELS = {2: 256 * 256, 3: 96 * 96 * 96}  # caps that keep one CPU step around a second
# Samples a budget should cover for the chosen width. 2D: on the hippocampus, width 32 seeing 18k slices in 15
# minutes reached Dice 0.67 where width 16 seeing 45k reached 0.83 (docs/benchmarks.md); provisional until the
# accuracy benchmark tunes it.
MIN_SAMPLES = {2: 50_000, 3: 2_000}
# ... of this size: the rule counts pixels seen (samples x patch pixels), so that a 128x128 crop counts four times
# a 64x64 slice (DRIVE's hand recipe: width 16 at 128x128 crops met its bar; per sample the rule picked width 8)
REFERENCE_PIXELS = {2: 64 * 64, 3: 40 * 56 * 40}
WIDTHS = (8, 16, 32)


def fingerprint(dataset: Dataset, samples_per_case: int = 5_000, seed: int = 0,
                reading: TrainConfig | None = None, cases: list[Case] | None = None) -> dict:
    """Shapes, spacings, dtype, per-channel foreground intensity statistics and class frequencies of `cases`
    (default: all of the dataset's); masks are read by the rules of `reading` (binary masks, mask threshold, grey
    levels, .npy layout). Volumes are measured in the voxel order of the first case, as training reorients them."""
    reading = reading or TrainConfig()
    cases = dataset.cases if cases is None else cases
    rng = np.random.default_rng(seed)
    facts, counts, foreground, orientation = [], {}, None, None
    for case in progress(cases, "planning: reading cases", show_bars(True)):
        image = read_case_image(case.images, "keep", reading.npy_layout)
        mask, label = read_label(case, reading)
        check_same_grid(case, image, mask)
        orientation = orientation or image.orientation
        facts.append(_case_facts(image, label, orientation))
        for value, n in enumerate(np.bincount(label.ravel())):
            if n:
                counts[value] = counts.get(value, 0) + int(n)
        voxels = image.array[:, label > 0]
        if voxels.shape[1] > samples_per_case:
            voxels = voxels[:, rng.choice(voxels.shape[1], samples_per_case, replace=False)]
        foreground = voxels if foreground is None else np.concatenate([foreground, voxels], 1)
    shapes, spacings = [f["shape"] for f in facts], [f["spacing"] for f in facts]
    extents = [[n * s for n, s in zip(f["shape"], f["spacing"])] for f in facts]
    total = sum(counts.values())
    atlas = [f["atlas"] for f in facts if f["atlas"] is not None]
    return {
        "cases": len(cases), "cases_read": [case.case_id for case in cases], "layout": dataset.layout,
        "dims": len(shapes[0]),
        "channels": int(foreground.shape[0]) if foreground is not None else 1,
        "modality": dataset.modalities, "dtypes": sorted({f["dtype"] for f in facts}),
        "dicom_modality": sorted({f["dicom_modality"] for f in facts if f["dicom_modality"]}),
        "air_share": float(np.median([f["air_share"] for f in facts])),
        "class_names": dataset.class_names,
        "shape": {"median": np.median(shapes, 0).tolist(), "min": np.min(shapes, 0).tolist(),
                  "max": np.max(shapes, 0).tolist()},
        "spacing": {"median": np.median(spacings, 0).tolist(), "min": np.min(spacings, 0).tolist(),
                    "max": np.max(spacings, 0).tolist(), "p10": np.percentile(spacings, 10, 0).tolist()},
        "extent_mm": {"median": np.median(extents, 0).tolist(), "max": np.max(extents, 0).tolist()},
        "class_frequency": {str(k): counts[k] / total for k in sorted(counts)},
        "class_order": class_order([f["centroids"] for f in facts]),
        "orientation": orientation or "",
        "foreground_layout": foreground_layout(atlas) if atlas else None,
        "foreground_intensity": [_intensity_stats(channel) for channel in foreground] if foreground is not None
        and foreground.shape[1] else [],
    }


AIR_HU = (-1100, -900)  # integer voxels in this range are air in Hounsfield units: how CT shows without metadata


def _case_facts(image, label: np.ndarray, orientation: str | None) -> dict:
    """One case's shape, spacing and class centroids in the voxel order `orientation` (as training reorients
    volumes), its dtype, DICOM modality, share of air-like voxels and, for 2D, its small foreground mask."""
    turned = bool(image.orientation) and image.orientation != orientation
    first = image.array[0]
    integer = np.issubdtype(first.dtype, np.integer)
    return {
        # shape and spacing permute as the voxel axes do (reoriented_spacing reorders any per-axis values)
        "shape": [round(n) for n in reoriented_spacing(image.spatial_shape, image.affine, orientation)]
        if turned else list(image.spatial_shape),
        "spacing": list(reoriented_spacing(image.spacing, image.affine, orientation)) if turned
        else list(image.spacing),
        "centroids": _class_centroids(reorient(label, image.affine, orientation) if turned else label),
        "atlas": _small_mask(label > 0) if label.ndim == 2 else None,
        "dtype": str(image.array.dtype),
        "dicom_modality": image.meta.get("modality", "") if image.meta else "",
        "air_share": float(((first >= AIR_HU[0]) & (first <= AIR_HU[1])).mean()) if integer else 0.0,
    }


def class_count(fp: dict) -> int:
    """Output classes, background included: those named, or as many as the largest label seen needs."""
    return max(len(fp["class_names"]), int(max(map(int, fp["class_frequency"]))) + 1)


def _small_mask(mask: np.ndarray, side: int = 64) -> np.ndarray:
    """A 2D mask averaged down to side x side (area interpolation): where the foreground lies, at any size."""
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(tensor, size=(side, side), mode="area")[0, 0].numpy()


def foreground_layout(masks: list[np.ndarray]) -> dict:
    """How the foreground is laid out across 2D cases: the mean mask (an atlas), its structure (coefficient of
    variation: near 0 when structures lie anywhere, as cells or membranes do) and how much it looks like itself
    turned by 90 degrees (the lowest correlation of the centred atlas with its three rotations: near 1 for a
    fundus, whose vessels fill a disc; low for lungs in a chest X-ray, which have an up)."""
    atlas = np.mean(masks, 0)
    centred = atlas - atlas.mean()
    energy = float((centred**2).sum())
    rotations = [float((centred * np.rot90(centred, k)).sum() / energy) if energy > 0 else 1.0 for k in (1, 2, 3)]
    return {"structure": round(float(atlas.std() / max(atlas.mean(), 1e-9)), 3),
            "rotation_similarity": round(min(rotations), 3)}


def _class_centroids(label: np.ndarray) -> dict[int, np.ndarray]:
    """Centre of mass of each foreground class as a fraction of the extent along every axis (sums over the
    foreground voxels only: 40x faster than over the volume on CT-sized cases)."""
    flat = np.flatnonzero(label)
    values = label.ravel()[flat].astype(np.int64)
    counts = np.bincount(values)
    sums = [np.bincount(values, weights=axis, minlength=len(counts)) for axis in np.unravel_index(flat, label.shape)]
    return {int(v): (np.array([s[v] / counts[v] for s in sums]) + 0.5) / np.array(label.shape)
            for v in np.flatnonzero(counts) if v > 0}


def class_order(centroids: list[dict[int, np.ndarray]], agreement: float = 0.95, min_gap: float = 0.05) -> list:
    """Axes along which two classes lie in a fixed order: class a before class b in at least `agreement` of the
    cases holding both (or after it), their centroids a median of at least `min_gap` of the extent apart."""
    found = []
    classes = sorted({k for case in centroids for k in case})
    for i, a in enumerate(classes):
        for b in classes[i + 1:]:
            gaps = np.array([case[b] - case[a] for case in centroids if a in case and b in case])
            if len(gaps) == 0:
                continue
            for axis in range(gaps.shape[1]):
                before = float((gaps[:, axis] > 0).mean())
                gap = float(np.median(np.abs(gaps[:, axis])))
                if max(before, 1 - before) >= agreement and gap >= min_gap:
                    found.append({"axis": axis, "classes": [a, b], "a_before_b": round(before, 3),
                                  "median_gap": round(gap, 3)})
    return found


def mirror_axes(fp: dict) -> tuple[list[int], str]:
    """The axes (of the whole image or volume) that training may mirror, and why."""
    fixed = sorted({entry["axis"] for entry in fp["class_order"]})
    axes = [a for a in range(fp["dims"]) if a not in fixed]
    if not fixed:
        return axes, "every axis: no two classes lie in a fixed order along any of them"
    names = dict(enumerate(fp.get("class_names") or []))
    pairs = "; ".join(" and ".join(names.get(k, f"class {k}") for k in e["classes"]) + f" along axis {e['axis']} "
                      f"(same order in {max(e['a_before_b'], 1 - e['a_before_b']):.0%} of cases)"
                      for e in fp["class_order"])
    return axes, f"not along axes {fixed}, where a mirror would swap the classes' places: {pairs}"


def _intensity_stats(values: np.ndarray) -> dict:
    values = values.astype(np.float64)
    p00_5, median, p99_5 = np.percentile(values, [0.5, 50, 99.5])
    return {"mean": float(values.mean()), "std": float(values.std()), "median": float(median),
            "p00_5": float(p00_5), "p99_5": float(p99_5)}


def choose_target_spacing(fp: dict) -> tuple[list[float], str]:
    """The median spacing; for anisotropic data (coarsest axis over 3x the finest) the coarse axis takes its
    10th percentile instead, so that few cases are upsampled along it by interpolation (nnU-Net's rule)."""
    target = list(fp["spacing"]["median"])
    coarse = int(np.argmax(target))
    if target[coarse] > 3 * min(target):
        target[coarse] = fp["spacing"]["p10"][coarse]
        return target, f"anisotropic: median spacing, axis {coarse} at its 10th percentile"
    return target, "median spacing of the cases"


CT_AIR_SHARE = 0.01  # a median share of air-like integer voxels above this reads as CT (air outside the body)


def choose_normalization(fp: dict) -> tuple[str, str]:
    modalities = " ".join(fp["modality"] + fp.get("dicom_modality", [])).lower()
    why = "Hounsfield units are comparable across scans, so dataset-wide foreground statistics"
    if "ct" in modalities.split():
        return "ct", f"CT (said by {'dataset.json' if 'ct' in ' '.join(fp['modality']).lower() else 'DICOM'}): {why}"
    integer = all(np.issubdtype(np.dtype(t), np.integer) for t in fp["dtypes"])
    if fp["dims"] == 3 and integer and fp.get("air_share", 0) >= CT_AIR_SHARE:
        return "ct", (f"CT, recognised from the intensities: integers, {fp['air_share']:.0%} of the voxels (median "
                      f"over cases) between {AIR_HU[0]} and {AIR_HU[1]}, air in Hounsfield units: {why}")
    if fp["dims"] == 2:
        return "zscore", ("2D images (8-bit photographs, microscopy): per-image z-score; measured against [0, 1] "
                          "scaling on DSB 2018 nuclei (foreground IoU 0.858 against 0.814, docs/benchmarks.md), "
                          "where stain and exposure vary from image to image")
    return "zscore", "uncalibrated intensities (MRI, microscopy): per-case z-score"


def patch_and_depth(shape: list[float], dims: int, max_depth: int = 5) -> tuple[list[int], int]:
    """Median shape rounded up to a multiple of 2**depth, shrunk (largest side first) to the voxel budget."""
    patch = [int(math.ceil(s)) for s in shape]
    while math.prod(patch) > PATCH_VOXELS[dims]:
        largest = int(np.argmax(patch))
        patch[largest] = int(patch[largest] * 0.9)
    depth = 0
    while depth < max_depth and min(patch) / 2 ** (depth + 1) >= 4:
        depth += 1
    multiple = 2**depth
    return [int(math.ceil(p / multiple) * multiple) for p in patch], depth


def calibrate_width(dims: int, patch: list[int], depth: int, channels: int, classes: int, batch: int,
                    budget_minutes: float, device: str = "cpu", steps: int = 2, threads: int | None = None,
                    widths: tuple[int, ...] = WIDTHS, norm: str = "instance", activation: str = "leaky_relu"
                    ) -> tuple[int, dict]:
    """Time a few training steps per candidate width (on `threads` CPU threads, as the run will use); return the
    widest that sees as many pixels as MIN_SAMPLES samples of REFERENCE_PIXELS (else the narrowest), and the
    timings."""
    from medseg.checkpoint import torch_threads
    from medseg.models import UNet, place

    timings, chosen = {}, widths[0]
    target = torch.device(device)
    with torch_threads(threads):
        for width in widths:
            model = place(UNet(channels, classes, width, depth, spatial_dims=dims, norm=norm, activation=activation),
                          target)  # in the layout training will use
            seconds = _time_width(model, batch, channels, classes, patch, target, steps)
            samples = budget_minutes * 60 / seconds * batch
            timings[str(width)] = {"seconds_per_step": round(seconds, 4), "samples_in_budget": int(samples)}
            if samples * math.prod(patch) >= MIN_SAMPLES[dims] * REFERENCE_PIXELS[dims]:
                chosen = width
    return chosen, timings


def time_augmentation(batch: int, channels: int, patch: list[int], threads: int | None = None, repeats: int = 2,
                      **settings) -> float:
    """Seconds to augment one batch on the CPU (`medseg.augment.augment` with `settings`), which a step on any
    device waits for: on a GPU it, not the network, bounds large samples (16 x 512 x 512: about 0.25 s here)."""
    from medseg.augment import augment
    from medseg.checkpoint import torch_threads

    generator = torch.Generator().manual_seed(0)
    image, label = torch.rand(batch, channels, *patch), torch.zeros(batch, *patch, dtype=torch.long)
    with torch_threads(threads):
        augment(image, label, generator, **settings)  # the first call allocates
        started = time.perf_counter()
        for _ in range(repeats):
            augment(image, label, generator, **settings)
    return (time.perf_counter() - started) / repeats


def _time_width(model, batch: int, channels: int, classes: int, patch: list[int], target, steps: int) -> float:
    """Seconds per training step of `model` on random data, the first (allocating) step not counted."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.rand(batch, channels, *patch, device=target)
    y = torch.randint(0, classes, (batch, *patch), device=target)
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


def make_plan(data: str | Path, budget_minutes: float = 15.0, device: str = "cpu", calibrate: bool = True,
              data_options: dict | None = None, alternatives: bool = True, cores: int | None = None,
              seed: int = 0, test_fraction: float = 0.2) -> dict:
    """Fingerprint DATA and plan its configurations; the result is what `plan.json` holds. `data_options` are
    the reading flags (images, masks, binary_masks, mask_threshold, npy_layout), kept in every configuration.

    The test cases a run with this `seed` and `test_fraction` holds out are split off first and never read: the
    fingerprint, and every rule that reads it, sees the training and validation cases only (the fingerprint
    lists them, and `held_out` says which were left unread and why).

    `auto` (the default, `medseg.recipe`) is what `medseg train DATA` trains: one network or an ensemble of
    slicing planes. With `alternatives`, nnU-Net-style `2d` and `3d` configurations and the seed's recipe
    `seed_2d` are planned beside it."""
    from medseg.recipe import default_configuration

    options = {k: v for k, v in (data_options or {}).items() if v is not None}
    reading = TrainConfig(**options)
    dataset = find_cases(data, reading.images, reading.masks, reading.allow_unmatched)
    split = split_dataset(dataset, seed=seed, test_fraction=test_fraction)
    # training cases first: the first one's voxel order is the one a run trains in
    read = [c for role in ("train", "val") for c in dataset.cases if c.case_id in set(split[role])]
    if reading.mask_levels is None:  # classes coded as grey levels: found once here, read so by every run
        reading.mask_levels = options["mask_levels"] = detect_grey_levels(read, dataset.declared_labels, reading)
    fp = fingerprint(dataset, reading=reading, cases=read)
    fp["held_out"] = {"test": split["test"], "seed": seed, "test_fraction": test_fraction,
                      "why": "the test cases of this seed's split: split off before planning, never read"}
    auto, reasons = default_configuration(fp, str(data), options, budget_minutes, device, cores, calibrate)
    configurations = {"auto": auto}
    if alternatives:
        more, more_reasons = _alternative_configurations(fp, str(data), options, budget_minutes, device, calibrate)
        configurations.update(more)
        reasons["alternatives"] = more_reasons
    flush_notes()
    return {"fingerprint": fp, "configurations": configurations, "reasons": reasons, "default": "auto",
            "device": device}


def _alternative_configurations(fp: dict, data: str, options: dict, budget_minutes: float, device: str,
                                calibrate: bool) -> tuple[dict, dict]:
    """nnU-Net-style `2d` and (for volumes) `3d` configurations, and the seed's recipe `seed_2d`."""
    normalization, why_norm = choose_normalization(fp)
    classes = class_count(fp)
    common = {"data": data, **options, "normalization": normalization, "norm": "instance",
              "activation": "leaky_relu", "loss": "dice_ce", "optimizer": "sgd", "lr": 1e-2, "lr_schedule": "poly",
              "patience": 0, "epochs": 1000, "steps_per_epoch": 100, "time_budget": budget_minutes,
              "intensity_stats": fp["foreground_intensity"] if normalization == "ct" else None}
    configurations, reasons = {}, {"normalization": why_norm}
    mirrored, reasons["mirroring"] = mirror_axes(fp)
    shapes = fp["shape"]["median"]
    if fp["dims"] == 3:
        common["target_spacing"], reasons["target_spacing"] = choose_target_spacing(fp)
        shapes = [n * s / t for n, s, t in zip(shapes, fp["spacing"]["median"], common["target_spacing"])]
        patch, depth = patch_and_depth(shapes, 3)
        configurations["3d"] = {**common, "dims": 3, "patch": patch, "depth": depth, "batch_size": 2,
                                "flip_axes": mirrored}
        axis = int(np.argmax(fp["spacing"]["median"])) if max(fp["spacing"]["median"]) > 2 * min(
            fp["spacing"]["median"]) else 2
        in_plane = [s for i, s in enumerate(shapes) if i != axis]
        reasons["2d_axis"] = f"slices along axis {axis} ({'coarsest spacing' if axis != 2 else 'isotropic enough'})"
    else:
        axis, in_plane = -1, shapes
    patch2d, depth2d = patch_and_depth(in_plane, 2)
    slice_axes = [a for a in range(fp["dims"]) if a != axis % fp["dims"]] if fp["dims"] == 3 else [0, 1]
    configurations["2d"] = {**common, "dims": 2, "axis": axis, "fit": "pad", "size": max(patch2d), "depth": depth2d,
                            "batch_size": int(min(32, max(4, 2**20 // math.prod(patch2d)))),
                            "flip_axes": [i for i, a in enumerate(slice_axes) if a in mirrored]}
    if len(set(patch2d)) > 1:  # as nnU-Net's 2d patches: each side as long as the median slice needs, no square pad
        configurations["2d"]["patch"] = patch2d
    for name, settings in configurations.items():
        dims = settings["dims"]
        patch = list(TrainConfig(**settings).patch_size)
        width, timings = (16, {})
        if calibrate:
            width, timings = calibrate_width(dims, patch, settings["depth"], fp["channels"], classes,
                                             settings["batch_size"], budget_minutes, device)
        settings["base_channels"] = width
        reasons[f"{name}_width"] = {"chosen": width, "timings": timings, "min_samples": MIN_SAMPLES[dims]}
    configurations["seed_2d"] = {"data": data, **options}  # the seed's recipe: TrainConfig's defaults
    return configurations, reasons


def plan_members(plan: dict, configuration: str | None = None, where: str = "plan") -> dict[str, dict]:
    """The settings of each network one configuration trains: {name: settings}, one entry for a single network,
    several for an ensemble of slicing planes."""
    from medseg.errors import MedsegError

    name = configuration or plan["default"]
    if name not in plan["configurations"]:
        raise MedsegError(f"{where}: no configuration {name!r}; choose from {', '.join(plan['configurations'])}")
    chosen = plan["configurations"][name]
    return dict(chosen["members"]) if "members" in chosen else {name: chosen}


def read_plan(plan_path: str | Path) -> dict:
    from medseg.errors import MedsegError

    path = Path(plan_path)
    if not path.exists():
        raise MedsegError(f"{path}: plan not found; make one with 'medseg plan DATA --out {path}'")
    return json.loads(path.read_text())


def config_from_plan(plan_path: str | Path, configuration: str | None = None) -> TrainConfig:
    """The training settings of one single-network configuration of a saved plan."""
    from medseg.errors import MedsegError

    members = plan_members(read_plan(plan_path), configuration, str(plan_path))
    if len(members) > 1:
        raise MedsegError(f"{plan_path}: configuration {configuration or 'auto'} is an ensemble of "
                          f"{', '.join(members)}; train it with 'medseg train --plan {plan_path}'")
    return TrainConfig(**next(iter(members.values())))
