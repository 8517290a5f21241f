"""Train and evaluate on the real datasets in ../shared/datasets under a CPU time budget; write the results.

    python benchmarks/real_data.py [--only isbi2012_em,msd_hippocampus] [--budget 15] [--out runs/bench]

Writes docs/benchmarks/real_data.json and the table in docs/benchmarks.md (between the REAL-DATA markers),
with the exact command of every run, the machine, and the measured time. Each run is a normal medseg run
folder, so `medseg evaluate`/`predict` work on it afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from docs_section import write_section
from medseg.cli import main as medseg_main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"

# The budgeted recipes. Both keep each dataset's native resolution ("pad": random 2D crops for training,
# whole slices for validation) and use a CPU-sized U-Net; 1e-3 with a poly decay suits a 15-minute budget.
RECIPES = {
    "isbi2012_em": {
        "data": SHARED / "isbi2012_em",
        "args": "--fit pad --size 256 --base-channels 16 --depth 4 --batch-size 8 --lr 1e-3 --lr-schedule poly "
                "--epochs 200 --steps-per-epoch 50 --patience 0 --class-names background,cell",
        "bar": ("cell", 0.90),
    },
    "msd_hippocampus": {
        "data": SHARED / "msd_hippocampus" / "Task04_Hippocampus",
        "args": "--fit pad --size 64 --base-channels 16 --depth 4 --batch-size 32 --lr 1e-3 --lr-schedule poly "
                "--epochs 200 --steps-per-epoch 100 --patience 0",
        "bar": ("mean", 0.80),
    },
}


def run_one(name: str, budget: float, out: Path) -> dict:
    recipe = RECIPES[name]
    run = out / name
    train_args = [str(recipe["data"]), "--out", str(run), "--overwrite", "--time-budget", str(budget), "--quiet",
                  *shlex.split(recipe["args"])]
    started = time.monotonic()
    if medseg_main(["train", *train_args]) != 0:
        raise SystemExit(f"training on {name} failed")
    train_seconds = time.monotonic() - started
    if medseg_main(["evaluate", str(run), "--quiet"]) != 0:
        raise SystemExit(f"evaluating {name} failed")
    summary = json.loads((run / "evaluation" / "summary.json").read_text())
    history = json.loads((run / "history.json").read_text())
    copy_figures(name, run)
    which, bar = recipe["bar"]
    value = summary["mean_dice"] if which == "mean" else summary["per_class"][which]["dice"]["mean"]
    return {
        "dataset": name, "command": "medseg train " + " ".join(shlex.quote(_relative(a)) for a in train_args),
        "budget_min": budget, "train_minutes": round(train_seconds / 60, 2), "epochs": len(history),
        "val_cases": summary["cases"], "mean_dice": summary["mean_dice"],
        "per_class_dice": {k: (v["dice"]["mean"], v["dice"]["std"]) for k, v in summary["per_class"].items()},
        "bar": f"{which} Dice >= {bar}", "passed": bool(value >= bar),
    }


def _relative(arg: str) -> str:
    """Show paths as a user in the repository root would type them."""
    return os.path.relpath(arg, ROOT) if arg.startswith("/") else arg


def copy_figures(name: str, run: Path) -> None:
    """Put the run's curves and one validation panel beside the docs that quote them."""
    import shutil

    out = ROOT / "docs" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "curves.png", out / f"{name}_curves.png")
    panel = sorted((run / "evaluation").glob("case_*.png"))[0]
    shutil.copy(panel, out / f"{name}_case.png")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU"


def write_docs(results: list[dict]) -> None:
    out = ROOT / "docs" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / "real_data.json").read_text()) if (out / "real_data.json").exists() else {}
    merged = {**previous.get("results", {}), **{r["dataset"]: r for r in results}}
    (out / "real_data.json").write_text(json.dumps({"machine": machine(), "results": merged}, indent=2))
    lines = [f"Machine: {machine()}.", "",
             "| dataset | budget (min) | trained (min) | epochs | val cases | Dice per class (mean ± sd) | "
             "mean Dice | bar | met |", "|---|---|---|---|---|---|---|---|---|"]
    for r in merged.values():
        per_class = "; ".join(f"{k} {m:.3f} ± {s:.3f}" for k, (m, s) in r["per_class_dice"].items())
        lines.append(f"| {r['dataset']} | {r['budget_min']:g} | {r['train_minutes']:.1f} | {r['epochs']} | "
                     f"{r['val_cases']} | {per_class} | {r['mean_dice']:.3f} | {r['bar']} | "
                     f"{'yes' if r['passed'] else 'NO'} |")
    lines += ["", "Commands:", ""] + [f"- {r['dataset']}: `{r['command']}`" for r in merged.values()]
    lines += ["", "Training curves and one validation case per dataset:", ""]
    lines += [f"![{n} curves](benchmarks/{n}_curves.png)\n![{n} case](benchmarks/{n}_case.png)\n" for n in merged]
    write_section("REAL-DATA", "benchmarks/real_data.py", lines, "Real data, 2D, 15 CPU minutes each")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(RECIPES))
    parser.add_argument("--budget", type=float, default=15.0, help="training minutes per dataset")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    missing = [n for n in names if not RECIPES[n]["data"].exists()]
    if missing:
        sys.exit(f"datasets not found under {SHARED}: {', '.join(missing)}")
    results = []
    for name in names:
        results.append(run_one(name, args.budget, Path(args.out)))
        print(json.dumps(results[-1], indent=2))
        write_docs(results)


if __name__ == "__main__":
    main()
