"""Accuracy on the real datasets in ../shared/datasets, each trained under a stated CPU budget; write the table.

    python benchmarks/accuracy.py                          # every dataset, in order (about 2.5 hours here)
    python benchmarks/accuracy.py --only drive,dsb2018     # some of them
    python benchmarks/accuracy.py --minutes 0.5 --out /tmp/smoke   # every step, tiny budgets (checks the script)

Each dataset is trained with `medseg train DATA --time-budget M` and only the flags that describe the data: the
planner chooses everything else, as it would for a user. Each run is evaluated with `medseg evaluate` on its test
cases (used for no choice) and judged against the bars of the self-configuration issue.
The DICOM row segments a DICOM series with the hippocampus run and checks the NIfTI it writes against the
series geometry read independently with SimpleITK. Results go to docs/benchmarks/accuracy.json (merged with
earlier results, so datasets can be re-run one at a time) and to docs/benchmarks.md between the ACCURACY
markers, with the machine and the exact commands. Runs stay in --out for `medseg evaluate`/`predict`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from docs_section import write_section
from medseg.checkpoint import load_models
from medseg.cli import main as medseg_main
from medseg.config import TrainConfig
from medseg.data import load_case
from medseg.evaluate import evaluation_cases
from medseg.metrics import maximal_f_score, threshold_counts
from medseg.recipe import affine_words, sample_words
from medseg.scoring import score_case

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
DOCS = ROOT / "docs" / "benchmarks"

# Each dataset is trained as a user would: `medseg train DATA --time-budget M`, plus only the flags that describe the
# data (instance masks, class names, BraTS's regions). Everything else is what the planner chooses.
DATASETS = {
    "isbi2012_em": {
        "data": SHARED / "isbi2012_em", "minutes": 30, "flags": "--class-names background,cell",
        "reference": "none comparable: the challenge scored its own separate, unlabelled test stack; these test "
                     "sections are a contiguous block of the training stack",
    },
    "drive": {
        "data": SHARED / "drive", "minutes": 30, "flags": "",
        "reference": "U-Net baselines: F1 0.81-0.82, AUC 0.979 inside the FOV (DRIVE test set)",
    },
    "dsb2018": {
        "data": SHARED / "dsb2018", "minutes": 30, "flags": "--binary-masks --class-names background,nucleus",
        "reference": "no standard semantic-IoU figure (the challenge scored instance mAP)",
    },
    "brats2015": {
        "data": SHARED / "brats2015", "minutes": 6, "flags": "--regions brats",
        "reference": "BraTS 2015 top methods: Dice about 0.85 / 0.70 / 0.65 (WT/TC/ET) on the challenge test set",
    },
    "msd_hippocampus": {
        "data": SHARED / "msd_hippocampus" / "Task04_Hippocampus", "minutes": 30, "flags": "",
        "reference": "nnU-Net: Dice 0.90 / 0.89 (5-fold CV, GPU-days)",
    },
    "ct_like": {  # written by `medseg synth --kind ct --cases 50 --seed 0` into OUT the first time
        "data": None, "minutes": 30, "flags": "",
        "reference": "issue 32's bars for 20 minutes (benchmarks/ct.py): organ 0.95, lesion 0.75, detection 0.9",
    },
}
DICOM_SERIES = SHARED / "dicom_mr_study" / "11_HCropVolume"


def bar_for(name: str, summary: dict) -> tuple[str, str, bool]:
    """(what the bar asks, what was measured, met?) for one dataset's evaluation summary (its test cases); four
    decimals, so that a figure a hair under its bar does not print as the bar (0.8797 as 0.880)."""
    per_class = summary["per_class"]
    if name == "msd_hippocampus":
        a, p = per_class["Anterior"]["dice"]["mean"], per_class["Posterior"]["dice"]["mean"]
        return "Dice >= 0.89 / 0.88", f"{a:.4f} / {p:.4f}", a >= 0.89 and p >= 0.88
    if name == "drive":
        f1 = per_class["vessel"]["dice"]["mean"]
        return "F1 inside FOV >= 0.82", f"{f1:.4f}", f1 >= 0.82
    if name == "isbi2012_em":  # the challenge's pixel error and the stricter 1 - pixel accuracy, both barred
        error, threshold = summary["challenge_pixel_error"], summary["challenge_threshold"]
        strict = 1 - per_class["cell"]["accuracy"]["mean"]
        return ("pixel error (1 - maximal F-score, as the challenge) <= 0.06 and 1 - accuracy <= 0.075",
                f"{error:.4f} (at threshold {threshold:g}); 1 - accuracy {strict:.4f}",
                error <= 0.06 and strict <= 0.075)
    if name == "dsb2018":
        iou = per_class["nucleus"]["iou"]["mean"]
        return "foreground IoU >= 0.86", f"{iou:.4f}", iou >= 0.86
    if name == "brats2015":
        dice = " / ".join(f"{m['dice']['mean']:.3f}" for m in per_class.values())
        return "trains, Dice per region", f"WT/TC/ET {dice}", len(per_class) == 3
    if name == "ct_like":
        organ, lesion = per_class["organ"]["dice"]["mean"], per_class["lesion"]["dice"]["mean"]
        sizes = summary["lesions"]["lesion"]["detection_by_size"]
        found, total = (sum(sizes[b][i] for b in ("10-20 mm", "> 20 mm")) for i in (0, 1))
        return ("organ Dice >= 0.95, lesion Dice >= 0.75, >= 0.9 of lesions over 10 mm found",
                f"{organ:.4f} / {lesion:.4f}; {found}/{total} found; lesion F1 {summary['lesions']['lesion']['f1']:.3f}",
                organ >= 0.95 and lesion >= 0.75 and found >= 0.9 * total)
    raise KeyError(name)


def run_dataset(name: str, out: Path, minutes: float | None, figures: Path = DOCS,
                threads: int | None = None, trained: bool = False) -> dict:
    """`medseg train DATA --time-budget M` (the planner's default recipe) then `medseg evaluate RUN` on the run's
    test cases; the row says which cases and that no choice used them."""
    entry = DATASETS[name]
    budget = minutes or entry["minutes"]
    run = out / name
    data = entry["data"] or _generated_ct(out / "ct_like_data")
    train_args = [str(data), "--out", str(run), "--overwrite", "--time-budget", f"{budget:g}", "--quiet",
                  *shlex.split(entry["flags"]), *(["--threads", str(threads)] if threads else [])]
    summary, epochs, train_seconds, evaluate_seconds = train_then_evaluate(train_args, run, trained=trained)
    command = "medseg train " + " ".join(shlex.quote(_relative(a)) for a in train_args)
    plan = json.loads((run / "plan.json").read_text())
    asks, measured, met = bar_for(name, with_bar_inputs(name, run, summary))
    figures.mkdir(parents=True, exist_ok=True)
    members = sorted(run.glob("*/curves.png")) or [run / "curves.png"]
    shutil.copy(members[0], figures / f"accuracy_{name}_curves.png")
    return {
        "dataset": name, "plan": plan_line(plan), "budget_min": budget, "train_min": round(train_seconds / 60, 1),
        "evaluate_min": round(evaluate_seconds / 60, 1), "epochs": epochs, "test_cases": summary["cases"],
        "cases": summary["cases_role"],
        "dice": {k: [v["dice"]["mean"], v["dice"]["std"]] for k, v in summary["per_class"].items()},
        "hd95": {k: [v["hd95"]["mean"], v["hd95"]["std"]] for k, v in summary["per_class"].items()},
        "iou": {k: [v["iou"]["mean"], v["iou"]["std"]] for k, v in summary["per_class"].items()},
        "distance_unit": summary["distance_unit"],
        "bar": asks, "measured": measured, "met": bool(met), "reference": entry["reference"], "command": command,
    }


def _generated_ct(folder: Path) -> Path:
    """The CT-like set (seed 0, 50 cases), written once."""
    if not (folder / "dataset.json").exists() and medseg_main(["synth", "--kind", "ct", "--out", str(folder)]) != 0:
        raise SystemExit("writing the CT-like set failed")
    return folder


def plan_line(plan: dict) -> str:
    """What the planner chose, in a table cell."""
    members = plan["configurations"]["auto"]["members"]
    parts = [f"{name}: {sample_words(m)} px, width {m['base_channels']}, {m['threads']} thread(s)"
             f"{', rot90' if m.get('rotate90') else ''}{_slices(m)}, flips {m['flip_axes']}"
             f"{', Dice counting label 0' if m.get('loss') == 'dice_ce_all' else ''}"
             f"{', weight map (U-Net)' if m.get('border_weight') else ''}"
             f"{', elastic' if m.get('elastic_p') else ''}{_affine(m)}"
             for name, m in members.items()]
    return ("ensemble of " if len(members) > 1 else "") + "; ".join(parts) + f"; {next(iter(members.values()))['normalization']}"


def _slices(member: dict) -> str:
    """How many slices a 2D member on volumes stacks as channels, where it stacks more than one."""
    return f", {TrainConfig(**member).slices_per_input} slices (2.5D)" if member.get("context") else ""


def _affine(member: dict) -> str:
    """The random rotations and scalings where the planner widened them (otherwise the defaults: not shown)."""
    return f", {affine_words(member)}" if member.get("affine_p") else ""


def train_then_evaluate(train_args: list[str], run: Path, device: str = "auto",
                        trained: bool = False) -> tuple[dict, int, float, float]:
    """`medseg train TRAIN_ARGS` (with `trained`: reuse RUN, trained before with those arguments) then
    `medseg evaluate RUN` on its test cases: (evaluation summary, epochs trained, training seconds, evaluation
    seconds). RUN may be a planned ensemble (its members' longest training and first member's epochs count)."""
    summaries = sorted(run.glob("*/train_summary.json")) or [run / "train_summary.json"]
    if not trained:
        started = time.monotonic()
        if medseg_main(["train", *train_args]) != 0:
            raise SystemExit(f"training {run} failed")
        summaries = sorted(run.glob("*/train_summary.json")) or [run / "train_summary.json"]
    else:  # post-processing chosen again on the validation cases, with this medseg's rules
        from medseg.train import redecide_postprocessing

        for summary_path in summaries:
            redecide_postprocessing(summary_path.parent, device)
    train_seconds = max(json.loads(p.read_text())["seconds"] for p in summaries)
    epochs = len(json.loads((summaries[0].parent / "history.json").read_text()))
    started = time.monotonic()
    if medseg_main(["evaluate", str(run), "--quiet", "--figures", "0", "--device", device]) != 0:
        raise SystemExit(f"evaluating {run} failed")
    summary = json.loads((run / "evaluation" / "summary.json").read_text())
    return summary, epochs, train_seconds, time.monotonic() - started


def with_bar_inputs(name: str, run: Path, summary: dict) -> dict:
    """The evaluation summary plus what the dataset's bar reads beyond it (ISBI: the challenge's pixel error)."""
    if name == "isbi2012_em":
        summary["challenge_pixel_error"], summary["challenge_threshold"] = challenge_pixel_error(run)
    return summary


def challenge_pixel_error(run: Path) -> tuple[float, float]:
    """ISBI 2012's pixel error on the run's held-out images: 1 - the maximal F-score of the cell (non-membrane)
    probability against the labels, counts pooled over the images, thresholds 0, 0.1, ..., 1 (Fiji's PixelError,
    which scored the challenge); and the threshold that gave it."""
    models = load_models(run)
    pairs = []
    for item in evaluation_cases(models)[0]:  # the test cases, through the one predict-and-score path
        loaded = load_case(item.case, models[0].config, resample=False)
        pairs.append((score_case(item.models, loaded).probs[1], loaded.label > 0))
    return pooled_pixel_error(pairs)


def pooled_pixel_error(pairs: list) -> tuple[float, float]:
    """1 - the maximal F-score over (cell probability, cell truth) pairs, counts pooled over them; and the
    threshold that gave it. Shared with benchmarks/nnunet.py, which scores the peer's saved probabilities."""
    score, threshold = maximal_f_score(sum(threshold_counts(cell, truth) for cell, truth in pairs))
    return 1 - score, threshold


