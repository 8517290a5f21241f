"""A PACS round trip over DICOMweb: pull a series (QIDO-RS, WADO-RS), segment it, and, with `--store`, store the
DICOM SEG back (STOW-RS) into the same study.

    medseg pacs RUN --url https://pacs.example/dicom-web --study STUDY_UID [--series UID_OR_DESCRIPTION] --store

The series is held in a marked temporary folder only while it is segmented (swept at the next start if the job is
killed); the SEG is kept in `--out` when given, and written into the clinical study only with `--store`. It says,
in its SeriesDescription, ContentLabel and ContentDescription, that an unvalidated research model made it.
Credentials come from the environment or a file, never the command line (the process list shows it): a bearer
token (MEDSEG_PACS_TOKEN) or a user and password (MEDSEG_PACS_USER, MEDSEG_PACS_PASSWORD), or `--credentials FILE`
holding `user:password` or `token:TOKEN`; `--ca-bundle` checks the server's certificate against the hospital's CA,
`--client-cert`/`--client-key` present one. Every retrieved instance must belong to the requested study and
series, and every UID the server returns is checked before it names anything. Nothing identifying the patient is
printed, and no line carries a series description or the URL's credentials: lines name studies and series by UID.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from medseg import workdirs
from medseg.errors import MedsegError

SERIES_UID, DESCRIPTION, MODALITY, SOP_UID = "0020000E", "0008103E", "00080060", "00080018"
RETRY_ATTEMPTS, RETRY_WAIT_MS = 3, 500
UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")  # DICOM PS3.5 9.1: digits and dots, 64 at most


def check_uid(value: str, what: str) -> str:
    """`value` if it is a DICOM UID; else one line refusing it (it would otherwise name files on this disk)."""
    if not isinstance(value, str) or len(value) > 64 or not UID.match(value):
        raise MedsegError(f"{what}: not a DICOM UID (digits and dots, at most 64 characters); refused")
    return value


def shown(url: str) -> str:
    """The URL as lines may show it: no user, password, query or fragment."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname
                       else parts.netloc, parts.path, "", ""))


def credentials(path: str | None = None) -> dict:
    """How to authenticate: {"token": ...} or {"user": ..., "password": ...} from --credentials FILE or the
    environment; {} for none."""
    if path:
        try:
            text = Path(path).read_text().strip()
        except OSError as exc:
            raise MedsegError(f"--credentials {path}: cannot be read ({exc.strerror})") from exc
        kind, _, secret = text.partition(":")
        if not secret:
            raise MedsegError(f"--credentials {path}: write user:password or token:TOKEN on one line")
        return {"token": secret} if kind == "token" else {"user": kind, "password": secret}
    if os.environ.get("MEDSEG_PACS_TOKEN"):
        return {"token": os.environ["MEDSEG_PACS_TOKEN"]}
    if os.environ.get("MEDSEG_PACS_USER"):
        return {"user": os.environ["MEDSEG_PACS_USER"], "password": os.environ.get("MEDSEG_PACS_PASSWORD", "")}
    return {}


def _client(url: str, login: dict | None = None, ca_bundle: str | None = None, client_cert: str | None = None,
            client_key: str | None = None):
    try:
        import requests
        from dicomweb_client.api import DICOMwebClient
    except ImportError as exc:
        raise MedsegError("medseg pacs needs the dicomweb-client package: pip install 'medseg[deploy]'") from exc
    session = requests.Session()
    login = login or {}
    if "token" in login:
        session.headers["Authorization"] = f"Bearer {login['token']}"
    elif "user" in login:
        session.auth = (login["user"], login["password"])
    if ca_bundle:
        session.verify = ca_bundle
    if client_cert:
        session.cert = (client_cert, client_key) if client_key else client_cert
    client = DICOMwebClient(url=url.rstrip("/"), session=session)
    # the client's default is 5 attempts over 30 s, for refused connections too: a mistyped address then sat half
    # a minute before its error. Three attempts, 1 s and 2 s apart, still ride out a server's brief 503s.
    client.set_http_retry_params(max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=RETRY_WAIT_MS)
    return client


