"""The PACS round trip against a real Orthanc with its DICOMweb plugin (Debian's orthanc and orthanc-dicomweb),
started here on 127.0.0.1 and loaded with the shared DICOM study: pull a series, segment it, store the SEG back,
and read the SEG back from Orthanc."""
import base64
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
USER, PASSWORD = "medseg", "pw-only-for-these-tests"
BASIC = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


@pytest.fixture
def login(monkeypatch):
    """The PACS account, as a site would give it: in the environment, never on the command line."""
    monkeypatch.setenv("MEDSEG_PACS_USER", USER)
    monkeypatch.setenv("MEDSEG_PACS_PASSWORD", PASSWORD)


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
              "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}, "Plugins": [str(PLUGIN)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (folder / "orthanc.json").write_text(json.dumps(config))
    server = subprocess.Popen(["Orthanc", str(folder / "orthanc.json")], stdout=subprocess.DEVNULL,
                              stderr=open(folder / "orthanc.log", "w"))
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(urllib.request.Request(f"{base}/system", headers=BASIC), timeout=1)
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
                                         headers={"Content-Type": "application/dicom", **BASIC})
        urllib.request.urlopen(request, timeout=20)
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID)


def test_pull_segment_store_and_read_the_seg_back_from_orthanc(orthanc, trained_3d, tmp_path, capfd, login):
    from dicomweb_client.api import DICOMwebClient

    from medseg.pacs import _client, credentials

    series = shared_dataset("dicom_mr_study", "11_HCropVolume")
    study = upload(orthanc, series)
    url = f"{orthanc}/dicom-web"
    assert main(["pacs", str(trained_3d), "--url", url, "--study", study, "--out", str(tmp_path / "local"),
                 "--device", "cpu"]) == 0  # without --store: kept here only
    client = _client(url, credentials())
    assert not [s for s in client.search_for_series(study_instance_uid=study) if s["00080060"]["Value"] == ["SEG"]]
    shutil.rmtree(tmp_path / "local")
    assert main(["pacs", str(trained_3d), "--url", url, "--study", study, "--out", str(tmp_path / "local"),
                 "--device", "cpu", "--store"]) == 0
    assert isinstance(client, DICOMwebClient)
    segs = [s for s in client.search_for_series(study_instance_uid=study) if s["00080060"]["Value"] == ["SEG"]]
    assert len(segs) == 1
    seg_series = segs[0]["0020000E"]["Value"][0]
    (stored,) = client.retrieve_series(study, seg_series)
    (local_path,) = (tmp_path / "local").iterdir()
    local = pydicom.dcmread(local_path)
    assert stored.SOPInstanceUID == local.SOPInstanceUID and stored.StudyInstanceUID == study
    assert "not for clinical use" in stored.SeriesDescription and stored.ContentLabel == "MEDSEG_RESEARCH"
    assert "Unvalidated research model" in stored.ContentDescription
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
    patient = str(pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True).PatientName)
    assert patient  # the study names its patient, so the check below can fail
    assert patient not in out + err


