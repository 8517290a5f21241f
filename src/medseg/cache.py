"""Cases preprocessed once to disk and read on demand, so that training is not bounded by memory.

`medseg train --cache disk` (chosen by `auto` when the images on disk exceed a tenth of this machine's memory:
compressed volumes grow several times once read as float32) reads, checks, normalises and resamples each case
once, as `medseg.data.load_case` does, and writes it as NumPy arrays under `$MEDSEG_CACHE` (default
`~/.cache/medseg`), in a folder named by a hash of the reading settings and of the case's files, so a second run
with the same settings (another seed, another network) reads nothing again, and a changed file or setting is
preprocessed anew. Training then reads what each batch needs (a patch, a slice) through a memory map opened and
closed per read, so the process holds no case between batches; validation loads one case at a time.
(nnU-Net keeps a preprocessed copy per plan in the same spirit.)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg import arrays
from medseg.console import notice, progress, show_bars
from medseg.data import LoadedCase, check_alike, class_points, load_case
from medseg.headers import decoded_bytes
from medseg.io import Image

READING = ("normalization", "intensity_stats", "color", "npy_layout", "binary_masks", "mask_threshold", "mask_levels",
           "orientation", "target_spacing")


def cache_root() -> Path:
    return Path(os.environ.get("MEDSEG_CACHE") or Path.home() / ".cache" / "medseg")


MEMORY_SHARE = 0.1  # `--cache auto` holds cases in memory while they take at most this share of the machine's


def use_disk(cfg, cases: list) -> bool:
    """Whether to cache on disk: `--cache disk`, or `auto` where the cases once read (`decoded_bytes`, from their
    headers: float32 images and labels, at the target spacing, one copy, as the samplers hold them) would take
    more than MEMORY_SHARE of this machine's memory. Said in one line when it is."""
    if cfg.cache != "auto":
        return cfg.cache == "disk"
    size = sum(decoded_bytes(case.images, cfg.target_spacing) for case in cases)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if size > MEMORY_SHARE * memory:
        notice(f"--cache auto: the {len(cases)} training and validation cases take {size / 2**30:.1f} GiB once read, "
               f"more than {MEMORY_SHARE:.0%} of this machine's {memory / 2**30:.0f} GiB: preprocessed once into "
               f"{cache_root()} and read per batch")
        return True
    return False


