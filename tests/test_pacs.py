"""The PACS round trip against a real Orthanc with its DICOMweb plugin (Debian's orthanc and orthanc-dicomweb),
started here on 127.0.0.1 and loaded with the shared DICOM study: pull a series, segment it, store the SEG back,
and read the SEG back from Orthanc."""
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import shared_dataset
from medseg.cli import main
from medseg.dicom_seg import read_dicom_seg
from medseg.io import read_image

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if not shutil.which("Orthanc") or not PLUGIN.exists():
        pytest.skip("needs Debian's orthanc and orthanc-dicomweb packages (.ci/run installs them)")
    folder = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    config = {"Name": "medseg-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
              "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "Plugins": [str(PLUGIN)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (folder / "orthanc.json").write_text(json.dumps(config))
    server = subprocess.Popen(["Orthanc", str(folder / "orthanc.json")], stdout=subprocess.DEVNULL,
                              stderr=open(folder / "orthanc.log", "w"))
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{base}/system", timeout=1)
            break
        except OSError:
            assert server.poll() is None, (folder / "orthanc.log").read_text()
            time.sleep(0.1)
    yield base
    server.terminate()
    server.wait(timeout=20)


def upload(base: str, folder: Path) -> str:
    """Load a series into Orthanc through its REST API; returns the StudyInstanceUID."""
    for path in sorted(folder.iterdir()):
        request = urllib.request.Request(f"{base}/instances", data=path.read_bytes(), method="POST",
                                         headers={"Content-Type": "application/dicom"})
        urllib.request.urlopen(request, timeout=20)
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID)


def test_pull_segment_store_and_read_the_seg_back_from_orthanc(orthanc, trained_3d, tmp_path, capfd):
    from dicomweb_client.api import DICOMwebClient

    series = shared_dataset("dicom_mr_study", "11_HCropVolume")
    study = upload(orthanc, series)
    url = f"{orthanc}/dicom-web"
    assert main(["pacs", str(trained_3d), "--url", url, "--study", study, "--out", str(tmp_path / "local"),
                 "--device", "cpu"]) == 0
    client = DICOMwebClient(url)
    segs = [s for s in client.search_for_series(study_instance_uid=study) if s["00080060"]["Value"] == ["SEG"]]
    assert len(segs) == 1
    seg_series = segs[0]["0020000E"]["Value"][0]
    (stored,) = client.retrieve_series(study, seg_series)
    (local_path,) = (tmp_path / "local").iterdir()
    local = pydicom.dcmread(local_path)
    assert stored.SOPInstanceUID == local.SOPInstanceUID and stored.StudyInstanceUID == study
    stored_path = tmp_path / "stored.dcm"
    stored.save_as(stored_path, enforce_file_format=True)
    reference = read_image(series)
    np.testing.assert_array_equal(read_dicom_seg(stored_path, reference), read_dicom_seg(local_path, reference))
    # the same network on the series read from disk gives the same mask
    assert main(["predict", str(trained_3d), str(series), "--out", str(tmp_path / "direct"), "--format", "nifti",
                 "--device", "cpu", "--quiet"]) == 0
    import nibabel as nib

    direct = np.asarray(nib.load(tmp_path / "direct" / f"{series.name}.nii.gz").dataobj)
    np.testing.assert_array_equal(read_dicom_seg(stored_path, reference), direct)
    out, err = capfd.readouterr()
    assert str(local.PatientName) not in out + err or not str(local.PatientName)


def test_a_study_with_several_series_asks_which(orthanc, trained_3d, capsys):
    study = upload(orthanc, shared_dataset("dicom_mr_study", "11-T1post-18670"))
    upload(orthanc, shared_dataset("dicom_mr_study", "37830-T2reg-78532"))
    assert main(["pacs", str(trained_3d), "--url", f"{orthanc}/dicom-web", "--study", study, "--device", "cpu"]) == 2
    assert "choose one with --series" in capsys.readouterr().err


def test_an_unreachable_server_is_one_line_within_seconds(trained_3d, capsys):
    started = time.monotonic()
    assert main(["pacs", str(trained_3d), "--url", f"http://127.0.0.1:{free_port()}/dicom-web", "--study", "1.2.3",
                 "--device", "cpu"]) == 2
    seconds = time.monotonic() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DICOMweb search failed" in err[0]
    assert seconds < 10, f"a refused connection took {seconds:.0f} s to report"  # the client's default: 30 s
