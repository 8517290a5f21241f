"""Masks of DICOM series written back as DICOM Segmentation objects (highdicom), for PACS and DICOM viewers.

A SEG references every slice of its source series (frame k segments source slice k, in the order the volume was
built along the slice normal), names one segment per foreground class with the class name and a display colour,
and marks its algorithm as medseg's. Patient and study modules are copied from the source, as the SEG IOD
requires; medseg never logs them.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from medseg.datasets import class_dtype
from medseg.errors import MedsegError

# SNOMED CT: the generic concept for a segmented structure where the data gives no code of its own; DICOM CID 7162
CATEGORY = ("91723000", "SCT", "Anatomical Structure")
PROPERTY = ("85756007", "SCT", "Tissue")
FAMILY = ("123110", "DCM", "Artificial Intelligence")
# Every SEG says what made it, where a radiologist sees it: an unvalidated research model, not a clinical device
RESEARCH_LABEL = "MEDSEG_RESEARCH"  # ContentLabel (CS, 16 characters at most)
RESEARCH_NOTE = "Unvalidated research model (medseg); not for clinical use"  # ContentDescription (LO, 64)
RESEARCH_SERIES = "medseg research segmentation - not for clinical use"  # SeriesDescription (LO, 64)
TYPE_2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def write_dicom_seg(mask: np.ndarray, reference, class_names: list[str], path: Path, colours: list | None = None,
                    codes: dict | None = None) -> Path:
    """Write `mask` (class indices on the series' volume grid, as `medseg.dicom.read_dicom_series` lays it out)
    as a binary DICOM SEG at `path`; one segment per foreground class, coded with `codes[str(index)]` ("category"
    and "type", each [value, scheme, meaning], from the training data's dataset.json) or generic concepts."""
    try:
        import highdicom as hd
    except ImportError as exc:
        raise MedsegError("--format dicom-seg needs the highdicom package: pip install 'medseg[deploy]'") from exc
    import pydicom
    from pydicom.sr.coding import Code

    from medseg import __version__
    from medseg.figures import PALETTE
    from medseg.io import atomic_path

    files = reference.meta.get("files") if reference.meta.get("format") == "dicom" else None
    if not files:
        raise MedsegError(f"{reference.path}: --format dicom-seg needs a DICOM series as input (this is "
                          f"{reference.meta.get('format', 'not DICOM')})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sources = [pydicom.dcmread(f) for f in files]
    for source in sources:  # type 2 attributes the SEG copies: present, empty where a de-identified source lacks them
        for keyword in TYPE_2_COPIED:
            if keyword not in source:
                setattr(source, keyword, "")
    frames = np.ascontiguousarray(np.transpose(mask, (2, 1, 0)))  # (X, Y, Z) -> (slice, row, col)
    palette = colours or PALETTE
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=k, segment_label=name[:64],
            segmented_property_category=Code(*(codes or {}).get(str(k), {}).get("category", CATEGORY)),
            segmented_property_type=Code(*(codes or {}).get(str(k), {}).get("type", PROPERTY)),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="medseg", version=__version__, family=Code(*FAMILY)),
            display_color=hd.color.CIELabColor.from_rgb(*(int(round(c * 255)) for c in palette[k % len(palette)])))
        for k, name in enumerate(class_names) if k]
    present = np.unique(frames)
    if present.max(initial=0) >= len(class_names):
        raise MedsegError(f"{reference.path}: the mask holds class {present.max()} and the model names "
                          f"{len(class_names)} classes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=_series_number(sources),
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medseg", manufacturer_model_name="medseg",
            software_versions=__version__, device_serial_number="none", content_label=RESEARCH_LABEL,
            content_description=RESEARCH_NOTE, omit_empty_frames=False)
    seg.SeriesDescription = RESEARCH_SERIES  # what a PACS viewer lists beside the clinical series
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path


def run_segment_codes(run: Path) -> dict:
    """The coded concepts a run's training data gave its classes (RUN/dataset.json), or none."""
    import json

    path = Path(run) / "dataset.json"
    return json.loads(path.read_text()).get("segment_codes") or {} if path.exists() else {}


def _series_number(sources: list) -> int:
    """One above the source's, so viewers list the SEG beside its series."""
    return int(sources[0].get("SeriesNumber", 0) or 0) + 1000


def read_dicom_seg(path: Path, reference) -> np.ndarray:
    """A SEG written for `reference` (a series read by medseg) back as class indices on the series' volume grid."""
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(str(path))
    files = reference.meta["files"]
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    numbers = seg.get_segment_numbers()
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=numbers,
                                               combine_segments=True, relabel=False)
    labels = np.transpose(frames, (2, 1, 0))  # (slice, row, col) -> (X, Y, Z)
    return labels.astype(class_dtype(int(labels.max(initial=0))))
