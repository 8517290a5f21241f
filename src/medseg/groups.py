"""Subgroup analysis: every metric per group of cases (site, scanner, sex, age band, ...), with confidence
intervals, and the groups whose per-case Dice falls significantly behind the rest of the cases flagged.

The groups file is a CSV with a case id column (`case`, `case_id` or `id`) and one column per attribute.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.stats import behind_the_rest, bootstrap_ci, holm

ALPHA = 0.05


def read_groups(path: str | Path) -> dict[str, dict[str, str]]:
    """case id -> {attribute: group}."""
    path = Path(path)
    if not path.exists():
        raise MedsegError(f"{path}: groups file not found")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise MedsegError(f"{path}: the groups file has no rows")
    id_column = next((c for c in rows[0] if c and c.strip().lower() in ("case", "case_id", "id")), None)
    if id_column is None or len(rows[0]) < 2:
        raise MedsegError(f"{path}: needs a 'case' (or case_id/id) column and at least one attribute column")
    return {row[id_column].strip(): {k.strip(): (v or "").strip() for k, v in row.items() if k != id_column}
            for row in rows}


def subgroup_report(rows: list[dict], groups: dict[str, dict[str, str]], metrics: tuple[str, ...]) -> dict:
    """attribute -> group -> {cases, metric -> {mean, ci95}, p_behind, behind}. `rows` are per case and class, as
    evaluation writes them; per-case values are means over classes. Cases absent from `groups` are reported as
    missing; a group is flagged `behind` when its Dice is lower than the rest's at p < 0.05 (one-sided Mann-Whitney
    U) after Holm's correction over every group tested (`p_holm`; `p_behind` is the uncorrected p-value)."""
    per_case = {}
    for row in rows:
        per_case.setdefault(row["case"], []).append(row)
    case_values = {case: {m: float(np.nanmean([r[m] for r in rs])) if any(not np.isnan(r[m]) for r in rs)
                          else float("nan") for m in metrics} for case, rs in per_case.items()}
    known = [c for c in case_values if c in groups]
    if not known:
        raise MedsegError("none of the evaluated cases is in the groups file; check its case ids")
    report = {"missing_cases": sorted(set(case_values) - set(groups)), "alpha": ALPHA, "attributes": {}}
    attributes = sorted({a for c in known for a in groups[c]})
    for attribute in attributes:
        by_group: dict[str, list[str]] = {}
        for case in known:
            by_group.setdefault(groups[case].get(attribute, "") or "(blank)", []).append(case)
        out = {}
        for name, members in sorted(by_group.items()):
            rest = [c for c in known if c not in members]
            entry = {"cases": len(members)}
            for m in metrics:
                values = [case_values[c][m] for c in members]
                entry[m] = {"mean": float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan"),
                            "ci95": list(bootstrap_ci(values))}
            entry["p_behind"] = behind_the_rest([case_values[c]["dice"] for c in members],
                                                [case_values[c]["dice"] for c in rest])
            out[name] = entry
        report["attributes"][attribute] = out
    tested = [g for by in report["attributes"].values() for g in by.values()]
    for entry, p in zip(tested, holm([g["p_behind"] for g in tested])):
        entry.update(p_holm=p, behind=bool(p < ALPHA))
    report["tests"] = sum(not np.isnan(g["p_behind"]) for g in tested)
    return report


def groups_markdown(report: dict) -> str:
    lines = ["# Subgroups", "", f"Flagged: Dice lower than the rest of the cases at p < {report['alpha']} "
             f"(one-sided Mann-Whitney U on per-case Dice) after Holm's correction for the {report['tests']} groups "
             "tested together.", ""]
    for attribute, by_group in report["attributes"].items():
        lines += [f"## {attribute}", "", "| group | cases | Dice (95% CI) | p (behind the rest) | p, Holm | flagged |",
                  "|---|---|---|---|---|---|"]
        for name, g in by_group.items():
            low, high = g["dice"]["ci95"]
            lines.append(f"| {name} | {g['cases']} | {g['dice']['mean']:.4f} ({low:.4f}-{high:.4f}) | "
                         f"{g['p_behind']:.3g} | {g['p_holm']:.3g} | {'**behind**' if g['behind'] else ''} |")
        lines.append("")
    if report["missing_cases"]:
        lines.append(f"Cases not in the groups file: {', '.join(report['missing_cases'])}.")
    return "\n".join(lines) + "\n"
