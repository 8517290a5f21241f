"""Does test-time augmentation by quarter turns pay, for networks trained with them? Measured on validation cases.

    python benchmarks/tta.py                               # the runs benchmarks/accuracy.py left in runs/accuracy
    python benchmarks/tta.py --runs runs/accuracy/drive

For each run whose plan rotated training samples by 90 degrees (data with no up), its validation cases (the
selection cases: they chose the checkpoint and post-processing, never the test cases) are scored twice through the
one predict-and-score path: averaged over the flips the network was trained with, and over those flips each also
turned a quarter turn (all eight symmetries when both axes flip). The decision whether medseg turns at prediction
time rests on this table; the test cases stay unseen by it. Results go to docs/benchmarks/tta.json and to
docs/benchmarks.md between the TTA markers.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from unittest import mock

import numpy as np

import medseg.infer
from docs_section import write_section
from medseg.checkpoint import load_models
from medseg.data import load_case
from medseg.evaluate import evaluation_cases
from medseg.scoring import mean_dice, score_case

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"


def measure(run: Path) -> dict | None:
    """Mean Dice, mean pixel accuracy and seconds per case on the run's validation cases, without and with turns."""
    models = load_models(run)
    if not all(m.config.rotate90 and m.config.mirror_tta for m in models):
        return None
    planned, _ = evaluation_cases(models, which="val")
    result = {"run": str(run.relative_to(ROOT)) if run.is_relative_to(ROOT) else str(run),
              "cases": f"{len(planned)} validation cases"}
    for name, turning in (("flips", False), ("flips_and_turns", True)):
        rows, accuracy, seconds = [], [], []
        with mock.patch.object(medseg.infer, "tta_rotates", lambda cfg, t=turning: t):
            for item in planned:
                scored = score_case(item.models, load_case(item.case, models[0].config, resample=False))
                rows += scored.rows()
                accuracy += [r["accuracy"] for r in scored.rows()]
                seconds.append(scored.seconds)
        result[name] = {"mean_dice": mean_dice(rows), "accuracy": float(np.nanmean(accuracy)),
                        "seconds_per_case": statistics.median(seconds)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", default=sorted(str(p) for p in (ROOT / "runs" / "accuracy").iterdir()
                                                            if (p / "plan.json").exists()))
    args = parser.parse_args()
    store = DOCS / "tta.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    for run in map(Path, args.runs):
        measured = measure(run.resolve())
        if measured:
            results[run.name] = measured
            print(json.dumps(measured, indent=2))
    store.write_text(json.dumps(results, indent=2))
    write_docs(results)


def write_docs(results: dict) -> None:
    lines = ["Validation cases of each run (they chose its checkpoint and post-processing; the test cases are not "
             "read here). Median seconds per case on this 2-core CPU.", "",
             "| run | cases | Dice, flips | Dice, flips and quarter turns | accuracy, flips | "
             "accuracy, flips and turns | s/case, flips | s/case, with turns |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        a, b = r["flips"], r["flips_and_turns"]
        lines.append(f"| {name} | {r['cases']} | {a['mean_dice']:.4f} | {b['mean_dice']:.4f} | {a['accuracy']:.4f} | "
                     f"{b['accuracy']:.4f} | {a['seconds_per_case']:.2f} | {b['seconds_per_case']:.2f} |")
    write_section("TTA", "benchmarks/tta.py", lines, "Quarter turns at prediction time (benchmarks/tta.py)")


if __name__ == "__main__":
    main()
