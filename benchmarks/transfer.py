"""When does transfer learning help? Fine-tune a target dataset from a network trained on another one, with 10%
and 100% of the target's training cases, against training from scratch under the same budget and held-out cases;
optionally also with the encoder frozen for the first epochs.

    python benchmarks/transfer.py --target drive --source runs/accuracy/dsb2018 --budget 5 --freeze-epochs 2 \
        --threads 1 --parallel 2
    python benchmarks/transfer.py --target isbi2012_em --source runs/accuracy/dsb2018 --budget 5
    python benchmarks/transfer.py --target drive ... --write-docs   # the tables again from the evaluated runs

The target is trained with its benchmarks/accuracy.py recipe (per-image z-score, epochs of 25 steps so that a
few minutes still hold several validations); the source must be a run of the same network (width 16, depth 4),
such as the DSB run of benchmarks/accuracy.py. Tensors that do not fit (a colour source for a grey target: the
first convolution) are skipped, and init.json says so. Results go to docs/benchmarks/transfer_<target>.json and
docs/benchmarks.md (TRANSFER_<TARGET> markers).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from accuracy import machine
from recipes import RECIPES, train_side_by_side
from docs_section import write_section

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
TARGETS = {"isbi2012_em": "ISBI 2012 EM", "drive": "DRIVE vessels"}


def settings(target: str) -> str:
    """The target's accuracy recipe with per-image z-score (as the DSB source was trained) and 25-step epochs."""
    args = shlex.split(RECIPES[target]["args"])
    args[args.index("--steps-per-epoch") + 1] = "25"
    if "--normalization" not in args:
        args += ["--normalization", "zscore"]
    return shlex.join(args)


def arms(freeze_epochs: int) -> list[tuple[str, float, int | None]]:
    """(name, share of the training cases, frozen encoder epochs or None for scratch)."""
    kinds = [("scratch", None), ("fine-tuned", 0)] + ([(f"fine-tuned, encoder frozen {freeze_epochs} epochs",
                                                        freeze_epochs)] if freeze_epochs else [])
    return [(name, fraction, frozen) for fraction in (0.1, 1.0) for name, frozen in kinds]


def command(target: str, fraction: float, frozen: int | None, source: Path, budget: float, out: Path,
            threads: int | None) -> list[str]:
    args = [str(RECIPES[target]["data"]), "--out", str(out), "--overwrite", "--quiet", "--recipe", "seed",
            "--time-budget", f"{budget:g}", "--train-fraction", f"{fraction:g}", *shlex.split(settings(target))]
    if frozen is not None:
        args += ["--init-from", str(source)] + (["--freeze-encoder-epochs", str(frozen)] if frozen else [])
    return args + (["--threads", str(threads)] if threads else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="isbi2012_em", choices=sorted(TARGETS))
    parser.add_argument("--source", default=str(ROOT / "runs" / "accuracy" / "dsb2018"))
    parser.add_argument("--budget", type=float, default=3.0, help="training minutes per arm")
    parser.add_argument("--freeze-epochs", type=int, default=0, help="also fine-tune with the encoder frozen")
    parser.add_argument("--threads", type=int, help="CPU threads per training")
    parser.add_argument("--parallel", type=int, default=1, help="arms trained side by side")
    parser.add_argument("--out", default=str(ROOT / "runs" / "transfer"))
    parser.add_argument("--write-docs", action="store_true",
                        help="only rewrite the docs from the evaluated runs already in --out")
    args = parser.parse_args()
    source, out, target = Path(args.source), Path(args.out) / args.target, args.target
    if not (source / "best.pt").exists():
        sys.exit(f"{source}: no trained source run (python benchmarks/accuracy.py --only dsb2018 makes one)")
    medseg = [sys.executable, "-m", "medseg.cli"]
    jobs = [(name, fraction, frozen, out / f"{name.split(',')[0]}{'_frozen' if frozen else ''}_{fraction:g}")
            for name, fraction, frozen in arms(args.freeze_epochs)]
    commands = [command(target, f, z, source, args.budget, run, args.threads) for _, f, z, run in jobs]
    for start in range(0, len(jobs) if not args.write_docs else 0, args.parallel):  # arms side by side
        train_side_by_side(commands[start:start + args.parallel])
    results = []
    for (name, fraction, _, run), cmd in zip(jobs, commands):
        if not args.write_docs:
            subprocess.run(medseg + ["evaluate", str(run), "--figures", "0", "--quiet"], check=True)
        summary = json.loads((run / "evaluation" / "summary.json").read_text())
        split = json.loads((run / "split.json").read_text())
        init = json.loads((run / "init.json").read_text()) if (run / "init.json").exists() else None
        structure, metrics = next(iter(summary["per_class"].items()))
        results.append({"arm": name, "train_fraction": fraction, "train_cases": len(split["train"]),
                        "val_cases": summary["cases"], "structure": structure, "dice": metrics["dice"]["mean"],
                        "dice_ci95": metrics["dice"]["ci95"], "pixel_error": 1 - metrics["accuracy"]["mean"],
                        "epochs": len(json.loads((run / "history.json").read_text())),
                        "loaded": f"{init['loaded']} of {init['of']} tensors" if init else "-",
                        "skipped": list(init["skipped"]) if init else [],
                        "command": "medseg train " + " ".join(shlex.quote(os.path.relpath(a, ROOT) if a.startswith("/")
                                                                    else a) for a in cmd)})
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / f"transfer_{target}.json").write_text(json.dumps(
        {"machine": machine(), "source": str(source), "target": target, "budget_min": args.budget,
         "results": results}, indent=2))
    write_section(f"TRANSFER_{target.upper()}", "benchmarks/transfer.py", table(results, source, target, args),
                  f"Transfer learning to {TARGETS[target]} (benchmarks/transfer.py)")


def table(results: list[dict], source: Path, target: str, args) -> list[str]:
    structure = results[0]["structure"]
    lines = [f"Machine: {machine()}. Source network: `{os.path.relpath(source, ROOT)}`; target: {TARGETS[target]}, "
             f"{args.budget:g} training minutes per arm"
             + (f" on {args.threads} thread(s), {args.parallel} arms side by side" if args.threads else "")
             + f", the same {results[0]['val_cases']} held-out images for every arm.", "",
             f"| arm | training images | epochs | {structure} Dice (95% CI) | pixel error | weights from the source |",
             "|---|---|---|---|---|---|"]
    for r in results:
        low, high = r["dice_ci95"]
        lines.append(f"| {r['arm']} | {r['train_cases']} ({r['train_fraction']:.0%}) | {r['epochs']} | "
                     f"{r['dice']:.4f} ({low:.4f}-{high:.4f}) | {r['pixel_error']:.4f} | {r['loaded']}"
                     + (f"; skipped {', '.join(r['skipped'])}" if r["skipped"] else "") + " |")
    lines += ["", "Commands (then `medseg evaluate RUN`):", ""] + [f"- `{r['command']}`" for r in results]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
