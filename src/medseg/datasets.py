"""Find labelled cases in a folder or manifest, turn masks into class indices, and split by case.

Layouts, tried in this order:
  (a) MSD / nnU-Net: `dataset.json` and/or `imagesTr/` + `labelsTr/` (MSD names, or nnU-Net's `_0000` channels);
  (b) paired folders: an image folder (image/images/img/...) and a mask folder (label/labels/mask/masks/gt/...)
      directly in DATA or one level below it (e.g. `train/image`, `train/label`), matched by file name;
  (c) a CSV manifest with columns `image`, `mask` (or `label`) and an optional `case_id`;
  (d) BraTS: one folder per case holding `<case>_{flair,t1,t1ce,t2}.nii.gz` (any subset, the same in every case)
      and `<case>_seg.nii.gz`; modalities are stacked as channels in that fixed order;
  (e) DRIVE: `images/NN_*.tif`, `1st_manual/NN_manual1.gif` (the labels) and optionally `mask/NN_*_mask.gif`, the
      field of view: a region of interest outside which nothing is scored. Found in DATA or one level below.
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.console import note, notice
from medseg.errors import MedsegError
from medseg.io import is_supported, stem_of

IMAGE_DIR_NAMES = ("images", "image", "img", "imgs", "imagesTr")
MASK_DIR_NAMES = ("labels", "label", "masks", "mask", "gt", "groundtruth", "ground_truth", "labelsTr")
MASK_SUFFIXES = ("", "_mask", "_label", "_labels", "_seg", "_gt", "_manual1")
BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
DRIVE_LABELS = "1st_manual"
BRATS_LABELS = ["background", "necrosis", "edema", "non-enhancing", "enhancing"]
# Files without a partner are listed before any work; above this share of all files found, reading refuses (a
# misnamed folder, not a few unlabelled extras) unless --allow-unmatched says the user meant it
MAX_UNMATCHED = 0.10


@dataclass
class Case:
    """One labelled case: its image file(s) (one per channel), its mask file and, where the dataset has one, a
    region-of-interest file (e.g. DRIVE's field of view): metrics count only the pixels inside it."""

    case_id: str
    images: list[Path]
    mask: Path
    roi: Path | None = None
    largest_label: int | None = None  # the largest class its dataset declares (dataset.json); None: undeclared


@dataclass
class Dataset:
    cases: list[Case]
    class_names: list[str]  # index 0 is background; may be extended once labels are read
    layout: str
    root: Path
    modalities: list[str] = field(default_factory=list)
    declared_labels: list[int] | None = None  # mask values the dataset declares (dataset.json); None: not declared
    left_out: dict[str, list[str]] = field(default_factory=dict)  # e.g. "images without a mask" -> file names
    grouped: bool = False  # a manifest's case_id column may repeat: rows of one patient, split together
    # coded concepts per class index for DICOM SEG (dataset.json "segment_codes"), e.g. {"1": {"category": [value,
    # scheme, meaning], "type": [value, scheme, meaning]}}
    segment_codes: dict[str, dict] = field(default_factory=dict)


def find_cases(data: str | Path, images: str | None = None, masks: str | None = None,
               allow_unmatched: bool = False) -> Dataset:
    """Find the cases in DATA (a folder or a .csv manifest). `images`/`masks` name the folders explicitly.

    Nothing is dropped in silence: every file left out (an image without a mask, a mask without an image) is
    listed, and more than MAX_UNMATCHED of them stops here unless `allow_unmatched`. Case ids must be unique."""
    root = Path(data)
    if not root.exists():
        raise MedsegError(f"{root}: dataset not found; pass a folder or a CSV manifest")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise MedsegError(f"{root}: a dataset is a folder or a .csv manifest, not a single file")
        dataset = _from_manifest(root)
    elif images or masks:
        if not (images and masks):
            raise MedsegError(f"{root}: give both --images and --masks, or neither")
        dataset = _from_pairs(root, root / images, root / masks)
    elif (root / "dataset.json").exists() or (root / "imagesTr").is_dir():
        dataset = _from_msd(root)
    elif any(root.glob("*/*_seg.nii*")):
        dataset = _from_brats(root)
    elif (root / DRIVE_LABELS).is_dir() or any(root.glob(f"*/{DRIVE_LABELS}")):
        dataset = _from_drive(root if (root / DRIVE_LABELS).is_dir() else next(root.glob(f"*/{DRIVE_LABELS}")).parent)
    else:
        dataset = _from_detected_pairs(root)
    if not dataset.cases:
        raise MedsegError(f"{root}: no labelled cases found ({dataset.layout} layout); check the folder names"
                          f"{'; ' + _left_out_line(dataset) if dataset.left_out else ''}")
    _check_unique_ids(dataset)
    _report_left_out(dataset, allow_unmatched)
    return dataset


def _left_out_line(dataset: Dataset) -> str:
    def first(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return "left out: " + "; ".join(f"{len(names)} {kind} ({first(names)})" for kind, names in dataset.left_out.items())


def _report_left_out(dataset: Dataset, allow: bool) -> None:
    if not dataset.left_out:
        return
    unmatched = sum(len(names) for names in dataset.left_out.values())
    share = unmatched / (unmatched + len(dataset.cases))
    line = f"{dataset.root}: {len(dataset.cases)} cases matched; {_left_out_line(dataset)}"
    if share > MAX_UNMATCHED and not allow:
        raise MedsegError(f"{line}. That is {share:.0%} of the files, more than {MAX_UNMATCHED:.0%}: rename them so "
                          f"images and masks pair up, or pass --allow-unmatched to use the {len(dataset.cases)} "
                          "matched cases")
    notice(line)


def _check_unique_ids(dataset: Dataset) -> None:
    if dataset.grouped:
        return
    seen: dict[str, Case] = {}
    for case in dataset.cases:
        if case.case_id in seen:
            raise MedsegError(f"{case.images[0]}: case id '{case.case_id}' is also the id of "
                              f"{seen[case.case_id].images[0]}; case ids must be unique (rename one, or list them "
                              "in a CSV manifest whose case_id column says which rows belong to one patient)")
        seen[case.case_id] = case


def read_dataset_json(path: Path) -> dict:
    """dataset.json as a dictionary whose fields medseg reads have the shapes MSD and nnU-Net give them."""
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MedsegError(f"{path}: not valid JSON ({exc}); fix or remove the file") from exc
    if not isinstance(meta, dict):
        raise MedsegError(f"{path}: holds a {type(meta).__name__}; dataset.json must be an object with fields such "
                          "as labels and training")
    for key, kind, example in (("labels", dict, '{"0": "background", "1": "tumour"}'),
                               ("segment_codes", dict, '{"1": {"category": [...], "type": [...]}}'),
                               ("modality", dict, '{"0": "MRI"}'), ("channel_names", dict, '{"0": "MRI"}'),
                               ("training", list, '[{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]')):
        if key in meta and not isinstance(meta[key], kind):
            raise MedsegError(f"{path}: '{key}' must be {'an object' if kind is dict else 'a list'}, e.g. {example}")
    for label, codes in (meta.get("segment_codes") or {}).items():
        triples = [codes.get(k) for k in ("category", "type")] if isinstance(codes, dict) else [None]
        if not all(isinstance(t, list) and len(t) == 3 and all(isinstance(v, str) for v in t) for t in triples):
            raise MedsegError(f"{path}: segment_codes[{label!r}] needs \"category\" and \"type\", each [code value, "
                              'scheme, meaning], e.g. {"category": ["91723000", "SCT", "Anatomical Structure"], '
                              '"type": ["5279000", "SCT", "Hippocampus"]}')
    for n, entry in enumerate(meta.get("training") or []):
        if isinstance(meta["training"][0], dict) and (not isinstance(entry, dict) or not {"image", "label"} <= set(entry)):
            raise MedsegError(f"{path}: training entry {n + 1} needs both 'image' and 'label' ({entry})")
    return meta


def _from_msd(root: Path) -> Dataset:
    meta = read_dataset_json(root / "dataset.json")
    class_names, declared = _msd_class_names(meta.get("labels", {}))
    modalities = list((meta.get("modality") or meta.get("channel_names") or {}).values())
    if meta.get("training") and isinstance(meta["training"][0], dict) and "image" in meta["training"][0]:
        cases = []
        for entry in meta["training"]:
            mask = (root / entry["label"]).resolve()
            image = (root / entry["image"]).resolve()
            channels = [image] if image.exists() else _channel_files(root / "imagesTr", stem_of(image))
            cases.append(Case(stem_of(image), channels or [image], mask))
    else:
        cases, labels = [], root / "labelsTr"
        for mask in sorted(p for p in labels.iterdir() if is_supported(p)) if labels.is_dir() else []:
            channels = _channel_files(root / "imagesTr", stem_of(mask))
            cases.append(Case(stem_of(mask), channels, mask))
    left_out = {}
    used = {path.resolve() for case in cases for path in case.images}
    spare = sorted(p.name for p in (root / "imagesTr").iterdir()
                   if is_supported(p) and p.resolve() not in used) if (root / "imagesTr").is_dir() else []
    if spare:
        left_out["images in imagesTr without a label"] = spare
    missing = [c.case_id for c in cases if not c.images or not all(p.exists() for p in c.images) or not c.mask.exists()]
    if missing:
        left_out["cases whose image or label file is missing"] = missing
        cases = [c for c in cases if c.case_id not in set(missing)]
    for case in cases:
        case.largest_label = max(declared) if declared else None
    return Dataset(cases, class_names, "msd", root, modalities, declared, left_out=left_out,
                   segment_codes=meta.get("segment_codes", {}))


def _msd_class_names(labels: dict) -> tuple[list[str], list[int] | None]:
    """Class names by index and the declared indices. MSD writes {"0": "background", ...}; nnU-Net v2 writes
    {"background": 0, ...}."""
    if not labels:
        return ["background"], None
    if all(str(k).isdigit() for k in labels):
        by_index = {int(k): str(v) for k, v in labels.items()}
    else:
        by_index = {int(v): str(k) for k, v in labels.items() if not isinstance(v, list)}
    return [by_index.get(i, f"class_{i}") for i in range(max(by_index) + 1)], sorted(by_index)


def _channel_files(folder: Path, stem: str) -> list[Path]:
    """MSD keeps one file per case; nnU-Net splits channels into `<case>_0000`, `<case>_0001`, ..."""
    exact = [p for p in folder.glob(f"{stem}.*") if is_supported(p)]
    if exact:
        return exact[:1]
    return sorted(p for p in folder.glob(f"{stem}_[0-9][0-9][0-9][0-9].*") if is_supported(p))


def _from_brats(root: Path) -> Dataset:
    cases, expected = [], None
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and list(p.glob("*_seg.nii*"))):
        files = {stem_of(p)[len(folder.name) + 1:].lower(): p for p in folder.iterdir()
                 if is_supported(p) and stem_of(p).startswith(folder.name + "_")}
        present = [m for m in BRATS_MODALITIES if m in files]
        expected = expected or present
        if present != expected:
            missing = sorted(set(expected) - set(present)) or sorted(set(present) - set(expected))
            raise MedsegError(f"{folder}: modalities {', '.join(present) or 'none'} differ from the other cases "
                              f"({', '.join(expected)}; {', '.join(missing)} missing or extra); every case needs "
                              "the same modalities, so add or remove files, or leave this case out")
        cases.append(Case(folder.name, [files[m] for m in present], files["seg"]))
    return Dataset(cases, list(BRATS_LABELS), "brats", root, list(expected or []), list(range(len(BRATS_LABELS))))


def _from_drive(folder: Path) -> Dataset:
    """DRIVE names files by a leading case number: `21_training.tif`, `21_manual1.gif`, `21_training_mask.gif`."""
    def by_number(sub: str) -> dict[str, Path]:
        path = folder / sub
        return {p.name.split("_")[0]: p for p in path.iterdir() if is_supported(p)} if path.is_dir() else {}

    images, labels, rois = by_number("images"), by_number(DRIVE_LABELS), by_number("mask")
    cases = [Case(n, [images[n]], labels[n], rois.get(n)) for n in images if n in labels]
    left_out = {kind: sorted(files[n].name for n in files if n not in others)
                for kind, files, others in (("images without a mask", images, labels),
                                            ("masks without an image", labels, images))}
    return Dataset(_natural_sort(cases), ["background", "vessel"], "drive", folder, declared_labels=[0, 1],
                   left_out={kind: names for kind, names in left_out.items() if names})


def _from_detected_pairs(root: Path) -> Dataset:
    for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
        image_dir = _first_dir(folder, IMAGE_DIR_NAMES)
        mask_dir = _first_dir(folder, MASK_DIR_NAMES)
        if image_dir and mask_dir:
            return _from_pairs(root, image_dir, mask_dir)
    raise MedsegError(
        f"{root}: no dataset layout recognised; expected dataset.json/imagesTr, image+mask folders "
        f"({'/'.join(IMAGE_DIR_NAMES[:3])} and {'/'.join(MASK_DIR_NAMES[:4])}), or pass --images/--masks or a CSV"
    )


def _first_dir(folder: Path, names: tuple[str, ...]) -> Path | None:
    children = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    return next((children[n.lower()] for n in names if n.lower() in children), None)


def _from_pairs(root: Path, image_dir: Path, mask_dir: Path) -> Dataset:
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise MedsegError(f"{folder}: folder not found; check --images/--masks")
    masks = {stem_of(p): p for p in mask_dir.iterdir() if is_supported(p)}
    cases, unmatched = [], []
    for image in sorted(p for p in image_dir.iterdir() if is_supported(p)):
        stem = stem_of(image)
        mask = next((masks[stem + s] for s in MASK_SUFFIXES if stem + s in masks), None)
        if mask is None:
            unmatched.append(image.name)
        else:
            cases.append(Case(stem, [image], mask))
    if unmatched and not cases:
        raise MedsegError(
            f"{image_dir}: no image has a mask of the same name in {mask_dir} (e.g. {unmatched[0]}); "
            "rename the files or use a CSV manifest"
        )
    used = {case.mask for case in cases}
    left_out = {"images without a mask": unmatched,
                "masks without an image": sorted(p.name for p in masks.values() if p not in used)}
    return Dataset(_natural_sort(cases), ["background"], "pairs", root,
                   left_out={kind: names for kind, names in left_out.items() if names})


def _natural_sort(cases: list[Case]) -> list[Case]:
    return sorted(cases, key=lambda c: (len(c.case_id), c.case_id) if c.case_id.isdigit() else (0, c.case_id))


def _from_manifest(csv_path: Path) -> Dataset:
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise MedsegError(f"{csv_path}: the manifest has no rows")
    columns = {c.strip().lower(): c for c in rows[0].keys() if c}
    mask_column = columns.get("mask") or columns.get("label")
    if "image" not in columns or not mask_column:
        raise MedsegError(f"{csv_path}: the manifest needs columns 'image' and 'mask' (found {list(rows[0])})")
    cases = []
    for n, row in enumerate(rows, start=2):
        image = (csv_path.parent / row[columns["image"]].strip()).resolve()
        mask = (csv_path.parent / row[mask_column].strip()).resolve()
        for path in (image, mask):
            if not path.exists():
                raise MedsegError(f"{csv_path}, line {n}: {path} not found; paths are relative to the CSV's folder")
        case_id = (row.get(columns.get("case_id", ""), "") or "").strip() or stem_of(image)
        cases.append(Case(case_id, [image], mask))
    return Dataset(cases, ["background"], "manifest", csv_path.parent, grouped="case_id" in columns)


def case_hash(case: Case) -> str:
    """SHA-256 over the case's image files: recognises a case under another name (`evaluate --data` leaves out
    cases a run trained on, matched by id or by this), whatever its mask now says."""
    return _files_hash(case.images)


def content_hash(case: Case) -> str:
    """SHA-256 over every file of the case: images, mask and region of interest. What a run read: the disk cache
    keys on it, and evaluation refuses test cases whose content changed since the run split them off."""
    return _files_hash([*case.images, case.mask, *([case.roi] if case.roi else [])])


def _files_hash(paths: list) -> str:
    digest = hashlib.sha256()
    block = bytearray(1 << 20)  # one buffer read into: a fresh 1 MiB object per read grew the heap by 23 MiB on
    view = memoryview(block)  # 500 cases (benchmarks/memory_scaling.py)
    for path in paths:
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        for file in files:
            with open(file, "rb") as handle:
                while count := handle.readinto(block):
                    digest.update(view[:count])
    return digest.hexdigest()


def manifest_hash(hashes: dict[str, str]) -> str:
    """One SHA-256 for a dataset as a run saw it: its case ids with each case's content hash, in id order."""
    return hashlib.sha256("\n".join(f"{k}:{hashes[k]}" for k in sorted(hashes)).encode()).hexdigest()


MAX_UNDECLARED_LABEL = 50  # above this, undeclared mask values are more likely instances than classes
MAX_LABEL = 65535  # declared labels (dataset.json, --class-names): what uint16 masks hold
MAX_GREY_LEVELS = 17  # masks coding classes as equally spaced grey levels: up to 16 classes


def class_dtype(largest: int) -> type:
    """The integer type of a label map whose largest class index is `largest`: uint8, or uint16 past 255."""
    return np.uint8 if largest < 256 else np.uint16


def labels_to_classes(mask: np.ndarray, path: Path | str, binary: bool = False, threshold: float | None = None,
                      levels: list[int] | None = None, most: int | None = None) -> np.ndarray:
    """Turn a stored mask, channels-first `(C, *spatial)` as read, into class indices `(*spatial)` (uint8, or
    uint16 for labels past 255).

    Rules, in order: `binary` maps every non-zero value to 1 (instance masks); `threshold` maps values >= it to 1
    (--mask-threshold); `levels` (the dataset's grey levels, `grey_levels`) maps the k-th level to class k; 0/255
    masks become 0/1; masks stored as anti-aliased grey levels (8-bit masks whose non-zero pixels are mostly 255
    with edges in between, or float masks in [0, 1]) are thresholded at half their range, said once; float masks
    holding whole numbers are accepted. Values up to `most` (the largest label the dataset declares, at most
    65535) are classes; undeclared, up to MAX_UNDECLARED_LABEL. Anything else is a MedsegError naming the file.
    """
    if mask.shape[0] == 3:  # an RGB-saved mask is accepted when its channels are identical
        if not (np.array_equal(mask[0], mask[1]) and np.array_equal(mask[1], mask[2])):
            raise MedsegError(f"{path}: mask is a colour image; save masks as single-channel class indices")
    elif mask.shape[0] != 1:
        raise MedsegError(f"{path}: mask has {mask.shape[0]} channels; expected one")
    mask = mask[0]
    if np.issubdtype(mask.dtype, np.floating) and not np.all(np.isfinite(mask)):
        raise MedsegError(f"{path}: mask holds NaN or infinite values; masks must hold class indices 0, 1, 2, ...")
    if binary:
        return (mask != 0).astype(np.uint8)
    if threshold is not None:
        return (mask >= threshold).astype(np.uint8)
    if levels:
        return _from_levels(mask, path, levels)
    values = np.unique(mask)
    if values.min() < 0:
        raise MedsegError(f"{path}: mask holds negative values {values[values < 0][:5].tolist()}")
    if set(values.tolist()) <= {0, 255} and (most is None or most < 255):
        return (mask == 255).astype(np.uint8)
    grey = _grey_level_threshold(mask, values) if most is None or most < 255 else None
    if grey is not None:
        note("grey-threshold", f"masks stored as grey levels (values {values.min():g}..{values.max():g}) are read "
             f"as foreground where the value is at least {grey:g}, half their range; set --mask-threshold to "
             "choose another level", Path(path).name)
        return (mask >= grey).astype(np.uint8)
    if np.issubdtype(mask.dtype, np.floating) and not np.all(values == np.round(values)):
        raise MedsegError(f"{path}: mask holds non-integer values; masks must hold class indices 0, 1, 2, ... "
                          "(or pass --mask-threshold for a soft mask)")
    # declared: any value up to 65535 (`check_label_values` then names any the declaration lacks)
    limit = MAX_UNDECLARED_LABEL if most is None else MAX_LABEL
    if values.max() > limit:
        raise MedsegError(f"{path}: mask holds {len(values)} values up to {values.max():g}; expected class indices "
                          "(0, 1, 2, ...) or 0/255, and up to 50 unless declared: declare the classes in "
                          "dataset.json ('labels', up to 65535) or with --class-names. For instance masks use "
                          "--binary-masks, for soft or grey-level masks --mask-threshold")
    return mask.astype(class_dtype(int(values.max())))


def _from_levels(mask: np.ndarray, path: Path | str, levels: list[int]) -> np.ndarray:
    """Grey-coded classes: the value nearest each level (within 1, for masks rounded either way) is its class."""
    grid = np.asarray(levels, np.float64)
    index = np.abs(mask[..., None].astype(np.float64) - grid).argmin(-1)
    stray = np.abs(mask - grid[index]) > 1
    if stray.any():
        raise MedsegError(f"{path}: mask value {mask[stray].flat[0]:g} is none of the grey levels "
                          f"{', '.join(map(str, levels))} the other masks use for their classes; fix the mask")
    return index.astype(class_dtype(len(levels) - 1))


def grey_levels(values: set) -> list[int] | None:
    """The grey levels of masks that code k classes as k equally spaced levels from 0 to 255 (or 65535), e.g.
    0, 85, 170, 255 for four, from the values found in all of a dataset's masks (one mask may lack a class); None
    for class indices, 0/255 masks and anti-aliased edges (values off any such grid, or too few of its levels)."""
    values = sorted(float(v) for v in values)
    if len(values) < 3 or values[0] != 0 or values[-1] not in (255, 65535):
        return None
    top = values[-1]
    for k in range(3, MAX_GREY_LEVELS + 1):
        grid = [round(i * top / (k - 1)) for i in range(k)]
        if all(min(abs(v - g) for g in grid) <= 1 for v in values):
            return grid if 2 * len(values) >= k else None
    return None


def mask_values(cases: list[Case], npy_layout: str = "auto") -> set:
    """Every value stored in the cases' mask files, as read (before any rule turns them into classes)."""
    from medseg.io import read_image

    found: set = set()
    for case in cases:
        found |= set(np.unique(read_image(case.mask, npy_layout=npy_layout).array).tolist())
    return found


def detect_grey_levels(cases: list[Case], declared: list[int] | None, cfg) -> list[int]:
    """The grey levels of `cases`' masks where they code classes (`grey_levels`), said in one line; [] where they
    do not, or where nothing needs checking (labels declared, --binary-masks, --mask-threshold)."""
    if declared is not None or cfg.binary_masks or cfg.mask_threshold is not None or cfg.class_names:
        return []
    levels = grey_levels(mask_values(cases, cfg.npy_layout)) or []
    if levels:
        notice(f"the masks hold {len(levels)} equally spaced grey levels ({', '.join(map(str, levels))}): read as "
               f"classes 0-{len(levels) - 1} ({len(cases)} mask files read)")
    return levels


def _grey_level_threshold(mask: np.ndarray, values: np.ndarray) -> float | None:
    """Half the range for a mask saved as grey levels (a JPEG/PNG with anti-aliased edges, a soft float mask),
    else None. 8-bit: most non-zero pixels at 255, the rest in between. Float: values in [0, 1], not all 0/1."""
    if mask.dtype == np.uint8 and values.max() == 255 and len(values) > 2:
        foreground = mask[mask > 0]
        return 128.0 if (foreground == 255).mean() >= 0.5 else None
    if np.issubdtype(mask.dtype, np.floating) and values.max() <= 1 and not np.all(np.isin(values, (0, 1))):
        return 0.5
    return None


def check_label_values(present: dict[str, set[int]], declared: list[int] | None,
                       class_names: list[str] | None) -> None:
    """Mask values must be known classes: those dataset.json declares, those --class-names names, or, with neither,
    0..K without gaps (a stray value in one file shows up as a gap). `present` maps each mask file to its values."""
    if declared is not None or class_names:
        allowed = set(declared if declared is not None else range(len(class_names)))
        source = "dataset.json declares" if declared is not None else "--class-names names"
        for path, values in present.items():
            unknown = sorted(values - allowed)
            if unknown:
                raise MedsegError(f"{path}: mask value {unknown[0]} is not a class ({source} "
                                  f"{', '.join(map(str, sorted(allowed)))}); fix the mask or the class list")
        return
    seen = sorted(set().union(*present.values()))
    missing = sorted(set(range(seen[-1] + 1)) - set(seen))
    if missing:
        stray = next(v for v in seen if v > missing[0])
        path = next(p for p, values in present.items() if stray in values)
        raise MedsegError(f"{path}: mask value {stray}, but no mask holds {missing[0]}; classes run 0..K without "
                          "gaps unless --class-names lists them (a stray value is a labelling error)")


def split_dataset(dataset: Dataset, val_fraction: float = 0.2, seed: int = 0, folds: int = 0, fold: int = 0,
                  train_fraction: float = 1.0, test_fraction: float = 0.2) -> dict:
    """`split_cases` for a dataset's cases, in blocks where they are serial sections of one stack (said once)."""
    serial = serial_sections(dataset.cases)
    if serial:
        notice(f"{dataset.root}: the images are consecutive sections of one stack (each correlates "
               f"{serial['neighbours']:.2f} with the next, {serial['apart']:.2f} with sections five or more apart): "
               "test and validation cases are contiguous blocks of the stack, never neighbours of training sections")
    split = split_cases([c.case_id for c in dataset.cases], val_fraction, seed, folds, fold, train_fraction,
                        test_fraction, blocks=bool(serial))
    return {**split, "serial_sections": serial} if serial else split


SERIAL_GAIN = 0.1  # neighbours correlate this much more than images apart: sections of one stack


def serial_sections(cases: list[Case]) -> dict | None:
    """Whether 2D cases are consecutive sections of one stack (ISBI 2012's EM sections): numbered ids, one shape,
    and each image correlating with the next far more than with images five or more apart (ISBI: 0.33 against 0.02;
    DRIVE's fundus photographs, numbered too: 0.95 against 0.95). Then a random split would test on neighbours of
    training sections, so `split_cases` cuts blocks instead. Returns the measurement, or None."""
    from medseg.headers import header_size
    from medseg.io import read_image

    if len(cases) < 8 or not all(c.case_id.isdigit() for c in cases) or len(header_size(cases[0].images[0])[0]) != 2:
        return None
    ordered = sorted(cases, key=lambda c: int(c.case_id))
    images = [read_image(c.images[0]).array for c in ordered]
    if len({i.shape for i in images}) > 1 or images[0].ndim != 3:
        return None
    small = [_block_mean(i.astype(np.float32).mean(0)) for i in images]
    z = [(a - a.mean()) / (a.std() or 1.0) for a in small]
    n = len(z)
    near = float(np.median([(z[i] * z[i + 1]).mean() for i in range(n - 1)]))
    apart = float(np.median([(z[i] * z[j]).mean() for i in range(n) for j in range(i + 5, n)]))
    return {"neighbours": round(near, 3), "apart": round(apart, 3)} if near - apart > SERIAL_GAIN else None


def _block_mean(image: np.ndarray, side: int = 128) -> np.ndarray:
    """A 2D image averaged in blocks down to about side x side."""
    fy, fx = max(1, image.shape[0] // side), max(1, image.shape[1] // side)
    h, w = image.shape[0] // fy * fy, image.shape[1] // fx * fx
    return image[:h, :w].reshape(h // fy, fy, w // fx, fx).mean((1, 3))


def split_cases(case_ids: list[str], val_fraction: float = 0.2, seed: int = 0,
                folds: int = 0, fold: int = 0, train_fraction: float = 1.0, test_fraction: float = 0.2,
                blocks: bool = False) -> dict:
    """Split unique case ids (never slices) into train, validation and test, reproducibly.

    test: `test_fraction` of all cases (at least one when the fraction is positive), chosen by the seed alone, so
    every fold and every member of an ensemble trained with the same seed shares it; it is used for no choice and
    is what `medseg evaluate` reports. Of the other cases, folds=0 takes a random `val_fraction` for validation
    (checkpoint, early stopping, post-processing); folds=k is k-fold cross-validation, `fold` in [0, k) validating.
    train_fraction < 1 keeps that share of the training cases (at least one, chosen with the seed) and the same
    validation and test cases: learning curves and few-label fine-tuning are measured on one held-out set.
    With `blocks` (serial sections, ids in stack order), test and validation cases are contiguous blocks of the
    stack at a place the seed chooses, and folds are consecutive runs: no test section lies between two training
    sections it nearly repeats.
    """
    unique = sorted(set(case_ids))
    if not 0 <= test_fraction < 1:
        raise MedsegError(f"--test-fraction {test_fraction}: must lie in [0, 1)")
    n_test = 0 if test_fraction == 0 else max(1, round(len(unique) * test_fraction))
    if len(unique) - n_test < 2:
        raise MedsegError(f"only {len(unique)} cases found; training needs at least 2 besides the {n_test} test "
                          f"case(s) (one to validate){'; pass --test-fraction 0 and keep a test set of your own' if n_test else ''}")
    rng = random.Random(seed)
    if blocks:  # the stack's order, a block cut out where the seed says
        order = sorted(unique, key=int)
        start = rng.randrange(len(order) - n_test + 1)
        test, rest = order[start:start + n_test], order[:start] + order[start + n_test:]
    else:
        order = unique[:]
        rng.shuffle(order)
        test, rest = order[:n_test], order[n_test:]
    if folds:
        if not 2 <= folds <= len(rest) or not 0 <= fold < folds:
            raise MedsegError(f"--folds {folds} --fold {fold}: need 2 <= folds <= {len(rest)} and 0 <= fold < folds")
        val = [str(v) for v in np.array_split(rest, folds)[fold]] if blocks else rest[fold::folds]
    else:
        n_val = min(len(rest) - 1, max(1, round(len(rest) * val_fraction)))
        begin = rng.randrange(len(rest) - n_val + 1) if blocks else 0
        val = rest[begin:begin + n_val]
    val_set = set(val)
    train = [c for c in rest if c not in val_set]
    if not 0 < train_fraction <= 1:
        raise MedsegError(f"--train-fraction {train_fraction}: must lie in (0, 1]")
    kept = train[:max(1, round(len(train) * train_fraction))]
    return {"seed": seed, "folds": folds, "fold": fold, "val_fraction": val_fraction, "test_fraction": test_fraction,
            "train_fraction": train_fraction, "blocks": blocks, "train": sorted(kept), "val": sorted(val_set),
            "test": sorted(test)}
