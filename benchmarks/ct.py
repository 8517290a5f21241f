"""The scans users bring: `medseg train DATA --time-budget 20` with no other flag on the CT-like set, scored on its
test cases (organ Dice, lesion Dice, lesion-wise F1 and detection by size), its peak memory and where its budget
went; then `medseg predict` on one 512x512x300 CT-sized volume with the default engine (time, peak memory).

    python benchmarks/ct.py --out /tmp/ct                     # about 30 minutes here, alone on the machine
    python benchmarks/ct.py --out /tmp/ct --minutes 2 --cases 8 --size 128   # every step, small (checks the script)

The data is `medseg synth --kind ct --cases 50 --seed 0` (written once under OUT/data: 50 volumes, 693 MB). Bars
(issue 32): organ Dice >= 0.95, lesion Dice >= 0.75, >= 0.9 of lesions over 10 mm detected, peak memory under
8 GB, and at least 80% of the budget in optimiser steps. Results: docs/benchmarks/ct.json and the CT section of
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
BARS = {"organ_dice": 0.95, "lesion_dice": 0.75, "detected_over_10mm": 0.9, "peak_gib": 8.0, "training_share": 0.8}


def medseg(*args: str) -> tuple[float, float, str]:
    """Run `medseg ARGS` in a fresh process: (seconds, its peak resident memory in GiB, its output)."""
    script = ("import resource, subprocess, sys, time; t = time.time(); "
              "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
              "print(done.stdout + done.stderr); "
              "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.time() - t); "
              "sys.exit(done.returncode)")
    exe = str(Path(sys.executable).parent / "medseg")
    done = subprocess.run([sys.executable, "-c", script, exe, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"medseg {' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    last = done.stdout.strip().splitlines()[-1].split()
    return float(last[2]), int(last[1]) / 2**20, done.stdout


def ct_volume(path: Path, slices: int = 300, size: int = 512) -> Path:
    """One CT-sized volume of `slices` axial slices (site A's spacing), from the generator, for timing predict."""
    import nibabel as nib

    from medseg.synth_ct import make_ct_case

    parts, rng = [], np.random.default_rng(7)
    while sum(p.shape[2] for p in parts) < slices:
        parts.append(make_ct_case(rng, "A", size)[0])
    hu = np.concatenate(parts, 2)[:, :, :slices]
    nib.save(nib.Nifti1Image(hu, np.diag([-358 / size, -358 / size, 2.5, 1.0])), str(path))
    return path


def measure(out: Path, minutes: float, cases: int, size: int) -> dict:
    data = out / "data"
    if not (data / "dataset.json").exists():
        medseg("synth", "--kind", "ct", "--out", str(data), "--cases", str(cases), "--size", str(size))
    run = out / "run"
    train_s, train_peak, log = medseg("train", str(data), "--out", str(run), "--overwrite", "--time-budget",
                                      f"{minutes:g}", "--quiet")
    evaluate_s, _, _ = medseg("evaluate", str(run), "--groups", str(data / "sites.csv"), "--quiet")
    summary = json.loads((run / "evaluation" / "summary.json").read_text())
    trained = json.loads((run / "train_summary.json").read_text())
    volume = ct_volume(out / "volume_300.nii.gz", size=size)
    predict_s, predict_peak, _ = medseg("predict", str(run), str(volume), "--out", str(out / "predicted"), "--quiet")
    lesions = summary["lesions"]["lesion"]
    sizes = lesions["detection_by_size"]
    over = [sizes[b] for b in ("10-20 mm", "> 20 mm")]
    found, total = sum(s[0] for s in over), sum(s[1] for s in over)
    plan = json.loads((run / "plan.json").read_text())
    member = next(iter(plan["configurations"]["auto"]["members"].values()))
    result = {
        "date": time.strftime("%Y-%m-%d"), "budget_min": minutes, "train_s": round(train_s), "evaluate_s":
        round(evaluate_s), "cases": summary["cases_role"], "plan": {k: member.get(k) for k in (
            "axis", "target_spacing", "size", "patch", "base_channels", "context", "normalization")},
        "organ_dice": summary["per_class"]["organ"]["dice"]["mean"],
        "lesion_dice": summary["per_class"]["lesion"]["dice"]["mean"],
        "lesion_dice_undefined": summary["per_class"]["lesion"]["dice"]["undefined"],
        "organ_hd95_mm": summary["per_class"]["organ"]["hd95"]["mean"], "lesions": lesions,
        "detected_over_10mm": found / total if total else float("nan"), "lesions_over_10mm": total,
        "peak_gib": round(train_peak, 2), "budget": trained["budget"], "training_share":
        trained["budget"]["training_share"], "validation": json.loads((run / "config.json").read_text())
        ["calibration"]["validation"], "predict_300_slices_s": round(predict_s, 1),
        "predict_peak_gib": round(predict_peak, 2), "sampling_line": next(
            (line for line in log.splitlines() if "sampling in epoch 1" in line), ""),
    }
    result["met"] = {name: (result[name] <= bar if name == "peak_gib" else result[name] >= bar)
                     for name, bar in BARS.items()}
    return result


def write_docs(result: dict) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from docs_section import write_section

    import platform

    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "ct.json").write_text(json.dumps(result, indent=2))
    s = result["lesions"]["detection_by_size"]
    bins = "; ".join(f"{b}: {found}/{total}" for b, (found, total, _) in s.items() if total)
    yes = {True: "yes", False: "**no**"}
    met = result["met"]
    budget = result["budget"]
    lines = [
        f"Machine: {platform.machine()}, 2 cores, CPU ({result['date']}). `medseg synth --kind ct --cases 50 --seed "
        f"0` (50 volumes of 512x512x33-79, two sites' spacings, 693 MB), then `medseg train DATA --time-budget "
        f"{result['budget_min']:g}` with no other flag and `medseg evaluate RUN --groups DATA/sites.csv`: {result['cases']}.",
        f"Plan: {result['plan']}.", "",
        "| measure | bar | measured | met |", "|---|---|---|---|",
        f"| organ Dice | >= 0.95 | {result['organ_dice']:.4f} | {yes[met['organ_dice']]} |",
        f"| lesion Dice (cases with a lesion or a predicted one) | >= 0.75 | {result['lesion_dice']:.4f} | "
        f"{yes[met['lesion_dice']]} |",
        f"| lesions over 10 mm detected | >= 0.9 | {result['detected_over_10mm']:.3f} ({result['lesions_over_10mm']} "
        f"lesions) | {yes[met['detected_over_10mm']]} |",
        f"| peak memory of training | < 8 GB | {result['peak_gib']:.2f} GiB | {yes[met['peak_gib']]} |",
        f"| budget in optimiser steps | >= 80% | {result['training_share']:.0%} | {yes[met['training_share']]} |",
        "", f"Lesion-wise: F1 {result['lesions']['f1']:.3f} ({result['lesions']['tp']} found, "
        f"{result['lesions']['fn']} missed, {result['lesions']['fp']} false alarms), mean Dice per lesion "
        f"{result['lesions']['lesion_dice']:.3f}; detected by size: {bins}. Organ HD95 "
        f"{result['organ_hd95_mm']:.2f} mm.", "",
        "Where the budget went (s): " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in budget.items()
                                                  if k not in ("total", "training_share")) +
        f"; {budget['total']} s in all. Epochs validated: {result['validation']}.", "",
        f"`medseg predict RUN volume.nii.gz` on one 512x512x300 volume (default engine): {result['predict_300_slices_s']} "
        f"s, peak {result['predict_peak_gib']:.2f} GiB.", "",
        "Command: `python benchmarks/ct.py --out OUT` (alone on the machine)."]
    write_section("CT", "benchmarks/ct.py", lines, "The scans users bring: a CT-like set, no flags, 20 minutes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    result = measure(args.out, args.minutes, args.cases, args.size)
    print(json.dumps({k: v for k, v in result.items() if k != "lesions"}, indent=2))
    if not args.no_docs:
        write_docs(result)


if __name__ == "__main__":
    main()
