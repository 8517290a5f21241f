"""`medseg benchmark-architectures` on ISBI 2012 EM and on MSD Hippocampus (2D); the tables go into the docs.

    python benchmarks/architectures.py [--budget 2.5] [--only isbi2012_em] [--threads 1] [--out runs/architectures]

Each dataset's comparison (OUT/<dataset>/comparison.md and its plot) is copied to docs/benchmarks/ and quoted in
docs/benchmarks.md between the ARCHITECTURES markers with the exact command; each budget keeps its own table.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import time
from pathlib import Path

from accuracy import machine
from recipes import RECIPES
from docs_section import write_section
from medseg.cli import main as medseg_main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
MODELS = "unet,attention_unet,resenc_unet,deeplabv3plus,segnet,fcn"
# The accuracy benchmark's recipes without their own budget (each model gets --budget) or mirror TTA (the same
# inference for every model keeps the time column comparable); for the hippocampus, its sagittal member alone.
SETTINGS = {
    "isbi2012_em": RECIPES["isbi2012_em"]["args"],
    "msd_hippocampus": RECIPES["msd_hippocampus"]["args"].replace(" --mirror-tta", ""),
}


def run(name: str, budget: float, out: Path, threads: int | None) -> dict:
    data, out = RECIPES[name]["data"], out / f"{name}_{budget:g}min"
    args = [str(data), "--models", MODELS, "--budget", f"{budget:g}", "--out", str(out), "--overwrite",
            "--quiet", *shlex.split(SETTINGS[name]), *(["--threads", str(threads)] if threads else [])]
    started = time.monotonic()
    if medseg_main(["benchmark-architectures", *args]) != 0:
        raise SystemExit(f"benchmark-architectures on {name} failed")
    DOCS.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "dice_vs_inference_time.png", DOCS / figure_name(name, budget))
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    for row in rows:  # how far each model got in the budget says as much as its Dice
        row["epochs"] = len(json.loads((out / row["run"] / "history.json").read_text()))
    return {"dataset": name, "budget_min": budget, "threads": threads, "minutes": (time.monotonic() - started) / 60,
            "rows": rows, "command": "medseg benchmark-architectures " + " ".join(
                shlex.quote(os.path.relpath(a, ROOT) if a.startswith("/") else a) for a in args)}


def figure_name(dataset: str, budget: float) -> str:
    return f"architectures_{dataset}_{budget:g}min.png"


def write_docs(results: dict) -> None:
    lines = [f"Machine: {machine()}.", ""]
    for r in results.values():
        lines += [f"### {r['dataset']}: {r['budget_min']:g} minutes per model"
                  + (f" on {r['threads']} thread(s)" if r["threads"] else ""), "",
                  f"`{r['command']}`", "",
                  "| model | parameters | GFLOPs (forward, one sample) | epochs | train min | Dice mean ± sd | 95% CI | "
                  "p vs unet (Wilcoxon) | inference s/case |", "|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            low, high = row["dice_ci95"]
            p = "-" if row is r["rows"][0] else f"{row['p_vs_first']:.3g}"
            lines.append(f"| {row['model']} | {row['parameters']:,} | {row['gflops']:.2f} ({row['sample']}) | "
                         f"{row.get('epochs', '-')} | {row['train_minutes']:.1f} | {row['dice_mean']:.4f} ± {row['dice_sd']:.4f} | "
                         f"{low:.4f}-{high:.4f} | {p} | {row['inference_seconds']:.3f} |")
        lines += ["", f"![Dice against inference time, {r['dataset']}]"
                      f"(benchmarks/{figure_name(r['dataset'], r['budget_min'])})", ""]
    write_section("ARCHITECTURES", "benchmarks/architectures.py", lines,
                  "Architectures under one budget (benchmarks/architectures.py)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SETTINGS))
    parser.add_argument("--budget", type=float, default=2.5, help="training minutes per model")
    parser.add_argument("--threads", type=int, help="CPU threads per training (to run datasets side by side)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "architectures"))
    parser.add_argument("--write-docs", action="store_true", help="only rewrite the docs from the stored results")
    args = parser.parse_args()
    store = DOCS / "architectures.json"
    if args.write_docs:
        return write_docs(json.loads(store.read_text()))
    for name in args.only.split(","):
        if not RECIPES[name]["data"].exists():
            raise SystemExit(f"{RECIPES[name]['data']} not found (the shared datasets live beside the repository)")
        result = run(name, args.budget, Path(args.out), args.threads)
        # read again just before writing: the datasets may run side by side in two processes
        results = json.loads(store.read_text()) if store.exists() else {}
        results[f"{name}, {args.budget:g} min"] = result  # one table per dataset and budget
        store.write_text(json.dumps(results, indent=2))
        write_docs(results)


if __name__ == "__main__":
    main()
