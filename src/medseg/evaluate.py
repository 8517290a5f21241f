"""Evaluate a trained run per case and per class; write per_case.csv, summary.json, summary.md and figures.

Which cases: by default the run's **test** cases, which influenced no choice (not the checkpoint, not early
stopping, not the post-processing); `cases="val"` scores the validation cases instead, labelled as selection
cases (optimistic: the checkpoint was chosen on them). For a cross-validation folder (`fold_0`, `fold_1`, ...) the
validation cases are pooled out of fold: each is predicted by the one fold that validated on it and never trained
on it, as nnU-Net reports; the test cases are predicted by all folds averaged. With `data`, every case of that
dataset is scored and any case the run trained or selected on (same dataset and case id, or the same image
content) is marked in per_case.csv and left out of the means.

Metrics are computed through `medseg.scoring` at each case's own resolution against its original mask, with the
empty-case policy of `medseg.metrics`. `summary.json` has `mean_dice` (mean over classes of each class's mean
Dice) and `per_class` (class name -> metric -> mean, std, ci95, n, undefined).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg.config import READING_FIELDS
from medseg.console import flush_notes, show_bars
from medseg.checkpoint import load_models
from medseg.data import load_case
from medseg.datasets import Case, case_hash, content_hash, find_cases
from medseg.errors import MedsegError
from medseg.folders import check_replaceable, mark, replace_folder
from medseg.infer import final_labels
from medseg.lesions import ObjectTally
from medseg.metrics import BOUNDARY_METRICS, METRICS, POLICY, scored_metrics
from medseg.figures import most_informative_slice, plot_case
from medseg.io import read_image, write_text_atomic
from medseg.scoring import mean_dice, score_case
from medseg.stats import bootstrap_ci

COLUMNS = METRICS + BOUNDARY_METRICS
TEXT_COLUMNS = ("case", "class", "role", "counted")
ROLE_TEXT = {"test": "used for no choice", "selection": "used to choose the checkpoint and post-processing "
             "(optimistic)", "new": "not part of the run's dataset split", "trained": "trained on"}


@dataclass
class Planned:
    """One case to evaluate, what it was to the run, and the models that may predict it."""
    case: Case
    role: str  # test | selection | new | trained
    models: list

    @property
    def counted(self) -> bool:
        return self.role in ("test", "new") or (self.role == "selection" and bool(self.models))


def evaluate_run(run: str | Path, data: str | Path | None = None, out: str | Path | None = None,
                 figures: int = 4, device: str = "auto", progress: bool = True, groups: str | Path | None = None,
                 cases: str = "test", data_options: dict | None = None, lesion_metrics: bool = False,
                 cldice: bool = False) -> dict:
    """Evaluate RUN (a run, an ensemble or a cross-validation folder) on its test cases, its validation cases
    (`cases="val"`), or every case of `data` (read with `data_options`, e.g. {"binary_masks": True}); with
    `groups` (a CSV of case -> attributes), also every metric per subgroup (groups.json, groups.md).

    Lesion-wise scores (lesions.csv, `summary["lesions"]`) for the classes the run marked lesion-like, every
    class with `lesion_metrics`; clDice for tubular classes, every class with `cldice`; instance average
    precision for runs on instance masks (--binary-masks). See `medseg.lesions`."""
    from medseg.groups import read_groups

    group_of = read_groups(groups) if groups else None  # a bad file fails before any work
    out = Path(out) if out else Path(run) / "evaluation"
    check_replaceable(out, "--out")
    models = load_models(run, device=device)
    planned, source = evaluation_cases(models, data, cases, data_options)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result follows the user's umask
    try:
        tally = _object_tally(models, lesion_metrics, cldice)
        summary = _evaluate_cases(models, planned, source, staging, figures, progress, group_of, data, Path(run),
                                  data_options, tally)
        mark(staging, "evaluation")
        replace_folder(out, "--out")
        os.replace(staging, out)  # a failed evaluation leaves no half-written folder behind
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _split(model) -> dict:
    path = model.run / "split.json"
    if not path.exists():
        raise MedsegError(f"{path}: missing; pass --data to evaluate on a labelled dataset")
    split = json.loads(path.read_text())
    split.setdefault("test", [])
    return split


def evaluation_cases(models: list, data: str | Path | None = None, which: str = "test",
                     data_options: dict | None = None) -> tuple[list[Planned], str]:
    """The cases to evaluate with their roles and predicting models, and a line that names them."""
    if which not in ("test", "val"):
        raise MedsegError(f"--cases {which}: choose test or val")
    cfg = models[0].config
    if data is not None:
        splits = [_split(m) if (m.run / "split.json").exists() else {} for m in models]
        return _external_cases(models, splits, data, data_options), f"every case of {data}"
    splits = [_split(m) for m in models]
    dataset = find_cases(data_folder(models[0]), cfg.images, cfg.masks, cfg.allow_unmatched)
    if which == "test":
        tests = [set(s["test"]) for s in splits]
        if any(t != tests[0] for t in tests[1:]):
            raise MedsegError(f"{models[1].run}: its test cases differ from {models[0].run}'s; average only runs "
                              "trained with the same --seed and --test-fraction, or pass --data")
        if not tests[0]:
            raise MedsegError(f"{models[0].run}: trained without test cases (--test-fraction 0); pass --data with "
                              "your own test set, or --cases val to score the selection cases (optimistic)")
        planned = [Planned(c, "test", models) for c in dataset.cases if c.case_id in tests[0]]
        check_unchanged(models[0].run, splits[0], [p.case for p in planned])
        return planned, f"test cases of {cfg.data}, {len(planned)} cases, used for no choice"
    planned = []
    for case in dataset.cases:
        validating = [m for m, s in zip(models, splits) if case.case_id in s["val"]]
        if not validating:
            continue
        training = [m for m, s in zip(models, splits) if case.case_id in s["train"]]
        scorers = validating if _is_cross_validation(models) else ([] if training else validating)
        if not scorers or (not _is_cross_validation(models) and len(validating) != len(models)):
            raise MedsegError(f"{case.case_id}: validated by some members and trained on by others; the members "
                              "were validated on different cases, so pass --data with cases none of them trained on")
        planned.append(Planned(case, "selection", scorers))
    if not planned:
        raise MedsegError(f"{cfg.data}: none of the run's validation cases were found; pass --data")
    pooled = ", pooled out of fold" if _is_cross_validation(models) and len(models) > 1 else ""
    return planned, (f"validation cases of {cfg.data}{pooled}, {len(planned)} cases, used to choose the checkpoint "
                     "and post-processing (selection cases: optimistic)")


def data_folder(model) -> Path:
    """Where the run's data is: config.json's path (absolute since runs store it so), else dataset.json's resolved
    one (runs given a relative path, evaluated from another folder); gone from both, a clear error."""
    for candidate in (Path(model.config.data), _recorded_data(model.run)):
        if candidate is not None and candidate.exists():
            return candidate
    raise MedsegError(f"{model.run}: its data {model.config.data} is not there any more (moved or deleted); pass "
                      "--data WHERE_IT_IS_NOW to evaluate on it")


def _recorded_data(run: Path) -> Path | None:
    path = run / "dataset.json"
    return Path(json.loads(path.read_text())["data"]) if path.exists() else None


def check_unchanged(run: Path, split: dict, cases: list[Case]) -> None:
    """The cases evaluated must be the files the run split off: a case edited since (its content hash differs from
    split.json's) would give numbers for something the run never held out."""
    # images, mask and region of interest where the run recorded them all (runs before that: the images)
    hashes, digest = (split["content_hashes"], content_hash) if split.get("content_hashes") else \
        (split.get("hashes") or {}, case_hash)
    changed = [case for case in cases if case.case_id in hashes and digest(case) != hashes[case.case_id]]
    if changed:
        raise MedsegError(f"{changed[0].images[0]}: case {changed[0].case_id} (image, mask or region of interest) "
                          f"changed since {run} was trained ({len(changed)} of {len(cases)} cases differ from their "
                          "hash in split.json); restore the data, or pass --data to evaluate "
                          "the files as they are now (cases the run trained on are then matched and left out)")


def _is_cross_validation(models: list) -> bool:
    return len(models) > 1 and all(m.run.name.startswith("fold_") for m in models)


def _external_cases(models: list, splits: list[dict], data: str | Path, options: dict | None) -> list[Planned]:
    """Every case of `data`; a case any model trained or selected on (same dataset and id, or same image bytes)
    is marked and not counted."""
    options = options or {}
    dataset = find_cases(data, options.get("images"), options.get("masks"), bool(options.get("allow_unmatched")))
    same_data = {Path(m.config.data).resolve() for m in models} == {Path(data).resolve()}
    planned = []
    for case in dataset.cases:
        digest = case_hash(case) if any(s.get("hashes") for s in splits) else None
        role = "new"
        for s in splits:
            for kind, label in (("train", "trained"), ("val", "selection"), ("test", "test")):
                by_id = same_data and case.case_id in s.get(kind, [])
                by_hash = digest is not None and digest in {s.get("hashes", {}).get(i) for i in s.get(kind, [])}
                if (by_id or by_hash) and _rank(label) > _rank(role):
                    role = label
        planned.append(Planned(case, role, models if role in ("new", "test") else []))
    return planned


def _rank(role: str) -> int:
    return {"new": 0, "test": 1, "selection": 2, "trained": 3}[role]


def _object_tally(models: list, every_lesion: bool, every_tube: bool) -> ObjectTally:
    """What to score object by object: the classes the run marked (its dataset.json), or every class."""
    first = models[0]
    path = first.run / "dataset.json"
    marked = json.loads(path.read_text()) if path.exists() else {}
    units = first.config.regions or {name: [k] for k, name in enumerate(first.class_names) if k}
    decision = first.run / "postprocessing.json"  # how the run recovers instances, chosen on its validation cases
    method = json.loads(decision.read_text()).get("instances") if decision.exists() else None
    return ObjectTally(marked, units, every_lesion, every_tube, instances=bool(first.config.binary_masks),
                       instance_method=method)


def _evaluate_cases(models: list, planned: list[Planned], source: str, out: Path, figures: int, progress: bool,
                    group_of, data: str | Path | None, run: Path, data_options: dict | None,
                    tally: ObjectTally) -> dict:
    trained = models[0]
    cfg, names = trained.config, trained.class_names
    read_cfg = replace(cfg, **{k: v for k, v in (data_options or {}).items() if k in READING_FIELDS and v is not None})
    rows, raw_rows, shown, seconds, units = [], [], [], [], set()
    for item in tqdm(planned, desc="evaluating", disable=not show_bars(progress), leave=False):
        loaded = load_case(item.case, read_cfg, resample=False)  # metrics on the case's own grid
        if int(loaded.label.max()) >= len(names):
            raise MedsegError(f"{item.case.mask}: label {int(loaded.label.max())} is unknown to this model "
                              f"({len(names)} classes); evaluate on data labelled like the training data")
        scored = score_case(item.models or models, loaded, boundary=True)
        units.add("pixels" if loaded.image.meta.get("format") in ("raster", "npy") else "mm")
        if item.counted:
            seconds.append(scored.seconds)
        rows += [{**row, "role": item.role, "counted": "yes" if item.counted else "no"} for row in scored.rows()]
        if tally.active:
            instances = read_image(item.case.mask, npy_layout=read_cfg.npy_layout).array[0] if tally.instances \
                else None
            tally.add(item.case.case_id, scored.pred, loaded.label, loaded.roi, loaded.image.spacing, item.counted,
                      instances)
        if item.counted:
            raw_rows += _without_postprocessing(item.models or models, scored)
        if item.counted and len(shown) < figures:
            dice = ", ".join(f"{name} {m['dice']:.3f}" for name, m in scored.scores.items())
            title = f"case {item.case.case_id}: Dice {dice}"
            shown.append(_draw(loaded, scored.pred, cfg.axis, out / f"case_{item.case.case_id}.png", title))
    flush_notes()
    counted = [r for r in rows if r["counted"] == "yes"]
    if not counted:
        raise MedsegError(f"{data or cfg.data}: every case was trained or selected on by this run; nothing is left "
                          "to report")
    summary = summarise(counted, list(cfg.regions) if cfg.regions else names[1:], source, run)
    summary["mean_dice_without_postprocessing"] = mean_dice(raw_rows)
    summary.update(tally.summary())
    summary["cases_role"] = _role_line(planned)
    summary["left_out"] = sorted({r["case"] for r in rows if r["counted"] == "no"})
    summary["distance_unit"] = "mm" if units == {"mm"} else "pixels" if units == {"pixels"} else "mm or pixels"
    summary["inference_seconds_per_case"] = float(np.median(seconds))
    summary["data_path"] = str(data) if data else None  # for `medseg report`: where the cases came from
    summary["data_options"] = {k: v for k, v in (data_options or {}).items() if k in READING_FIELDS and v is not None}
    summary["evaluated"] = "external" if data else planned[0].role
    if group_of is not None:
        from medseg.groups import groups_markdown, subgroup_report

        report = subgroup_report(counted, group_of, COLUMNS)
        write_text_atomic(out / "groups.json", json.dumps(report, indent=2))
        write_text_atomic(out / "groups.md", groups_markdown(report))
        summary["groups_behind"] = [f"{a}={g}" for a, by in report["attributes"].items()
                                    for g, v in by.items() if v["behind"]]
    if any(p.case.roi is not None for p in planned):
        summary["region_of_interest"] = "metrics count only the pixels inside each case's region of interest"
    _write_outputs(out, rows, summary, tally)
    return summary


def _without_postprocessing(models: list, scored) -> list[dict]:
    """Dice rows of the plain argmax, to show what the post-processing chosen on validation did here."""
    if not any(m.postprocess_classes for m in models):
        return scored.rows()
    first, case = models[0], scored.case
    scores = scored_metrics(final_labels(models, scored.probs, postprocess=False), case.label, first.class_names,
                            first.config.regions, case.roi)
    return [{"case": case.case_id, "class": name, **metrics} for name, metrics in scores.items()]


def _role_line(planned: list[Planned]) -> str:
    """E.g. 'test: 40 cases, used for no choice'; with --data, one part per role."""
    counts: dict[str, int] = {}
    for item in planned:
        counts[item.role] = counts.get(item.role, 0) + 1
    parts = []
    for role, n in counts.items():
        kept = "" if any(p.counted for p in planned if p.role == role) else ", left out of the means"
        parts.append(f"{role}: {n} case{'s' if n != 1 else ''}, {ROLE_TEXT[role]}{kept}")
    return "; ".join(parts)


def summarise(rows: list[dict], class_names: list[str], source: str, run: Path) -> dict:
    per_class = {}
    for name in class_names:
        values = {m: np.array([r[m] for r in rows if r["class"] == name], dtype=float) for m in COLUMNS}
        per_class[name] = {m: _stats(v) for m, v in values.items()}
    return {"run": str(run), "data": source, "cases": len({r["case"] for r in rows}), "mean_dice": mean_dice(rows),
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


def read_per_case(run: Path, counted_only: bool = True) -> list[dict]:
    """RUN/evaluation/per_case.csv as rows: case, class, role and counted as text, every metric a float (NaN where
    undefined); only the rows counted in the means unless `counted_only` is False."""
    path = Path(run) / "evaluation" / "per_case.csv"
    if not path.exists():
        raise MedsegError(f"{run}: not evaluated yet ({path} missing); run 'medseg evaluate {run}' first")
    with open(path, newline="") as handle:
        rows = [{k: (v if k in TEXT_COLUMNS else float(v)) for k, v in row.items()} for row in csv.DictReader(handle)]
    return [r for r in rows if r.get("counted", "yes") == "yes"] if counted_only else rows


def mean_dice_per_case(rows: list[dict]) -> dict[str, float]:
    """Mean Dice over the classes (or regions) of each case where it is defined; a case where every class is
    undefined (nothing to find, nothing found) is left out."""
    per_case: dict[str, list[float]] = {}
    for row in rows:
        if not math.isnan(row["dice"]):
            per_case.setdefault(row["case"], []).append(row["dice"])
    return {case: float(np.mean(values)) for case, values in per_case.items()}


def _write_outputs(out: Path, rows: list[dict], summary: dict, tally: ObjectTally) -> None:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["case", "class", "role", "counted", *COLUMNS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "per_case.csv", table.getvalue())
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    lines = [f"# Evaluation of {summary['run']}", "", f"Data: {summary['data']}.", "",
             f"Cases: {summary['cases_role']}.", "",
             f"**Mean foreground Dice: {summary['mean_dice']:.4f}** over {summary['cases']} cases.", "",
             f"HD95 and ASSD in {summary['distance_unit']}.", "",
             "| class | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, metrics in summary["per_class"].items():
        cells = [f"{metrics[m]['mean']:.4f} ± {metrics[m]['std']:.4f}" for m in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    undefined = {n: m["dice"]["undefined"] for n, m in summary["per_class"].items() if m["dice"]["undefined"]}
    if undefined:
        lines += ["", "Cases where a class is absent from both ground truth and prediction (undefined, left out of "
                  "that class's means): " + ", ".join(f"{n} {k}" for n, k in undefined.items()) + "."]
    lines += ["", f"Without the post-processing chosen on validation: mean Dice "
                  f"{summary['mean_dice_without_postprocessing']:.4f}."]
    lines += tally.markdown(summary)
    if tally.rows:
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=list(tally.rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(tally.rows)
        write_text_atomic(out / "lesions.csv", table.getvalue())
    lines += ["", f"Empty-case policy: {summary['policy']}.", "", "Per-case values: per_case.csv."]
    write_text_atomic(out / "summary.md", "\n".join(lines) + "\n")
