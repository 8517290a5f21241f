"""Compare evaluated runs side by side: accuracy with confidence intervals, a paired test against the first
run, and what each costs (parameters, FLOPs, training and inference time).

Every run must have been evaluated (`medseg evaluate RUN`) on the same cases; per-case Dice is paired by case id.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.evaluate import mean_dice_per_case, read_per_case
from medseg.stats import bootstrap_ci, paired_wilcoxon


def case_dice(run: Path) -> dict[str, float]:
    """Mean Dice over the scored classes (or regions) of each case, from RUN/evaluation/per_case.csv."""
    return mean_dice_per_case(read_per_case(run))


def describe_run(run: Path) -> dict:
    """Accuracy and cost of one evaluated run."""
    from medseg.checkpoint import load_run
    from medseg.models import count_flops

    dice = case_dice(run)
    summary = json.loads((run / "evaluation" / "summary.json").read_text())
    trained = json.loads((run / "train_summary.json").read_text()) if (run / "train_summary.json").exists() else {}
    model = load_run(run, device="cpu")
    shape = (1, model.in_channels * model.config.slices_per_input, *model.config.patch_size)
    values = np.array(list(dice.values()))
    return {
        "run": str(run), "model": model.config.model, "cases": len(dice), "dice_mean": float(values.mean()),
        "dice_sd": float(values.std()), "dice_ci95": bootstrap_ci(values),
        "parameters": sum(p.numel() for p in model.model.parameters()),
        "gflops": count_flops(model.model, shape) / 1e9, "sample": model.config.sample_words,
        "train_minutes": trained.get("seconds", float("nan")) / 60,
        "inference_seconds": summary.get("inference_seconds_per_case", float("nan")), "per_case": dice,
    }


def compare_runs(runs: list[str | Path]) -> list[dict]:
    """One row per run; `p_vs_first` is the paired Wilcoxon p-value of per-case Dice against the first run."""
    if len(runs) < 2:
        raise MedsegError("compare needs at least two evaluated runs")
    rows = [describe_run(Path(r)) for r in runs]
    reference = rows[0]["per_case"]
    for row in rows:
        shared = sorted(set(reference) & set(row["per_case"]))
        if len(shared) < len(reference):
            raise MedsegError(f"{row['run']}: evaluated on other cases than {rows[0]['run']}; compare runs "
                              "evaluated on the same cases (same data and split)")
        row["p_vs_first"] = paired_wilcoxon([reference[c] for c in shared], [row["per_case"][c] for c in shared])
    return rows


def comparison_table(rows: list[dict]) -> str:
    lines = ["| run | model | cases | Dice mean ± sd | 95% CI | p vs first (Wilcoxon) | parameters | "
             "GFLOPs (forward, one sample) | train min | inference s/case |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        low, high = r["dice_ci95"]
        p = "-" if r is rows[0] else f"{r['p_vs_first']:.3g}"
        lines.append(f"| {r['run']} | {r['model']} | {r['cases']} | {r['dice_mean']:.4f} ± {r['dice_sd']:.4f} | "
                     f"{low:.4f}-{high:.4f} | {p} | {r['parameters']:,} | {r['gflops']:.2f} ({r['sample']}) | "
                     f"{r['train_minutes']:.1f} | {r['inference_seconds']:.3f} |")
    return "\n".join(lines) + "\n"
