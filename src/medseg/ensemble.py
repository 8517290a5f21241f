"""Ensembles of separately trained runs (e.g. 2D networks on sagittal and coronal slices of the same volumes).

`medseg ensemble RUN_A RUN_B ... --out DIR` writes DIR/ensemble.json naming the members; `medseg predict DIR`
averages their probabilities (each member cuts, mirrors and resamples as it was trained) and `medseg evaluate
DIR` scores the average on the members' test cases. Members must share classes, input channels and intensity
normalisation; evaluation also needs one test split for all of them (the same --seed and --test-fraction), so
that no member trained on a case the ensemble is scored on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from medseg.errors import MedsegError
from medseg.folders import mark
from medseg.io import write_text_atomic

MANIFEST = "ensemble.json"


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def member_paths(path: str | Path) -> list[Path]:
    """The member runs of an ensemble folder (paths in the manifest are relative to it)."""
    path = Path(path)
    members = json.loads((path / MANIFEST).read_text())["members"]
    return [(path / m).resolve() for m in members]


def create_ensemble(runs: list[str | Path], out: str | Path) -> Path:
    """Check that the runs can be averaged and write OUT/ensemble.json; return OUT."""
    from medseg.checkpoint import load_run

    if len(runs) < 2:
        raise MedsegError("an ensemble needs at least two runs")
    models = [load_run(r, device="cpu") for r in runs]  # a missing checkpoint fails here
    first = models[0]
    for m in models[1:]:
        for what, a, b in [("classes", first.class_names, m.class_names),
                           ("input channels", first.in_channels, m.in_channels),
                           ("colour handling", first.config.color, m.config.color),
                           ("normalisation", first.config.normalization, m.config.normalization),
                           ("intensity statistics", first.config.intensity_stats, m.config.intensity_stats),
                           ("regions", first.config.regions, m.config.regions)]:
            if a != b:
                raise MedsegError(f"{m.run}: {what} {b} differ from {first.run} ({a}); only runs that read their "
                                  "input the same way and predict the same classes can be averaged")
    out = Path(out)
    fresh = not out.exists() or not any(out.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    if fresh:  # a folder that already held the user's files is never marked as replaceable
        mark(out, "ensemble")
    members = [os.path.relpath(Path(r).resolve(), out.resolve()) for r in runs]
    write_text_atomic(out / MANIFEST, json.dumps({"members": members}, indent=2))
    return out