def run_dicom(out: Path) -> dict:
    """Segment the DICOM series with the hippocampus run; compare the NIfTI's grid with SimpleITK's reading."""
    import nibabel as nib
    import SimpleITK as sitk

    run, target = out / "msd_hippocampus", out / "dicom_prediction"
    if not ((run / "best.pt").exists() or (run / "ensemble.json").exists()):
        raise SystemExit(f"{run}: train the hippocampus first (--only msd_hippocampus)")
    if medseg_main(["predict", str(run), str(DICOM_SERIES), "--out", str(target), "--quiet"]) != 0:
        raise SystemExit("predicting the DICOM series failed")
    written = nib.load(next(target.glob("*.nii.gz")))
    reader = sitk.ImageSeriesReader()
    series = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(DICOM_SERIES)))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    direction = np.array(series.GetDirection()).reshape(3, 3) * np.array(series.GetSpacing())
    expected = np.eye(4)
    expected[:3, :3], expected[:3, 3] = lps_to_ras @ direction, lps_to_ras @ np.array(series.GetOrigin())
    labels = np.asarray(written.dataobj)
    same_shape = tuple(written.shape) == tuple(series.GetSize())
    same_affine = bool(np.allclose(written.affine, expected, atol=1e-3))
    counts = {int(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True)) if k}
    return {
        "dataset": "dicom_mr_study", "plan": "the msd_hippocampus run (ensemble) on series 11_HCropVolume", "budget_min": 0,
        "series_size": list(series.GetSize()), "nifti_shape": list(written.shape), "voxels_per_label": counts,
        "bar": "NIfTI grid = series grid", "measured": dicom_measured(written.shape, same_shape, same_affine, counts),
        "met": same_shape and same_affine and bool(counts),
        "reference": "geometry read independently with SimpleITK (LPS -> RAS)",
        "command": f"medseg predict {_relative(str(run))} {_relative(str(DICOM_SERIES))} --out "
                   f"{_relative(str(target))}",
    }


