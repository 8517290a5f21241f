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
from tqdm import tqdm

from medseg.console import show_bars
from medseg.data import LoadedCase, check_alike, foreground_points, load_case
from medseg.io import Image

READING = ("normalization", "intensity_stats", "color", "npy_layout", "binary_masks", "mask_threshold", "orientation",
           "target_spacing")


def cache_root() -> Path:
    return Path(os.environ.get("MEDSEG_CACHE") or Path.home() / ".cache" / "medseg")


def use_disk(cfg, cases: list) -> bool:
    """Whether to cache on disk: `--cache disk`, or `auto` with the images' files over a tenth of the memory."""
    if cfg.cache != "auto":
        return cfg.cache == "disk"
    size = sum(Path(p).stat().st_size for case in cases for p in case.images if Path(p).is_file())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return size > memory / 10


@dataclass
class DiskCase:
    """One preprocessed case in the cache: its shape, and its arrays read on demand."""
    case_id: str
    folder: Path
    meta: dict

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["shape"][1:])

    @property
    def channels(self) -> int:
        return self.meta["shape"][0]

    def _mapped(self) -> tuple[np.ndarray, np.ndarray]:
        """Image and label as memory maps: what is copied out of them is read, and they close when dropped."""
        return (np.load(self.folder / "image.npy", mmap_mode="r"), np.load(self.folder / "label.npy", mmap_mode="r"))

    def read(self, index: tuple = ()) -> tuple[np.ndarray, np.ndarray]:
        """(image (C, ...), label (...)) of the region `index` (slices over the spatial axes), copied: only the
        region stays in memory."""
        image, label = self._mapped()
        return np.array(image[(slice(None), *index)]), np.array(label[index])

    def take(self, axis: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image and label at `indices` along spatial `axis` (slices and their neighbours), copied."""
        image, label = self._mapped()
        return np.take(image, indices, 1 + axis), np.take(label, indices, axis)

    def foreground(self) -> np.ndarray:
        return np.load(self.folder / "foreground.npy", mmap_mode="r")

    def load(self) -> LoadedCase:
        """The whole case in memory (for validation, one case at a time)."""
        roi = self.folder / "roi.npy"
        image = Image(np.load(self.folder / "image.npy"), tuple(self.meta["spacing"]) if self.meta["spacing"] else None,
                      np.array(self.meta["affine"]) if self.meta["affine"] else None, Path(self.meta["path"]))
        return LoadedCase(self.case_id, image, np.load(self.folder / "label.npy"),
                          np.load(roi) if roi.exists() else None)


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


def settings_key(cfg, resample: bool) -> str:
    settings = {name: getattr(cfg, name) for name in READING}
    settings["resample"] = resample
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_cases(cases: list, cfg, what: str = "cases", resample: bool = True) -> list[DiskCase]:
    """Each case preprocessed as `load_case(case, cfg, resample)` would, from the cache or written to it now."""
    from medseg.datasets import case_hash

    root = cache_root() / settings_key(cfg, resample)
    root.mkdir(parents=True, exist_ok=True)
    cached = []
    for case in tqdm(cases, desc=f"caching {what}", disable=not show_bars(cfg.progress), leave=False):
        folder = root / case_hash(case)
        if not (folder / "meta.json").exists():
            _write(load_case(case, cfg, resample), folder)
        cached.append(DiskCase(case.case_id, folder, json.loads((folder / "meta.json").read_text())))
    check_alike([(path_of(c), ndim_of(c), c.channels) for c in cached])
    return cached


def _write(loaded: LoadedCase, folder: Path) -> None:
    """The case's arrays and facts, written to a temporary folder and renamed: a folder in the cache is complete."""
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        np.save(staging / "image.npy", np.ascontiguousarray(loaded.image.array, np.float32))
        np.save(staging / "label.npy", np.ascontiguousarray(loaded.label, np.uint8))
        if loaded.roi is not None:
            np.save(staging / "roi.npy", loaded.roi)
        np.save(staging / "foreground.npy", foreground_points(loaded.label))
        image = loaded.image
        meta = {"shape": list(image.array.shape), "labels": sorted(int(v) for v in np.unique(loaded.label)),
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
