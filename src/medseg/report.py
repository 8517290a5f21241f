"""`medseg report RUN`: one self-contained HTML page (every figure inlined) and its Markdown twin.

What a colleague needs to judge a run, read from the files the run already holds: the metrics with their
confidence intervals, the training curves and stopping reason, the configuration and plan, the per-class metric
distributions, the best, median and worst cases (input, ground truth, prediction, contours and the model's
uncertainty), and the per-case table. A run that has not been evaluated yet is evaluated first.

The page is built once as a list of blocks (heading, paragraph, table, figure) and written twice: as HTML with the
figures as data URIs (one file to mail or archive) and as Markdown with the figures beside it in REPORT_files/.
"""
from __future__ import annotations

import base64
import dataclasses
import csv
import html
import json
import math
import time
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.io import write_text_atomic
from medseg.evaluate import COLUMNS, TEXT_COLUMNS, mean_dice_per_case, read_per_case

DISTRIBUTION_METRICS = ["dice", "hd95", "assd", "nsd"]
SUMMARY_METRICS = ["dice", "iou", "precision", "recall", "hd95", "assd", "nsd"]
UNCERTAINTY_NOTE = ("Uncertainty is the entropy of the predicted probabilities scaled to [0, 1]: 0 where the model "
                    "is certain, 1 where it is evenly split between the classes.")


def write_report(run: str | Path, out: str | Path | None = None, device: str = "auto",
                 progress: bool = True) -> tuple[Path, Path]:
    """Write RUN/report.html and RUN/report.md (or OUT and its .md twin); return both paths."""
    from medseg.figures import plot_curves, plot_distributions

    run = Path(run)
    trainings = training_runs(run)
    if not evaluated(run):
        from medseg.evaluate import evaluate_run

        evaluate_run(run, figures=0, device=device, progress=progress)
    summary = json.loads((run / "evaluation" / "summary.json").read_text())
    rows = read_per_case(run)
    out = Path(out) if out else run / "report.html"
    files = out.parent / f"{out.stem}_files"
    files.mkdir(parents=True, exist_ok=True)
    classes = list(summary["per_class"])

    curves = {}
    for member in trainings:
        history_path = member / "history.json"
        if history_path.exists():
            history = json.loads(history_path.read_text())
            curves[member] = plot_curves(history, files / f"curves_{member.name}.png") if history else None
    distributions = plot_distributions(rows, classes, DISTRIBUTION_METRICS, files / "distributions.png",
                                       summary.get("distance_unit", "mm"))
    shown = draw_chosen_cases(run, summary, rows, files, device)

    blocks = [("h1", f"medseg report: {run.name}"),
              ("p", f"Run {run.resolve()}; evaluated on {summary['data']} ({summary.get('cases_role', '')}); "
                    f"written {time.strftime('%Y-%m-%d %H:%M')}."),
              ("p", f"Mean foreground Dice {summary['mean_dice']:.4f}; median inference time "
                    f"{summary.get('inference_seconds_per_case', math.nan):.3f} s per case."),
              ("h2", "Metrics per class"), ("table", summary_table(summary)),
              ("p", "Mean ± sd over cases, with the bootstrap 95% confidence interval of the mean. Distances in "
                    f"{summary.get('distance_unit', 'mm')}. Undefined cases (a class absent from both ground truth "
                    "and prediction) are left out of that class's mean. " + summary.get("policy", ""))]
    if trainings != [run]:
        blocks.append(("p", f"An ensemble: the mean probability of {', '.join(m.name for m in trainings)}, each "
                            "trained in its own folder; their training follows, one after the other."))
    for member in trainings:
        blocks += training_blocks(member, curves.get(member), member != run)
    blocks += [("h2", "Metric distributions"), ("figure", (distributions, "per-case values, one box per class"))]
    blocks += [("h2", "Best, median and worst cases"),
               ("p", "Ranked by the case's mean Dice over classes. Contours: ground truth solid, prediction dashed. "
                     + UNCERTAINTY_NOTE)]
    blocks += [("figure", (path, caption)) for path, caption in shown]
    for member in trainings:
        blocks += [("h2", "Configuration and plan" if member == run else f"Configuration of {member.name}"),
                   ("table", settings_table(member))]
    blocks += [("h2", "Every case"), ("table", case_table(rows))]
    write_text_atomic(out, to_html(blocks))
    markdown = out.with_suffix(".md")
    write_text_atomic(markdown, to_markdown(blocks, markdown.parent))
    return out, markdown


def training_runs(run: Path) -> list[Path]:
    """The run itself, or the members of an ensemble (`medseg ensemble`, a planned ensemble) or the folds of a
    cross-validation folder."""
    from medseg.ensemble import is_ensemble, member_paths

    if (run / "best.pt").exists():
        return [run]
    found = member_paths(run) if is_ensemble(run) else sorted(p for p in run.glob("fold_*") if (p / "best.pt").exists())
    if not found:
        raise MedsegError(f"{run}: not a training run (no best.pt, ensemble.json or fold_*); train first or point "
                          "at a run folder")
    return found


def evaluated(run: Path) -> bool:
    """True when RUN/evaluation holds every metric this version computes (older evaluations are redone)."""
    table = run / "evaluation" / "per_case.csv"
    if not (table.exists() and (run / "evaluation" / "summary.json").exists()):
        return False
    with open(table, newline="") as handle:
        return set(COLUMNS) <= set(next(csv.reader(handle), []))


