import json

import pytest
from PIL import Image as PILImage

from medseg.architectures import benchmark_architectures
from medseg.cli import main
from medseg.errors import MedsegError

from conftest import tiny_config


def test_two_models_same_split_one_table(phantoms_2d, tmp_path):
    cfg = tiny_config(phantoms_2d, tmp_path / "unused", epochs=1)
    rows = benchmark_architectures(cfg, ["unet", "segnet"], budget=1, out=tmp_path / "arch")
    assert [r["model"] for r in rows] == ["unet", "segnet"]
    assert rows[0]["per_case"].keys() == rows[1]["per_case"].keys()  # the same held-out cases
    assert 0 <= rows[1]["p_vs_first"] <= 1 and rows[0]["parameters"] != rows[1]["parameters"]
    for name in ("unet", "segnet"):
        config = json.loads((tmp_path / "arch" / name / "config.json").read_text())
        assert config["model"] == name and config["time_budget"] == 1
        assert (tmp_path / "arch" / name / "evaluation" / "per_case.csv").exists()
    table = (tmp_path / "arch" / "comparison.md").read_text()
    assert "| unet | unet |" in table and "| segnet | segnet |" in table
    saved = json.loads((tmp_path / "arch" / "comparison.json").read_text())
    assert [r["model"] for r in saved["rows"]] == ["unet", "segnet"] and saved["budget_minutes"] == 1
    assert PILImage.open(tmp_path / "arch" / "dice_vs_inference_time.png").size[0] > 400


def test_cli(phantoms_2d, tmp_path, capsys):
    code = main(["benchmark-architectures", str(phantoms_2d), "--models", "unet,fcn", "--budget", "1", "--out",
                 str(tmp_path / "arch"), "--size", "32", "--base-channels", "4", "--depth", "2", "--epochs", "1",
                 "--steps-per-epoch", "2", "--batch-size", "4", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| fcn | fcn |" in out and "comparison:" in out


@pytest.mark.parametrize("models, budget, message", [
    (["unet"], 1, "two or more"), (["unet", "vnet"], 1, "vnet unknown"), (["unet", "fcn"], 0, "--budget")])
def test_bad_requests(phantoms_2d, tmp_path, models, budget, message):
    with pytest.raises(MedsegError, match=message):
        benchmark_architectures(tiny_config(phantoms_2d, tmp_path / "x"), models, budget, tmp_path / "arch")


def test_cli_refuses_single_model_flags(phantoms_2d, tmp_path, capsys):
    assert main(["benchmark-architectures", str(phantoms_2d), "--model", "unet", "--out", str(tmp_path)]) != 0
    assert "--models and --budget" in capsys.readouterr().err
