import base64
import csv
import io
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image as PILImage

from medseg.cli import main
from medseg.infer import uncertainty
from medseg.report import chosen_cases, write_report

INLINE_PNG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def report_2d(trained_2d, tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(trained_2d, run)
    shutil.rmtree(run / "evaluation", ignore_errors=True)  # the report evaluates a run that was not evaluated
    return run, *write_report(run, progress=False)


def test_html_is_self_contained_with_every_section(report_2d):
    run, page, markdown = report_2d
    text = page.read_text()
    for heading in ("Metrics per class", "Training", "Metric distributions", "Best, median and worst cases",
                    "Configuration and plan", "Every case"):
        assert f"<h2>{heading}</h2>" in text and f"## {heading}" in markdown.read_text()
    images = INLINE_PNG.findall(text)
    # curves, distributions, and the two validation cases (best = median with two cases, then worst)
    assert len(images) == 4 and "src=\"http" not in text and "src=\"file" not in text
    for data in images:
        assert PILImage.open(io.BytesIO(base64.b64decode(data))).size[0] > 300
    with open(run / "evaluation" / "per_case.csv") as handle:
        cases = {row["case"] for row in csv.DictReader(handle)}
    assert all(f"<td>{case}</td>" in text for case in cases)
    assert "uncertainty" in text.lower() and "ellipse" in text and "ring" in text


def test_markdown_twin_points_at_files_that_exist(report_2d):
    _, _, markdown = report_2d
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown.read_text())
    assert len(links) == 4 and all((markdown.parent / link).is_file() for link in links)


def test_report_of_a_volume_run_names_the_slice(trained_3d, tmp_path):
    page, _ = write_report(trained_3d, out=tmp_path / "volume.html", progress=False)
    assert re.search(r"case \S+, mean Dice [0-9.]+, slice \d+ along axis \d", page.read_text())


def test_cli_report(trained_2d, tmp_path, capsys):
    assert main(["report", str(trained_2d), "--out", str(tmp_path / "r.html"), "--quiet"]) == 0
    assert "report:" in capsys.readouterr().out and (tmp_path / "r.md").exists()


def test_cli_report_on_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) != 0
    assert "not a training run" in capsys.readouterr().err


def test_best_median_worst():
    rows = [{"case": c, "class": k, "dice": d} for c, k, d in
            [("a", "x", 0.9), ("a", "y", 0.7), ("b", "x", 0.2), ("b", "y", 0.4), ("c", "x", 1.0), ("c", "y", 1.0)]]
    assert chosen_cases(rows) == [("best", "c", 1.0), ("median", "a", 0.8), ("worst", "b", pytest.approx(0.3))]
    assert [c for _, c, _ in chosen_cases(rows[:2])] == ["a"]


def test_uncertainty_is_scaled_entropy():
    certain = np.zeros((3, 4, 4))
    certain[1] = 1
    assert np.allclose(uncertainty(certain), 0, atol=1e-9)
    assert np.allclose(uncertainty(np.full((3, 4, 4), 1 / 3)), 1)
    assert np.allclose(uncertainty(np.full((2, 4), 0.5), regions=True), 1)
    assert 0 < uncertainty(np.array([[0.9], [0.1]]))[0] < 1


def chromium():
    """A headless Chromium through Selenium with the Debian chromedriver, or skip (fail in CI) without them."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if webdriver is None or not browser or not driver:
        message = "headless Chromium needs selenium and Debian's chromium + chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (.ci/run installs them)")
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_report_renders_in_headless_chromium(report_2d, tmp_path):
    _, page, _ = report_2d
    browser = chromium()
    try:
        browser.get(page.resolve().as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        text = browser.execute_script("return document.body.innerText")
        height = browser.execute_script("return document.body.scrollHeight")
        browser.save_screenshot(str(tmp_path / "page.png"))
    finally:
        browser.quit()
    assert len(images) == 4 and all(done and w > 300 and h > 100 for done, w, h in images)  # none broken
    assert "Mean foreground Dice" in text and len(text) > 1000 and height > 1600
    shot = np.asarray(PILImage.open(tmp_path / "page.png").convert("L"), dtype=float)
    assert shot.std() > 10  # not a blank page
