"""A PACS round trip over DICOMweb: pull a series (QIDO-RS, WADO-RS), segment it, store the DICOM SEG back
(STOW-RS) into the same study.

    medseg pacs RUN --url http://pacs.example/dicom-web --study STUDY_UID [--series UID_OR_DESCRIPTION]

The series is held in a temporary folder only while it is segmented; the SEG is also kept in `--out` when given.
Nothing identifying the patient is printed: lines name the study and series by UID.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from medseg.errors import MedsegError

SERIES_UID, DESCRIPTION, MODALITY, SOP_UID = "0020000E", "0008103E", "00080060", "00080018"
RETRY_ATTEMPTS, RETRY_WAIT_MS = 3, 500


def _client(url: str):
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError as exc:
        raise MedsegError("medseg pacs needs the dicomweb-client package: pip install 'medseg[deploy]'") from exc
    client = DICOMwebClient(url=url.rstrip("/"))
    # the client's default is 5 attempts over 30 s, for refused connections too: a mistyped address then sat half
    # a minute before its error. Three attempts, 1 s and 2 s apart, still ride out a server's brief 503s.
    client.set_http_retry_params(max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=RETRY_WAIT_MS)
    return client


def _value(attributes: dict, tag: str) -> str:
    values = attributes.get(tag, {}).get("Value") or [""]
    return str(values[0])


def choose_series(client, study: str, series: str | None, url: str) -> str:
    """The series to segment: the one given (UID or description), or the study's only image series."""
    try:
        found = client.search_for_series(study_instance_uid=study)
    except Exception as exc:  # connection refused, HTTP errors: the server's problem, in one line
        raise MedsegError(f"{url}: DICOMweb search failed ({type(exc).__name__}: {exc})") from exc
    images = [s for s in found if _value(s, MODALITY) not in ("SEG", "SR", "PR", "RTSTRUCT")]
    listing = "; ".join(f"{_value(s, SERIES_UID)} ('{_value(s, DESCRIPTION)}')" for s in images)
    if series is not None:
        matches = [s for s in images if series in (_value(s, SERIES_UID), _value(s, DESCRIPTION))]
        if len(matches) != 1:
            raise MedsegError(f"{url}: --series {series!r} matches {len(matches)} image series of study {study}; "
                              f"available: {listing or 'none'}")
        return _value(matches[0], SERIES_UID)
    if len(images) != 1:
        raise MedsegError(f"{url}: study {study} holds {len(images)} image series; choose one with --series "
                          f"UID_OR_DESCRIPTION (available: {listing or 'none'})")
    return _value(images[0], SERIES_UID)


def segment_from_pacs(run: str | Path, url: str, study: str, series: str | None = None, out: str | Path | None = None,
                      device: str = "auto") -> dict:
    """Pull, segment, store; returns what was stored (UIDs and the local copy's path)."""
    import pydicom

    from medseg.checkpoint import load_models
    from medseg.compiling import adapt_for_inference
    from medseg.dicom_seg import run_segment_codes, write_dicom_seg
    from medseg.infer import predict_image
    from medseg.io import read_image

    models = adapt_for_inference(load_models(run, device=device))  # a CT series' many windows compile, as in predict
    client = _client(url)
    series_uid = choose_series(client, study, series, url)
    folder = Path(tempfile.mkdtemp(prefix="medseg-pacs-"))
    try:
        try:
            instances = client.retrieve_series(study, series_uid)
        except Exception as exc:
            raise MedsegError(f"{url}: retrieving series {series_uid} failed ({type(exc).__name__}: {exc})") from exc
        for number, dataset in enumerate(instances):
            dataset.save_as(folder / f"{number:05d}.dcm", enforce_file_format=True)
        image = read_image(folder)
        labels = predict_image(models, image)
        local = Path(out) / f"{series_uid}.seg.dcm" if out else folder / "segmentation.seg.dcm"
        write_dicom_seg(labels, image, models[0].class_names, local, codes=run_segment_codes(models[0].run))
        seg = pydicom.dcmread(local)
        try:
            client.store_instances([seg], study_instance_uid=study)
        except Exception as exc:
            raise MedsegError(f"{url}: storing the SEG failed ({type(exc).__name__}: {exc})") from exc
        return {"study": study, "series": series_uid, "slices": len(instances),
                "seg_series": str(seg.SeriesInstanceUID), "seg_instance": str(seg.SOPInstanceUID),
                "local": str(local) if out else None}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
