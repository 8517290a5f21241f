"""`medseg benchmark-architectures DATA`: every network trained under the same split, settings and time budget,
evaluated the same way, and compared (Dice with intervals, paired test against the first, parameters, FLOPs,
training and inference time), ending in a table and a plot of Dice against inference time.

OUT/<model>/ is each model's complete run (evaluate, predict and report work on it); OUT/comparison.md and
comparison.json hold the table, OUT/dice_vs_inference_time.png the plot.
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from medseg.config import TrainConfig
from medseg.errors import MedsegError
from medseg.io import write_text_atomic


def benchmark_architectures(cfg: TrainConfig, models: list[str], budget: float, out: str | Path,
                            overwrite: bool = False) -> list[dict]:
    """Train and evaluate each of `models` with `cfg` for `budget` minutes; write and return the comparison."""
    from medseg.compare import compare_runs
    from medseg.evaluate import evaluate_run
    from medseg.models import MODELS
    from medseg.train import train

    unknown = [m for m in models if m not in MODELS]
    if unknown or len(models) < 2:
        raise MedsegError(f"--models {','.join(models)}: name two or more of {', '.join(MODELS)}"
                          + (f" ({', '.join(unknown)} unknown)" if unknown else ""))
    if budget <= 0:
        raise MedsegError("--budget must be positive (minutes per model)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for name in models:
        run_cfg = replace(cfg, model=name, out=str(out / name), time_budget=budget)
        run = train(run_cfg.validate(), overwrite=overwrite)
        evaluate_run(run, figures=0, device=cfg.device, progress=cfg.progress)
        runs.append(run)
    rows = [{**r, "run": Path(r["run"]).name} for r in compare_runs(runs)]  # runs named by their model
    write_comparison(rows, cfg, budget, out)
    return rows


def write_comparison(named: list[dict], cfg: TrainConfig, budget: float, out: Path) -> None:
    from medseg.compare import comparison_table

    header = (f"# Architectures on {cfg.data}\n\nEach model trained for {budget:g} minutes on the same split "
              f"(seed {cfg.seed}, {cfg.val_fraction:.0%} validation) with the same settings (width "
              f"{cfg.base_channels}, depth {cfg.depth}, {cfg.fit} {cfg.sample_words}, batch {cfg.batch_size}, lr "
              f"{cfg.lr}, {cfg.lr_schedule}), then evaluated on the same held-out cases. p: paired Wilcoxon "
              f"signed-rank test of per-case Dice against {named[0]['run']}.\n\n")
    write_text_atomic(out / "comparison.md", header + comparison_table(named)
                      + "\n![Dice against inference time](dice_vs_inference_time.png)\n")
    write_text_atomic(out / "comparison.json", json.dumps(
        {"data": cfg.data, "budget_minutes": budget, "config": asdict(cfg),
         "rows": [{k: v for k, v in r.items() if k != "per_case"} for r in named]}, indent=2))
    plot_tradeoff(named, out / "dice_vs_inference_time.png", f"{Path(cfg.data).name}, {budget:g} min each")


def plot_tradeoff(rows: list[dict], path: Path, title: str) -> Path:
    """Mean Dice (with its 95% interval) against median inference seconds per case, one point per model."""
    from medseg.figures import plt, save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in rows:
        low, high = r["dice_ci95"]
        ax.errorbar(r["inference_seconds"], r["dice_mean"], yerr=[[r["dice_mean"] - low], [high - r["dice_mean"]]],
                    fmt="o", capsize=3)
        ax.annotate(f"{r['model']}\n{r['parameters'] / 1e6:.2f} M", (r["inference_seconds"], r["dice_mean"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("inference seconds per case (median, this machine)")
    ax.set_ylabel("mean Dice (95% CI)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, 110)