def _value(attributes: dict, tag: str) -> str:
    values = attributes.get(tag, {}).get("Value") or [""]
    return str(values[0])


def choose_series(client, study: str, series: str | None, url: str) -> str:
    """The series to segment: the one given (UID or description), or the study's only image series (its UID,
    checked). Error lines list series by UID only: a description may carry what identifies a patient."""
    try:
        found = client.search_for_series(study_instance_uid=study)
    except Exception as exc:  # connection refused, HTTP errors: the server's problem, in one line
        raise MedsegError(f"{shown(url)}: DICOMweb search failed ({type(exc).__name__})") from exc
    images = [s for s in found if _value(s, MODALITY) not in ("SEG", "SR", "PR", "RTSTRUCT")]
    listing = "; ".join(_value(s, SERIES_UID)[:64] for s in images)
    if series is not None:
        matches = [s for s in images if series in (_value(s, SERIES_UID), _value(s, DESCRIPTION))]
        if len(matches) != 1:
            raise MedsegError(f"{shown(url)}: --series matches {len(matches)} image series of study {study}; "
                              f"available: {listing or 'none'}")
        return check_uid(_value(matches[0], SERIES_UID), f"{shown(url)}: the series UID the server returned")
    if len(images) != 1:
        raise MedsegError(f"{shown(url)}: study {study} holds {len(images)} image series; choose one with --series "
                          f"UID_OR_DESCRIPTION (available: {listing or 'none'})")
    return check_uid(_value(images[0], SERIES_UID), f"{shown(url)}: the series UID the server returned")


def segment_from_pacs(run: str | Path, url: str, study: str, series: str | None = None, out: str | Path | None = None,
                      device: str = "auto", store: bool = False, login: dict | None = None,
                      ca_bundle: str | None = None, client_cert: str | None = None,
                      client_key: str | None = None) -> dict:
    """Pull, segment, keep (`out`) and store (`store`); returns what was done (UIDs and the local copy's path)."""
    import pydicom

    from medseg.checkpoint import load_models
    from medseg.compiling import adapt_for_inference
    from medseg.dicom_seg import run_segment_codes, write_dicom_seg
    from medseg.infer import predict_image
    from medseg.io import read_image

    if not store and not out:
        raise MedsegError("nothing would be kept: pass --out DIR to keep the SEG here, and --store to write it into "
                          "the study on the server (research output: only where your site allows it)")
    check_uid(study, "--study")
    models = adapt_for_inference(load_models(run, device=device))  # a CT series' many windows compile, as in predict
    client = _client(url, login, ca_bundle, client_cert, client_key)
    series_uid = choose_series(client, study, series, url)
    folder = workdirs.make("pacs")  # a series of a patient: swept at the next start if this process is killed
    try:
        try:
            instances = client.retrieve_series(study, series_uid)
        except Exception as exc:
            raise MedsegError(f"{shown(url)}: retrieving series {series_uid} failed ({type(exc).__name__})") from exc
        for number, dataset in enumerate(instances):
            if str(dataset.get("StudyInstanceUID", "")) != study or \
                    str(dataset.get("SeriesInstanceUID", "")) != series_uid:
                raise MedsegError(f"{shown(url)}: instance {number + 1} of the answer for series {series_uid} belongs "
                                  "to another study or series; refused (nothing was segmented or stored)")
            dataset.save_as(folder / f"{number:05d}.dcm", enforce_file_format=True)
        image = read_image(folder)
        labels = predict_image(models, image)
        local = Path(out) / f"{series_uid}.seg.dcm" if out else folder / "segmentation.seg.dcm"
        write_dicom_seg(labels, image, models[0].class_names, local, codes=run_segment_codes(models[0].run))
        seg = pydicom.dcmread(local)
        if store:
            try:
                client.store_instances([seg], study_instance_uid=study)
            except Exception as exc:
                raise MedsegError(f"{shown(url)}: storing the SEG failed ({type(exc).__name__})") from exc
        return {"study": study, "series": series_uid, "slices": len(instances), "stored": store,
                "seg_series": str(seg.SeriesInstanceUID), "seg_instance": str(seg.SOPInstanceUID),
                "local": str(local) if out else None}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
