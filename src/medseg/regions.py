"""Region-based segmentation: overlapping structures made of label sets, one sigmoid output each.

BraTS scores three nested regions, not its four labels: whole tumour (1, 2, 3, 4), tumour core (1, 3, 4) and
enhancing tumour (4). Training on the regions (a sigmoid per region, BCE + soft Dice, as nnU-Net does for BraTS)
optimises what is scored. Predictions are written back as a label map by painting the regions largest first,
each with a label that belongs to it and to no region painted after it (whole tumour -> 2, core -> 1,
enhancing -> 4), so every region can be read back from the map exactly: `region_masks(paint(...)) == masks`
wherever the predicted regions are nested. The training loss on regions is `medseg.losses.region_loss`.
"""
from __future__ import annotations

import numpy as np

from medseg.errors import MedsegError

BRATS_REGIONS = {"whole tumour": [1, 2, 3, 4], "tumour core": [1, 3, 4], "enhancing tumour": [4]}
PRESETS = {"brats": BRATS_REGIONS}


def parse_regions(text: str) -> dict[str, list[int]]:
    """`brats`, or `NAME=1,2,3;NAME=1,3` -> {name: labels}, ordered largest first and checked (`check_regions`)."""
    if text.strip().lower() in PRESETS:
        return {k: list(v) for k, v in PRESETS[text.strip().lower()].items()}
    regions = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, labels = part.partition("=")
        try:
            regions[name.strip()] = sorted({int(v) for v in labels.split(",")})
        except ValueError as exc:
            raise MedsegError(f"--regions {text}: write NAME=1,2,3;NAME=1,3 (labels are whole numbers) "
                              f"or a preset ({', '.join(PRESETS)})") from exc
    return check_regions(regions)


def check_regions(regions: dict[str, list[int]]) -> dict[str, list[int]]:
    """Order regions largest first and make sure each can be painted with a label of its own."""
    if not regions or any(not name or not labels or min(labels) < 1 for name, labels in regions.items()):
        raise MedsegError(f"regions {regions}: each needs a name and foreground labels (1 or more)")
    ordered = dict(sorted(regions.items(), key=lambda item: -len(item[1])))
    paint_labels(ordered)
    return ordered


def paint_labels(regions: dict[str, list[int]]) -> list[int]:
    """The label each region is painted with: its smallest label that no later (smaller) region contains."""
    names, chosen = list(regions), []
    for i, name in enumerate(names):
        later = set().union(*(regions[n] for n in names[i + 1:]))
        own = sorted(set(regions[name]) - later)
        if not own:
            raise MedsegError(f"region {name!r} {regions[name]} is covered by smaller regions; give it a label "
                              "of its own so predictions can be written as one label map")
        chosen.append(own[0])
    return chosen


def region_masks(labels: np.ndarray, regions: dict[str, list[int]]) -> np.ndarray:
    """A label map (*spatial) -> boolean region masks (R, *spatial)."""
    return np.stack([np.isin(labels, v) for v in regions.values()])


def paint(masks: np.ndarray, regions: dict[str, list[int]]) -> np.ndarray:
    """Boolean region masks (R, *spatial), largest region first -> a label map (*spatial) uint8."""
    labels = np.zeros(masks.shape[1:], np.uint8)
    for mask, value in zip(masks, paint_labels(regions)):
        labels[mask] = value
    return labels
