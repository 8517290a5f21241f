"""Evaluate a trained run per case and per class; write per_case.csv, summary.json, summary.md and figures.

Metrics are computed at each case's own resolution against its original mask (volumes as volumes), with the
empty-case policy of `medseg.metrics`. `summary.json` has `mean_dice` (mean over foreground classes of the
per-class mean Dice) and `per_class` (class name -> metric -> mean, std, n, undefined).
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg.checkpoint import load_models, load_run
from medseg.data import load_case
from medseg.datasets import find_cases
from medseg.errors import MedsegError
from medseg.infer import ensemble_labels
from medseg.metrics import BOUNDARY_METRICS, METRICS, POLICY, scored_metrics
from medseg.figures import most_informative_slice, plot_case
from medseg.stats import bootstrap_ci

COLUMNS = METRICS + BOUNDARY_METRICS


def evaluate_run(run: str | Path, data: str | Path | None = None, out: str | Path | None = None,
                 figures: int = 4, device: str = "auto", progress: bool = True, groups: str | Path | None = None) -> dict:
    """Evaluate RUN's best checkpoint on its validation cases, or on every case of `data` if given; with
    `groups` (a CSV of case -> attributes), also every metric per subgroup (groups.json, groups.md)."""
    from medseg.groups import read_groups

    group_of = read_groups(groups) if groups else None  # a bad file fails before any work
    models = _models(run, device, data)
    trained = models[0]
    cases, source = evaluation_cases(trained, data)
    out = Path(out) if out else Path(run) / "evaluation"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    staging.chmod(0o755)
    try:
        summary = _evaluate_cases(models, cases, source, staging, figures, progress, group_of, data, Path(run))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)  # a failed evaluation leaves no half-written folder behind
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _models(run: str | Path, device: str, data: str | Path | None) -> list:
    """The run's model, or an ensemble's members; an ensemble is scored on its own validation cases only where
    every member held out the same ones."""
    from medseg.ensemble import is_ensemble, shared_split

    if not is_ensemble(run):
        return [load_run(run, device=device)]
    models = load_models(run, device=device)
    if data is None and shared_split(models) is None:
        raise MedsegError(f"{run}: the members were validated on different cases, so some were trained on what "
                          "another holds out; pass --data with cases none of them trained on")
    return models


def evaluation_cases(trained, data: str | Path | None = None) -> tuple[list, str]:
    """The cases to evaluate (the run's validation split, or every case of `data`) and a line that names them."""
    cfg = trained.config
    if data is None:
        split_path = trained.run / "split.json"
        if not split_path.exists():
            raise MedsegError(f"{split_path}: missing; pass --data to evaluate on a labelled dataset")
        val_ids = set(json.loads(split_path.read_text())["val"])
        cases = [c for c in find_cases(cfg.data, cfg.images, cfg.masks).cases if c.case_id in val_ids]
        source = f"validation split of {cfg.data}"
    else:
        cases = find_cases(data).cases
        source = str(data)
    if not cases:
        raise MedsegError(f"{cfg.data}: none of the run's validation cases were found; pass --data")
    return cases, source


def _evaluate_cases(models: list, cases, source: str, out: Path, figures: int, progress: bool, group_of,
                    data: str | Path | None, run: Path) -> dict:
    trained = models[0]
    cfg, names = trained.config, trained.class_names
    rows, shown, seconds = [], [], []
    for case in tqdm(cases, desc="evaluating", disable=not progress, leave=False):
        loaded = load_case(case, cfg, resample=False)  # metrics on the case's own grid
        if int(loaded.label.max()) >= len(names):
            raise MedsegError(f"{case.mask}: label {int(loaded.label.max())} is unknown to this model "
                              f"({len(names)} classes); evaluate on data labelled like the training data")
        started = time.perf_counter()
        pred = ensemble_labels(models, loaded.image.array, loaded.image.spacing, loaded.image.affine)
        seconds.append(time.perf_counter() - started)
        scores = scored_metrics(pred, loaded.label, names, cfg.regions, loaded.roi, loaded.image.spacing,
                                boundary=True)
        for name, metrics in scores.items():
            rows.append({"case": case.case_id, "class": name, **metrics})
        if len(shown) < figures:
            dice = ", ".join(f"{name} {m['dice']:.3f}" for name, m in scores.items())
            title = f"case {case.case_id}: Dice {dice}"
            shown.append(_draw(loaded, pred, cfg.axis, out / f"case_{case.case_id}.png", title))
    summary = summarise(rows, list(cfg.regions) if cfg.regions else names[1:], source, run)
    summary["inference_seconds_per_case"] = float(np.median(seconds))
    summary["data_path"] = str(data) if data else None  # for `medseg report`: where the cases came from
    if group_of is not None:
        from medseg.groups import groups_markdown, subgroup_report

        report = subgroup_report(rows, group_of, COLUMNS)
        (out / "groups.json").write_text(json.dumps(report, indent=2))
        (out / "groups.md").write_text(groups_markdown(report))
        summary["groups_behind"] = [f"{a}={g}" for a, by in report["attributes"].items()
                                    for g, v in by.items() if v["behind"]]
    if any(c.roi is not None for c in cases):
        summary["region_of_interest"] = "metrics count only the pixels inside each case's region of interest"
    _write_outputs(out, rows, summary)
    return summary


def summarise(rows: list[dict], class_names: list[str], source: str, run: Path) -> dict:
    per_class = {}
    for name in class_names:
        values = {m: np.array([r[m] for r in rows if r["class"] == name], dtype=float) for m in COLUMNS}
        per_class[name] = {m: _stats(v) for m, v in values.items()}
    mean_dice = float(np.mean([per_class[n]["dice"]["mean"] for n in class_names]))
    return {"run": str(run), "data": source, "cases": len({r["case"] for r in rows}), "mean_dice": mean_dice,
            "per_class": per_class, "policy": POLICY}


def _stats(values: np.ndarray) -> dict:
    defined = values[~np.isnan(values)]
    mean = float(defined.mean()) if defined.size else math.nan
    std = float(defined.std()) if defined.size else math.nan
    return {"mean": mean, "std": std, "ci95": list(bootstrap_ci(defined)), "n": int(defined.size),
            "undefined": int(values.size - defined.size)}


def _draw(loaded, pred: np.ndarray, axis: int, path: Path, title: str) -> Path:
    """The case panel; for a volume, the slice with the most ground-truth foreground."""
    image, truth = loaded.image.array, loaded.label
    if truth.ndim == 3:
        index = most_informative_slice(truth, axis)
        image = np.take(image, index, axis=1 + axis % 3)
        truth, pred = np.take(truth, index, axis=axis % 3), np.take(pred, index, axis=axis % 3)
    return plot_case(image, truth, pred, path, title=title)


def read_per_case(run: Path) -> list[dict]:
    """RUN/evaluation/per_case.csv as rows: case and class as text, every metric a float (NaN where undefined)."""
    path = Path(run) / "evaluation" / "per_case.csv"
    if not path.exists():
        raise MedsegError(f"{run}: not evaluated yet ({path} missing); run 'medseg evaluate {run}' first")
    with open(path, newline="") as handle:
        return [{k: (v if k in ("case", "class") else float(v)) for k, v in row.items()}
                for row in csv.DictReader(handle)]


def mean_dice_per_case(rows: list[dict]) -> dict[str, float]:
    """Mean Dice over the scored classes (or regions) of each case."""
    per_case: dict[str, list[float]] = {}
    for row in rows:
        per_case.setdefault(row["case"], []).append(row["dice"])
    return {case: float(np.mean(values)) for case, values in per_case.items()}


def _write_outputs(out: Path, rows: list[dict], summary: dict) -> None:
    with open(out / "per_case.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", "class", *COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [f"# Evaluation of {summary['run']}", "", f"Data: {summary['data']}; {summary['cases']} cases.", "",
             f"**Mean foreground Dice: {summary['mean_dice']:.4f}**", "",
             "| class | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, metrics in summary["per_class"].items():
        cells = [f"{metrics[m]['mean']:.4f} ± {metrics[m]['std']:.4f}" for m in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Empty-case policy: {summary['policy']}.", "", "Per-case values: per_case.csv."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
