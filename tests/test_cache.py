"""The disk cache (`--cache disk`): the same batches and the same trained weights as cases held in memory, files
reused across runs, and training memory that does not grow with the dataset."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_png, tiny_config
from medseg.cache import cache_cases, use_disk
from medseg.config import TrainConfig
from medseg.data import load_cases
from medseg.datasets import find_cases
from medseg.samplers import PatchSampler, SliceSampler

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def batches(sampler_class, cases, cfg, steps=6):
    return list(sampler_class(cases, cfg, torch.Generator().manual_seed(3)).epoch_batches(steps))


@pytest.mark.parametrize("kind,settings", [
    ("3d", dict(dims=3, patch=[16, 16, 32], fit="pad")),  # a patch longer than the volume on one side: padded
    ("3d", dict(dims=2, axis=1, context=1, size=16, fit="pad")),  # 2.5D slices of volumes
    ("2d", dict(dims=2, size=24, fit="resize")),
])
def test_batches_from_the_disk_cache_equal_batches_from_memory(phantoms_2d, phantoms_3d, tmp_path, kind, settings):
    data = phantoms_3d if kind == "3d" else phantoms_2d
    cfg = tiny_config(data, tmp_path / "run", batch_size=3, **settings)
    cases = find_cases(data).cases
    sampler = PatchSampler if cfg.dims == 3 else SliceSampler
    memory = batches(sampler, load_cases(cases, cfg), cfg)
    disk = batches(sampler, cache_cases(cases, cfg), cfg)
    for (image_a, label_a), (image_b, label_b) in zip(memory, disk):
        assert torch.equal(image_a, image_b) and torch.equal(label_a, label_b)
    assert memory[0][0].shape[0] == 3


def test_training_from_the_disk_cache_gives_the_weights_of_training_from_memory(phantoms_3d, tmp_path):
    from medseg.train import train

    runs = {mode: train(tiny_config(phantoms_3d, tmp_path / mode, dims=3, fit="pad", cache=mode, threads=1))
            for mode in ("memory", "disk")}
    a, b = (torch.load(run / "last.pt", weights_only=True)["model"] for run in runs.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads((run / "history.json").read_text()) for run in runs.values()]
    assert [r["val_dice"] for r in history[0]] == [r["val_dice"] for r in history[1]]


def test_cached_cases_are_reused_and_a_changed_file_is_read_again(phantoms_2d, tmp_path, cache_folder):
    data = tmp_path / "data"
    shutil.copytree(phantoms_2d, data)
    cfg = tiny_config(data, tmp_path / "run")
    cases = find_cases(data).cases
    first = cache_cases(cases, cfg)
    stamps = {c.folder: (c.folder / "image.npy").stat().st_mtime_ns for c in first}
    again = cache_cases(cases, cfg)
    assert [c.folder for c in again] == [c.folder for c in first]
    assert all((c.folder / "image.npy").stat().st_mtime_ns == stamps[c.folder] for c in again)
    from PIL import Image as PILImage

    image = np.asarray(PILImage.open(cases[0].images[0]))
    PILImage.fromarray(255 - image).save(cases[0].images[0])
    changed = cache_cases(find_cases(data).cases, cfg)
    assert changed[0].folder != first[0].folder and changed[1].folder == first[1].folder
    other = cache_cases(cases, tiny_config(data, tmp_path / "run", normalization="zscore"))
    assert other[1].folder.parent != first[1].folder.parent  # other settings, other preprocessing
    assert not list(cache_folder.rglob(".tmp-*"))


def test_training_memory_does_not_grow_with_the_dataset_from_the_disk_cache(tmp_path):
    """50 -> 500 volumes of 32^3 (benchmarks/memory_scaling.py, each run in a fresh process): from the disk cache,
    written by the same run (so its preprocessing counts too), the peak memory of training grows by less than 20%;
    held in memory (the control, which shows the measurement sees growth) it grows with the data."""
    out = tmp_path / "scaling.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_scaling.py"), "--sizes", "50", "500", "--side",
                    "32", "--cold-only", "--json", str(out)], check=True, capture_output=True, timeout=1800)
    small, large = json.loads(out.read_text())
    assert large["disk"]["peak_mib"] < 1.2 * small["disk"]["peak_mib"], (small, large)  # measured: +0.4%
    grew = {mode: large[mode]["peak_mib"] - small[mode]["peak_mib"] for mode in ("memory", "disk")}
    # the control: held in memory, the same data adds its size (measured: +75 MiB, against +2 MiB from disk)
    assert grew["memory"] > 30 and grew["memory"] > 10 * max(grew["disk"], 1.0), grew


def test_an_edited_mask_is_read_again_and_trained_on(phantoms_2d, tmp_path, cache_folder):
    # the cache keys on images, mask and region of interest: a corrected mask is never trained on as the old one
    data = tmp_path / "data"
    shutil.copytree(phantoms_2d, data)
    cfg = tiny_config(data, tmp_path / "run", fit="pad", size=32, augment=False, foreground_fraction=0)
    cases = find_cases(data).cases
    before = cache_cases(cases, cfg)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 2  # the corrected mask of case 0: one ring-class square
    save_png(cases[0].mask, mask)
    after = cache_cases(find_cases(data).cases, cfg)
    assert after[0].folder != before[0].folder and after[1].folder == before[1].folder
    _, label = SliceSampler(after, cfg, torch.Generator().manual_seed(0)).batch([0])
    np.testing.assert_array_equal(label[0].numpy(), mask)


def test_cache_auto_decides_from_the_decoded_size(tmp_path, monkeypatch):
    # 12 volumes of 96^3 zeros: a few kB each compressed, 53 MiB once read as float32 images and uint8 labels
    import nibabel as nib

    from medseg import cache

    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    for i in range(12):
        for sub, dtype in (("imagesTr", np.int16), ("labelsTr", np.uint8)):
            nib.save(nib.Nifti1Image(np.zeros((96, 96, 96), dtype), np.diag([2.0, 2.0, 2.0, 1.0])),
                     tmp_path / sub / f"c{i}.nii.gz")
    cases = find_cases(tmp_path).cases
    on_disk = sum(p.stat().st_size for c in cases for p in c.images)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setattr(cache, "MEMORY_SHARE", 20 * 2**20 / memory)  # a machine that may hold 20 MiB
    assert on_disk < 20 * 2**20  # the files alone would fit
    assert use_disk(TrainConfig(data=str(tmp_path)), cases)
    # resampled to 4 mm the cases take an eighth: 6.6 MiB, held in memory
    assert not use_disk(TrainConfig(data=str(tmp_path), target_spacing=[4.0, 4.0, 4.0]), cases)
