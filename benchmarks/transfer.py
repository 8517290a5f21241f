"""When does transfer learning help? Fine-tune on ISBI 2012 EM from a network trained on DSB 2018 nuclei, with
10% and 100% of ISBI's training cases, against training from scratch under the same budget and held-out cases.

    python benchmarks/transfer.py --source runs/accuracy/dsb2018 [--budget 3] [--threads 1] [--parallel 2]

The source is any run trained with the ISBI recipe's network (width 16, depth 4); the DSB run of
benchmarks/accuracy.py is one (colour input, so its first convolution does not fit ISBI's grey images and is
skipped: init.json says so). Results go to docs/benchmarks/transfer.json and docs/benchmarks.md (TRANSFER markers).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from accuracy import RECIPES, machine
from docs_section import write_section

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
# ISBI's accuracy recipe with per-image z-score (as the DSB source was trained) and shorter epochs, so that a few
# minutes still hold several validations.
SETTINGS = RECIPES["isbi2012_em"]["args"].replace("--steps-per-epoch 50", "--steps-per-epoch 25") + \
    " --normalization zscore"
ARMS = [("scratch", 0.1, False), ("fine-tuned", 0.1, True), ("scratch", 1.0, False), ("fine-tuned", 1.0, True)]


def command(arm: str, fraction: float, source: Path, budget: float, out: Path, threads: int | None) -> list[str]:
    args = ["train", str(RECIPES["isbi2012_em"]["data"]), "--out", str(out), "--overwrite", "--quiet",
            "--time-budget", f"{budget:g}", "--train-fraction", f"{fraction:g}", *shlex.split(SETTINGS)]
    if arm == "fine-tuned":
        args += ["--init-from", str(source)]
    return args + (["--threads", str(threads)] if threads else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(ROOT / "runs" / "accuracy" / "dsb2018"))
    parser.add_argument("--budget", type=float, default=3.0, help="training minutes per arm")
    parser.add_argument("--threads", type=int, help="CPU threads per training")
    parser.add_argument("--parallel", type=int, default=1, help="arms trained side by side")
    parser.add_argument("--out", default=str(ROOT / "runs" / "transfer"))
    args = parser.parse_args()
    source, out = Path(args.source), Path(args.out)
    if not (source / "best.pt").exists():
        sys.exit(f"{source}: no trained source run (python benchmarks/accuracy.py --only dsb2018 makes one)")
    medseg = [sys.executable, "-m", "medseg.cli"]
    jobs = [(arm, fraction, out / f"{arm}_{fraction:g}") for arm, fraction, _ in ARMS]
    for start in range(0, len(jobs), args.parallel):  # train a batch of arms side by side, then evaluate them
        batch = jobs[start:start + args.parallel]
        running = [subprocess.Popen(medseg + command(a, f, source, args.budget, run, args.threads))
                   for a, f, run in batch]
        if any(p.wait() for p in running):
            sys.exit("a training run failed")
    results = []
    for arm, fraction, run in jobs:
        subprocess.run(medseg + ["evaluate", str(run), "--figures", "0", "--quiet"], check=True)
        summary = json.loads((run / "evaluation" / "summary.json").read_text())
        split = json.loads((run / "split.json").read_text())
        init = json.loads((run / "init.json").read_text()) if (run / "init.json").exists() else None
        cell = summary["per_class"]["cell"]
        results.append({"arm": arm, "train_fraction": fraction, "train_cases": len(split["train"]),
                        "val_cases": summary["cases"], "dice": cell["dice"]["mean"], "dice_ci95": cell["dice"]["ci95"],
                        "pixel_error": 1 - cell["accuracy"]["mean"],
                        "epochs": len(json.loads((run / "history.json").read_text())),
                        "loaded": f"{init['loaded']} of {init['of']} tensors" if init else "-",
                        "skipped": list(init["skipped"]) if init else [],
                        "command": "medseg " + " ".join(shlex.quote(os.path.relpath(a, ROOT) if a.startswith("/")
                                                                    else a)
                                                        for a in command(arm, fraction, source, args.budget, run,
                                                                         args.threads))})
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "transfer.json").write_text(json.dumps({"machine": machine(), "source": str(source),
                                                    "budget_min": args.budget, "results": results}, indent=2))
    lines = [f"Machine: {machine()}. Source network: `{os.path.relpath(source, ROOT)}` (DSB 2018 nuclei); target: "
             f"ISBI 2012 EM, {args.budget:g} training minutes per arm"
             + (f" on {args.threads} thread(s), {args.parallel} arms side by side" if args.threads else "")
             + ", the same 6 held-out images for every arm.", "",
             "| arm | training images | epochs | cell Dice (95% CI) | pixel error | weights from the source |",
             "|---|---|---|---|---|---|"]
    for r in results:
        low, high = r["dice_ci95"]
        lines.append(f"| {r['arm']} | {r['train_cases']} ({r['train_fraction']:.0%}) | {r['epochs']} | "
                     f"{r['dice']:.4f} ({low:.4f}-{high:.4f}) | {r['pixel_error']:.4f} | {r['loaded']}"
                     + (f"; skipped {', '.join(r['skipped'])}" if r["skipped"] else "") + " |")
    lines += ["", "Commands (then `medseg evaluate RUN`):", ""] + [f"- `{r['command']}`" for r in results]
    write_section("TRANSFER", "benchmarks/transfer.py", lines, "Transfer learning (benchmarks/transfer.py)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