def test_a_study_with_several_series_asks_which_by_uid_only(orthanc, trained_3d, capsys, login, tmp_path):
    first, second = (shared_dataset("dicom_mr_study", name) for name in ("11-T1post-18670", "37830-T2reg-78532"))
    study = upload(orthanc, first)
    upload(orthanc, second)
    assert main(["pacs", str(trained_3d), "--url", f"{orthanc}/dicom-web", "--study", study, "--device", "cpu",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "choose one with --series" in err
    description = str(pydicom.dcmread(next(first.iterdir()), stop_before_pixels=True).SeriesDescription)
    assert description and description not in err  # a description may name a patient: UIDs only


def test_without_credentials_the_server_refuses_and_no_secret_is_printed(orthanc, trained_3d, capsys, tmp_path):
    study = upload(orthanc, shared_dataset("dicom_mr_study", "11_HCropVolume"))
    assert main(["pacs", str(trained_3d), "--url", f"{orthanc}/dicom-web", "--study", study, "--device", "cpu",
                 "--out", str(tmp_path)]) == 2
    assert "DICOMweb search failed (HTTPError)" in capsys.readouterr().err
    secret = tmp_path / "pacs.credentials"
    secret.write_text(f"{USER}:{PASSWORD}\n")
    assert main(["pacs", str(trained_3d), "--url", f"http://{USER}:{PASSWORD}@{orthanc[7:]}/dicom-web",
                 "--study", "1.2.3.4", "--device", "cpu", "--out", str(tmp_path), "--credentials", str(secret)]) == 2
    err = capsys.readouterr().err  # signed in, the study is unknown; the line does not show the password
    assert PASSWORD not in err and "holds 0 image series" in err


def test_an_unreachable_server_is_one_line_within_seconds(trained_3d, capsys, tmp_path):
    started = time.monotonic()
    assert main(["pacs", str(trained_3d), "--url", f"http://127.0.0.1:{free_port()}/dicom-web", "--study", "1.2.3",
                 "--device", "cpu", "--out", str(tmp_path)]) == 2
    seconds = time.monotonic() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DICOMweb search failed" in err[0]
    assert seconds < 10, f"a refused connection took {seconds:.0f} s to report"  # the client's default: 30 s


class HostileServer:
    """A DICOMweb client's stand-in whose answers a hostile or broken server could give."""

    def __init__(self, series_uid: str, instances: list):
        self.series_uid, self.instances = series_uid, instances

    def search_for_series(self, study_instance_uid):
        return [{"0020000E": {"Value": [self.series_uid]}, "00080060": {"Value": ["MR"]}}]

    def retrieve_series(self, study, series):
        return self.instances

    def store_instances(self, *args, **kwargs):
        raise AssertionError("nothing may be stored")


def test_a_hostile_server_cannot_name_files_or_slip_in_other_series(trained_3d, tmp_path, monkeypatch):
    import medseg.pacs as pacs
    from medseg.errors import MedsegError

    slices = [pydicom.dcmread(p) for p in sorted(shared_dataset("dicom_mr_study", "11_HCropVolume").iterdir())]
    study, series = str(slices[0].StudyInstanceUID), str(slices[0].SeriesInstanceUID)
    for uid in ("../../../escaped", "1.2.3/../x", "1." + "2" * 70):  # a path, a path in a UID, 72 characters
        monkeypatch.setattr(pacs, "_client", lambda *args, uid=uid: HostileServer(uid, slices))
        with pytest.raises(MedsegError, match="not a DICOM UID"):
            pacs.segment_from_pacs(trained_3d, "http://pacs", study, out=tmp_path / "out", device="cpu", store=True)
    other = pydicom.dcmread(next(shared_dataset("dicom_mr_study", "11-T1post-18670").iterdir()))
    monkeypatch.setattr(pacs, "_client", lambda *args: HostileServer(series, slices[:3] + [other] + slices[3:]))
    with pytest.raises(MedsegError, match="instance 4 of the answer .* belongs to another study or series"):
        pacs.segment_from_pacs(trained_3d, "http://pacs", study, out=tmp_path / "out", device="cpu", store=True)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    with pytest.raises(MedsegError, match="not a DICOM UID"):
        pacs.segment_from_pacs(trained_3d, "http://pacs", "1.2.3; DROP", out=tmp_path, device="cpu")
    with pytest.raises(MedsegError, match="nothing would be kept"):
        pacs.segment_from_pacs(trained_3d, "http://pacs", study, device="cpu")


def test_credentials_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from medseg.pacs import _client, credentials, shown

    for name in ("MEDSEG_PACS_TOKEN", "MEDSEG_PACS_USER", "MEDSEG_PACS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    assert credentials() == {}
    (tmp_path / "c").write_text("token:abc123\n")
    assert credentials(str(tmp_path / "c")) == {"token": "abc123"}
    monkeypatch.setenv("MEDSEG_PACS_USER", "u")
    monkeypatch.setenv("MEDSEG_PACS_PASSWORD", "p:w")
    assert credentials() == {"user": "u", "password": "p:w"}
    client = _client("https://pacs/dicom-web", credentials(), ca_bundle=str(tmp_path / "ca.pem"),
                     client_cert=str(tmp_path / "me.pem"), client_key=str(tmp_path / "me.key"))
    session = client._session
    assert session.auth == ("u", "p:w") and session.verify == str(tmp_path / "ca.pem")
    assert session.cert == (str(tmp_path / "me.pem"), str(tmp_path / "me.key"))
    assert shown("https://u:secret@pacs:8443/dicom-web?token=x#f") == "https://pacs:8443/dicom-web"
