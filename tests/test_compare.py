import json

import numpy as np
import pytest

from medseg.cli import main
from medseg.errors import MedsegError
from medseg.stats import bootstrap_ci, paired_wilcoxon
from conftest import tiny_config


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_cases():
    rng = np.random.default_rng(0)
    few, many = rng.normal(0.8, 0.1, 10), rng.normal(0.8, 0.1, 400)
    low, high = bootstrap_ci(few)
    assert low < few.mean() < high
    low_many, high_many = bootstrap_ci(many)
    assert high_many - low_many < (high - low) / 3  # about 1/sqrt(40) as wide
    assert bootstrap_ci([0.5]) == (0.5, 0.5) and all(np.isnan(bootstrap_ci([np.nan])))


def test_paired_wilcoxon():
    a = np.linspace(0.7, 0.9, 20)
    assert paired_wilcoxon(a, a) == 1.0
    assert paired_wilcoxon(a, a + 0.05) < 0.001  # every case better: significant
    assert paired_wilcoxon(a, a + np.where(np.arange(20) % 2, 0.01, -0.01)) > 0.5  # no systematic shift


def test_compare_two_runs(phantoms_2d, tmp_path, capsys):
    from medseg.evaluate import evaluate_run
    from medseg.train import train

    runs = [train(tiny_config(phantoms_2d, tmp_path / name, model=name)) for name in ("unet", "segnet")]
    with pytest.raises(MedsegError, match="not evaluated"):
        from medseg.compare import compare_runs

        compare_runs(runs)
    for run in runs:
        evaluate_run(run, progress=False, figures=0)
    capsys.readouterr()  # training printed its epoch lines
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "table.md")]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "table.md").read_text()
    assert "| unet |" in printed and "| segnet |" in printed and printed.count("\n") == 4
    summary = json.loads((runs[0] / "evaluation" / "summary.json").read_text())
    ci = summary["per_class"]["ellipse"]["dice"]["ci95"]
    assert ci[0] <= summary["per_class"]["ellipse"]["dice"]["mean"] <= ci[1]
    assert summary["inference_seconds_per_case"] > 0


def test_subgroups_flag_the_group_that_falls_behind(tmp_path):
    from medseg.groups import groups_markdown, read_groups, subgroup_report

    rows = []
    for i in range(30):
        site = "B" if i % 3 == 0 else "A"
        dice = (0.6 if site == "B" else 0.9) + 0.01 * (i % 5)
        rows.append({"case": f"c{i}", "class": "x", "dice": dice, "iou": dice / (2 - dice), "hd95": float("nan")})
    (tmp_path / "groups.csv").write_text("case,site,sex\n" + "".join(
        f"c{i},{'B' if i % 3 == 0 else 'A'},{'F' if i % 2 else 'M'}\n" for i in range(29)))
    report = subgroup_report(rows, read_groups(tmp_path / "groups.csv"), ("dice", "iou", "hd95"))
    site, sex = report["attributes"]["site"], report["attributes"]["sex"]
    assert site["B"]["behind"] and not site["A"]["behind"] and site["B"]["cases"] == 10
    assert not any(g["behind"] for g in sex.values())
    assert site["B"]["dice"]["ci95"][0] <= site["B"]["dice"]["mean"] <= site["B"]["dice"]["ci95"][1]
    assert report["missing_cases"] == ["c29"] and "**behind**" in groups_markdown(report)
    with pytest.raises(MedsegError, match="case"):
        (tmp_path / "bad.csv").write_text("site\nA\n")
        read_groups(tmp_path / "bad.csv")


def test_holm_correction_by_hand_and_in_the_subgroup_report():
    from medseg.groups import groups_markdown, subgroup_report
    from medseg.stats import holm

    # m = 4: sorted 0.01, 0.02, 0.03, nan, 0.5 -> 0.04, max(0.04, 0.06), max(0.06, 0.06), nan, max(.., 0.5)
    adjusted = holm([0.03, 0.5, 0.01, float("nan"), 0.02])
    assert adjusted[:3] == pytest.approx([0.06, 0.5, 0.04]) and np.isnan(adjusted[3]) and adjusted[4] == 0.06
    # ten sites, one a little behind: p below 0.05 on its own, not once the ten tests are corrected for
    rng = np.random.default_rng(0)
    rows, groups = [], {}
    for i in range(100):
        site = f"s{i % 10}"
        dice = 0.8 + rng.normal(0, 0.05) - (0.015 if site == "s0" else 0)
        rows.append({"case": f"c{i}", "class": "x", "dice": dice})
        groups[f"c{i}"] = {"site": site}
    report = subgroup_report(rows, groups, ("dice",))
    s0 = report["attributes"]["site"]["s0"]
    assert s0["p_behind"] < 0.05 and s0["p_holm"] >= 0.05 and not s0["behind"]
    assert s0["p_holm"] == pytest.approx(min(1.0, 10 * s0["p_behind"])) and report["tests"] == 10
    assert "Holm's correction for the 10 groups" in groups_markdown(report)
