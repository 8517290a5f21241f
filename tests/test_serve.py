"""`medseg serve` driven as a user drives it: a real server on 127.0.0.1, the page in headless Chromium, a real
case uploaded, the overlay checked in the canvas, the mask downloaded and compared with the command line's."""
import io
import json
import shutil
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage

from conftest import shared_dataset, tiny_config
from medseg.cli import main
from test_pacs import free_port
from test_report import chromium

pytest.importorskip("fastapi", reason="medseg serve needs the serve extras (pip install 'medseg[serve]')")


@pytest.fixture(scope="module")
def isbi_run(tmp_path_factory):
    """A network briefly trained on ISBI 2012 sections: real data, and a mask that is not empty."""
    from medseg.train import train

    return train(tiny_config(shared_dataset("isbi2012_em"), tmp_path_factory.mktemp("serve") / "isbi",
                             fit="pad", size=128, steps=12, steps_per_epoch=6, lr=1e-2,
                             class_names=["background", "cell"], threads=2))


def start_server(run, limits=None) -> tuple[str, object]:
    import uvicorn

    from medseg.serve import NIIVUE, create_app

    if not (NIIVUE / "index.js").exists():
        pytest.skip(f"NiiVue is not installed in {NIIVUE.parents[2]} (scripts/env.sh runs npm ci where npm exists)")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(run, device="cpu", limits=limits), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


@pytest.fixture
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def upload_and_wait(driver, base: str, path: Path, page: str = "/") -> None:
    from selenium.webdriver.common.by import By

    driver.get(base + page)
    for _ in range(100):
        if driver.execute_script("return !!window.medseg"):
            break
        time.sleep(0.1)
    driver.find_element(By.ID, "file").send_keys(str(path))
    driver.find_element(By.CSS_SELECTOR, "#upload button").click()
    for _ in range(600):
        state = driver.execute_script("return document.body.dataset.state")
        if state:
            break
        time.sleep(0.1)
    assert state == "shown", driver.find_element(By.ID, "status").text


def downloads(driver) -> dict[str, bytes]:
    """Each download button clicked, and the bytes the page fetched for it (through fetch, with its token)."""
    import base64

    from selenium.webdriver.common.by import By

    got = {}
    for button in driver.find_elements(By.CSS_SELECTOR, "#downloads button"):
        driver.execute_script("window.medsegLastDownload = null")
        button.click()
        encoded = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const wait = () => {
              if (!window.medsegLastDownload) return setTimeout(wait, 50);
              const reader = new FileReader();
              reader.onload = () => done(reader.result.split(",")[1]);
              reader.readAsDataURL(window.medsegLastDownload);
            };
            wait();""")
        got[button.get_attribute("data-format")] = base64.b64decode(encoded)
    return got


def test_a_2d_image_is_segmented_shown_and_downloaded_as_the_cli_writes_it(isbi_run, browser, tmp_path):
    section = shared_dataset("isbi2012_em", "test") / "0.png"
    base, server = start_server(isbi_run)
    try:
        upload_and_wait(browser, base, section)
        shown = browser.execute_script("return window.medseg.overlayPixels()")
        assert shown > 1000  # the mask layer changes that many canvas pixels
        browser.find_element("css selector", "[data-class=cell]").click()  # hide the one class
        assert browser.execute_script("return window.medseg.overlayPixels()") < shown / 10
        files = downloads(browser)
        assert set(files) == {"NIfTI", "PNG"}
        served = np.asarray(PILImage.open(io.BytesIO(files["PNG"])))
    finally:
        server.should_exit = True
    assert main(["predict", str(isbi_run), str(section), "--out", str(tmp_path / "cli"), "--quiet",
                 "--device", "cpu"]) == 0
    np.testing.assert_array_equal(served, np.asarray(PILImage.open(tmp_path / "cli" / "0.png")))


def test_a_zipped_dicom_series_gets_three_planes_and_a_dicom_seg(trained_3d, browser, tmp_path):
    series = shared_dataset("dicom_mr_study", "11_HCropVolume")
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as target:
        for path in sorted(series.iterdir()):
            target.write(path, f"11_HCropVolume/{path.name}")
    base, server = start_server(trained_3d)
    try:
        upload_and_wait(browser, base, archive)
        assert browser.execute_script("return window.medseg.nv.opts.sliceType") == 3  # three planes
        assert browser.execute_script("return window.medseg.nv.volumes.length") == 3  # image, mask, uncertainty
        files = downloads(browser)
        assert set(files) == {"NIfTI", "DICOM SEG"}
        (tmp_path / "served.nii.gz").write_bytes(files["NIfTI"])
        job = browser.execute_script("return window.medseg.state().job")
        assert job["status"] == "done" and job["dims"] == 3
    finally:
        server.should_exit = True
    assert main(["predict", str(trained_3d), str(series), "--out", str(tmp_path / "cli"), "--quiet",
                 "--device", "cpu"]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "served.nii.gz").dataobj),
                                  np.asarray(nib.load(tmp_path / "cli" / f"{series.name}.nii.gz").dataobj))


def test_the_rest_api_for_scripts(trained_2d, phantoms_2d):
    base, server = start_server(trained_2d)
    try:
        source = phantoms_2d / "imagesTr" / "phantom_000.png"
        boundary = "medsegboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{source.name}\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + source.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"{base}/api/v1/segment", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        job = json.loads(urllib.request.urlopen(request).read())
        for _ in range(200):
            job = json.loads(urllib.request.urlopen(f"{base}/api/v1/jobs/{job['id']}").read())
            if job["status"] in ("done", "failed"):
                break
            time.sleep(0.05)
        assert job["status"] == "done" and "mask.png" in job["results"]
        schema = json.loads(urllib.request.urlopen(f"{base}/openapi.json").read())
        assert {"/api/v1/segment", "/api/v1/jobs/{job_id}"} <= set(schema["paths"])
        bad = urllib.request.Request(f"{base}/api/v1/segment", data=body.replace(b"phantom_000.png", b"notes.txt"),
                                     method="POST", headers=request.headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad)
        assert refused.value.code == 400
    finally:
        server.should_exit = True