def case_scores(rows: list[dict]) -> list[tuple[str, float]]:
    """(case, mean Dice over its classes), worst first."""
    return sorted(mean_dice_per_case(rows).items(), key=lambda item: (item[1], item[0]))


def chosen_cases(rows: list[dict]) -> list[tuple[str, str, float]]:
    """(which, case, mean Dice) for the best, median and worst case (fewer when there are fewer cases)."""
    ranked = case_scores(rows)
    picks = [("best", ranked[-1]), ("median", ranked[len(ranked) // 2]), ("worst", ranked[0])]
    seen, chosen = set(), []
    for which, (case, dice) in picks:
        if case not in seen:
            seen.add(case)
            chosen.append((which, case, dice))
    return chosen


def draw_chosen_cases(run: Path, summary: dict, rows: list[dict], files: Path, device: str) -> list[tuple]:
    """Predict the chosen cases again (probabilities are not stored) and draw each one's row of panels."""
    from medseg.checkpoint import load_models
    from medseg.data import load_case
    from medseg.evaluate import evaluation_cases
    from medseg.figures import most_informative_slice, plot_contours
    from medseg.infer import uncertainty
    from medseg.scoring import score_case

    models = load_models(run, device=device)
    cfg = models[0].config
    which_cases = "val" if summary.get("evaluated") == "selection" else "test"
    options = summary.get("data_options") or {}
    planned = {p.case.case_id: p for p in evaluation_cases(models, summary.get("data_path"), which_cases,
                                                           options)[0]}
    cfg = dataclasses.replace(cfg, **options)
    shown = []
    for which, case_id, dice in chosen_cases(rows):
        item = planned[case_id]
        loaded = load_case(item.case, cfg, resample=False)
        scored = score_case(item.models or models, loaded)
        probs, pred = scored.probs, scored.pred
        image, truth, doubt = loaded.image.array, loaded.label, uncertainty(probs, bool(cfg.regions))
        where = ""
        if truth.ndim == 3:  # the slice with the most ground truth
            index = most_informative_slice(truth, cfg.axis)
            image = np.take(image, index, axis=1 + cfg.axis % 3)
            truth, pred, doubt = (np.take(a, index, axis=cfg.axis % 3) for a in (truth, pred, doubt))
            where = f", slice {index} along axis {cfg.axis % 3}"
        caption = f"{which}: case {case_id}, mean Dice {dice:.3f}{where}"
        shown.append((plot_contours(image, truth, pred, doubt, files / f"case_{which}.png", caption), caption))
    return shown


def summary_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    rows = []
    for name, metrics in summary["per_class"].items():
        cells = []
        for m in SUMMARY_METRICS:
            s = metrics[m]
            low, high = s.get("ci95", [math.nan, math.nan])
            cells.append(f"{s['mean']:.3f} ± {s['std']:.3f} [{low:.3f}, {high:.3f}]")
        rows.append([name, *cells, str(metrics["dice"].get("undefined", 0))])
    return ["class", *SUMMARY_METRICS, "cases undefined (Dice)"], rows


def training_blocks(run: Path, curves: Path | None, member: bool = False) -> list[tuple]:
    path = run / "train_summary.json"
    facts = json.loads(path.read_text()) if path.exists() else {}
    keep = ["epochs_run", "steps", "best_epoch", "best_val_dice", "stopped", "seconds", "device", "parameters",
            "train_samples", "postprocessing"]
    table = (["", "value"], [[k, _text(facts[k])] for k in keep if k in facts])
    blocks = [("h2", f"Training ({run.name})" if member else "Training"), ("table", table),
              ("p", "best_val_dice is measured on the validation cases that chose the checkpoint: it is optimistic; "
                    "the metrics above are on the cases named there.")]
    if curves:
        blocks.append(("figure", (curves, "loss, Dice and accuracy per epoch, training against validation")))
    return blocks


def settings_table(run: Path) -> tuple[list[str], list[list[str]]]:
    """Every training setting, then the dataset facts the run recorded (the plan is what these settings are)."""
    rows = []
    for name in ("config.json", "dataset.json"):
        path = run / name
        if path.exists():
            rows += [[f"{name[:-5]}: {k}", _text(v)] for k, v in json.loads(path.read_text()).items()
                     if v is not None]
    return ["setting", "value"], rows


def case_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    metrics = [k for k in rows[0] if k not in TEXT_COLUMNS] if rows else []
    return ["case", "class", *metrics], [[r["case"], r["class"], *(f"{r[m]:.4f}" for m in metrics)] for r in rows]


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left}th{background:#f0f0f0}figure{margin:1em 0}img{max-width:100%}figcaption{color:#555}
.scroll{max-height:30em;overflow:auto}"""


def to_html(blocks: list[tuple]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(blocks[0][1])}</title><style>{STYLE}</style></head><body>"]
    for kind, content in blocks:
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "table":
            header, rows = content
            head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
            wrap = ' class="scroll"' if len(rows) > 20 else ""
            parts.append(f"<div{wrap}><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")
        elif kind == "figure":
            path, caption = content
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def to_markdown(blocks: list[tuple], root: Path) -> str:
    lines = []
    for kind, content in blocks:
        if kind == "h1":
            lines += [f"# {content}", ""]
        elif kind == "h2":
            lines += [f"## {content}", ""]
        elif kind == "p":
            lines += [content, ""]
        elif kind == "table":
            header, rows = content
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows] + [""]
        elif kind == "figure":
            path, caption = content
            lines += [f"![{caption}]({Path(path).relative_to(root).as_posix()})", ""]
    return "\n".join(lines)