@dataclass
class DiskCase:
    """One preprocessed case in the cache: its shape, and its arrays read on demand.

    A volume that 2D networks slice is stored with the slicing axis first (meta "first_axis"), so that a slice is
    one contiguous read rather than a stride through every page of the file; every method speaks the case's own
    axis order."""
    case_id: str
    folder: Path
    meta: dict

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["shape"][1:])

    @property
    def channels(self) -> int:
        return self.meta["shape"][0]

    def _stored(self) -> tuple[np.ndarray, np.ndarray]:
        """Image and label as memory maps in the stored order (a 2D network's slicing axis first)."""
        return np.load(self.folder / "image.npy", mmap_mode="r"), np.load(self.folder / "label.npy", mmap_mode="r")

    def _mapped(self) -> tuple[np.ndarray, np.ndarray]:
        """Image and label as memory maps in the case's axis order (views of the stored order): what is copied out
        of them is read, and they close when dropped."""
        image, label = self._stored()
        first = self.meta.get("first_axis")
        if first is None:
            return image, label
        return np.moveaxis(image, 1, 1 + first), np.moveaxis(label, 0, first)

    def read(self, index: tuple = ()) -> tuple[np.ndarray, np.ndarray]:
        """(image (C, ...), label (...)) of the region `index` (slices over the spatial axes), copied: only the
        region stays in memory."""
        image, label = self._mapped()
        return np.array(image[(slice(None), *index)]), np.array(label[index])

    def take(self, axis: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image and label at `indices` along spatial `axis` (slices and their neighbours), copied."""
        if axis == self.meta.get("first_axis"):  # contiguous reads of the stored order (np.take on the moved
            image, label = self._stored()  # view read 30x slower: 31 ms a slice)
            return np.moveaxis(image[:, indices], 1, 1 + axis), np.moveaxis(label[indices], 0, axis)
        image, label = self._mapped()
        return arrays.take(image, indices, 1 + axis), arrays.take(label, indices, axis)

    def class_points(self) -> dict[int, np.ndarray]:
        """Each foreground class's points (`medseg.data.class_points`), read when asked for: one array of every
        point, and a table of (class, first row, end row)."""
        points = np.load(self.folder / "points.npy", mmap_mode="r")
        return {int(k): points[start:end] for k, start, end in np.load(self.folder / "point_classes.npy")}

    def load(self) -> LoadedCase:
        """The whole case in memory (for validation, one case at a time)."""
        roi = self.folder / "roi.npy"
        array, label = (np.ascontiguousarray(a) for a in self.read())
        image = Image(array, tuple(self.meta["spacing"]) if self.meta["spacing"] else None,
                      np.array(self.meta["affine"]) if self.meta["affine"] else None, Path(self.meta["path"]))
        return LoadedCase(self.case_id, image, label, np.load(roi) if roi.exists() else None)


def as_loaded(case) -> LoadedCase:
    """A case in memory, whether it was kept there or cached on disk."""
    return case.load() if isinstance(case, DiskCase) else case


def channels_of(case) -> int:
    return case.channels if isinstance(case, DiskCase) else case.image.array.shape[0]


def ndim_of(case) -> int:
    return len(case.spatial_shape) if isinstance(case, DiskCase) else case.image.ndim


def labels_of(case) -> set[int]:
    return set(case.meta["labels"]) if isinstance(case, DiskCase) else set(np.unique(case.label).tolist())


def path_of(case) -> str:
    return case.meta["path"] if isinstance(case, DiskCase) else str(case.image.path)


FORMAT = 2  # of a cached case's files (2: points per class); a new format never reads an old one's folders


def settings_key(cfg, resample: bool) -> str:
    settings = {name: getattr(cfg, name) for name in READING}
    settings.update(resample=resample, format=FORMAT, first_axis=_first_axis(cfg))
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_cases(cases: list, cfg, what: str = "cases", resample: bool = True) -> list[DiskCase]:
    """Each case preprocessed as `load_case(case, cfg, resample)` would, from the cache or written to it now."""
    from medseg.datasets import content_hash

    root = cache_root() / settings_key(cfg, resample)
    root.mkdir(parents=True, exist_ok=True)
    cached = []
    for case in progress(cases, f"caching {what}", show_bars(cfg.progress)):
        folder = root / content_hash(case)  # images, mask and region of interest: an edited mask is read anew
        if not (folder / "meta.json").exists():
            _write(load_case(case, cfg, resample), folder, _first_axis(cfg))
        cached.append(DiskCase(case.case_id, folder, json.loads((folder / "meta.json").read_text())))
    check_alike([(path_of(c), ndim_of(c), c.channels) for c in cached])
    return cached


def _first_axis(cfg) -> int | None:
    """The spatial axis a 2D network slices volumes along, stored first; None for 3D networks."""
    return cfg.axis % 3 if cfg.dims == 2 else None


def _write(loaded: LoadedCase, folder: Path, first_axis: int | None) -> None:
    """The case's arrays and facts, written to a temporary folder and renamed: a folder in the cache is complete.
    A volume is stored with spatial axis `first_axis` first (see DiskCase)."""
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    first = first_axis if loaded.label.ndim == 3 else None
    image, label = loaded.image.array, loaded.label  # uint8 labels, or uint16 past 255 classes
    if first is not None:
        image, label = np.moveaxis(image, 1 + first, 1), np.moveaxis(label, first, 0)
    try:
        np.save(staging / "image.npy", np.ascontiguousarray(image, np.float32))
        np.save(staging / "label.npy", np.ascontiguousarray(label))
        if loaded.roi is not None:
            np.save(staging / "roi.npy", loaded.roi)
        points = class_points(loaded.label)
        ends = np.cumsum([len(v) for v in points.values()], dtype=np.int64)
        np.save(staging / "points.npy", np.concatenate(list(points.values())) if points else
                np.zeros((0, loaded.label.ndim), np.int32))
        np.save(staging / "point_classes.npy", np.stack([np.array(list(points), np.int64), ends - [len(v) for v in
                points.values()], ends], 1) if points else np.zeros((0, 3), np.int64))
        image = loaded.image
        meta = {"shape": list(loaded.image.array.shape), "first_axis": first,
                "labels": sorted(int(v) for v in np.unique(loaded.label)),
                "spacing": list(image.spacing) if image.spacing else None,
                "affine": image.affine.tolist() if image.affine is not None else None, "path": str(image.path)}
        (staging / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(staging, folder)
        except OSError:  # another run wrote it meanwhile: theirs is as good
            if not (folder / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