def dicom_measured(shape, same_shape: bool, same_affine: bool, counts: dict) -> str:
    return (f"shape {'x'.join(map(str, shape))} {'matches' if same_shape else 'differs from'} the series, affine "
            f"{'matches' if same_affine else 'differs'}; voxels per label {counts}")


def _relative(arg: str) -> str:
    return os.path.relpath(arg, ROOT) if arg.startswith("/") else arg


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU"


def _cells(per_class: dict, digits: int) -> str:
    return "; ".join(f"{k} {m:.{digits}f} ± {s:.{digits}f}" for k, (m, s) in per_class.items()) or "-"


def write_docs(results: dict) -> None:
    lines = [f"Machine: {machine()}. Each dataset trained with `medseg train DATA --time-budget M` and only the flags "
             "that describe the data (below), evaluated with `medseg evaluate RUN` on the run's test cases: cases "
             "that chose nothing (not the checkpoint, not the post-processing, not the recipe).", "",
             "| dataset | what the planner chose | budget (min) | trained (min) | test cases | Dice per class "
             "(mean ± sd) | HD95 (mean ± sd) | bar | measured | met | published reference |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        unit = r.get("distance_unit", "mm")
        lines.append(f"| {r['dataset']} | {r['plan']} | {r['budget_min']:g} | {r.get('train_min', '-')} | "
                     f"{r.get('cases', '-')} | {_cells(r.get('dice', {}), 3)} | "
                     f"{_cells(r.get('hd95', {}), 2)} {unit if r.get('hd95') else ''} | {r['bar']} | "
                     f"{r['measured']} | {'yes' if r['met'] else 'NO'} | {r['reference']} |")
    lines += ["", "Commands (each run then `medseg evaluate RUN`):", ""]
    lines += [f"- {r['dataset']}: `{r['command']}`" for r in results.values()]
    lines += ["", "Training curves (for an ensemble, its first member's):", ""]
    lines += [f"![{n}](benchmarks/accuracy_{n}_curves.png)" for n in results if n in DATASETS]
    write_section("ACCURACY", "benchmarks/accuracy.py", lines, "Accuracy on real data (benchmarks/accuracy.py)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join([*DATASETS, "dicom_mr_study"]))
    parser.add_argument("--minutes", type=float, help="override every budget (a smoke test of the script)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "accuracy"))
    parser.add_argument("--threads", type=int, help="CPU threads per run (two scripts side by side: 1 each)")
    parser.add_argument("--trained", action="store_true",
                        help="reuse the runs (ensembles: the members) already trained in OUT with the printed "
                             "commands; evaluate and judge them again")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in DATASETS and n != "dicom_mr_study"]
    missing = [n for n in names if n in DATASETS and DATASETS[n]["data"] and not DATASETS[n]["data"].exists()]
    if unknown or missing:
        sys.exit(f"unknown: {', '.join(unknown) or '-'}; not found under {SHARED}: {', '.join(missing) or '-'}")
    smoke = args.minutes is not None
    store = Path(args.out) / "accuracy.json" if smoke else DOCS / "accuracy.json"
    for name in names:
        out = Path(args.out)
        result = (run_dicom(out) if name == "dicom_mr_study"
                  else run_dataset(name, out, args.minutes, out if smoke else DOCS, args.threads, args.trained))
        # read the store only now: another copy of this script may have written its own dataset meanwhile
        results = json.loads(store.read_text())["results"] if store.exists() else {}
        results[name] = result
        print(json.dumps(result, indent=2), flush=True)
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
        if not smoke:  # a smoke test never overwrites the documented figures
            write_docs(results)


if __name__ == "__main__":
    main()
