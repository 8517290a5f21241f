"""A seeded CT-like dataset of the shape users bring: 512x512 slices in Hounsfield units from two sites with
different voxel spacings, a large organ holding a small hypodense lesion (or none), and structures beside it that
look alike (a spleen of the organ's density, kidneys with cysts as dark as a lesion, bowel with gas).

`medseg synth --kind ct --out DIR` writes it in the MSD layout (int16 HU volumes, uint8 labels: 1 organ, 2 lesion)
with `sites.csv` (case -> site) for `medseg evaluate --groups`. dataset.json does not say CT: medseg has to
recognise it from the intensities, as it must for a user's folder of NIfTI files.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError

FIELD_MM = (358.0, 460.0)  # in-plane field of view of sites A and B (512 x 0.7 mm, 512 x 0.9 mm)
SITES = {  # slice spacing (mm), noise (HU, before the kernel), kernel blur (mm), HU offset of the calibration
    "A": {"field": FIELD_MM[0], "slice": 2.5, "noise": 14.0, "kernel": 0.6, "offset": 0.0},
    "B": {"field": FIELD_MM[1], "slice": 5.0, "noise": 22.0, "kernel": 1.0, "offset": 6.0},
}
LESION_MM = (10.0, 32.0)  # lesion diameters drawn uniformly in this range
NO_LESION = 0.2  # share of cases without a lesion
TWO_LESIONS = 0.2  # share of cases with a lesion that have a second one
CLASS_NAMES = ["background", "organ", "lesion"]


def _ellipsoid(grid, centre, radii, wobble=None) -> np.ndarray:
    """Voxels inside an ellipsoid (mm), its surface moved by `wobble(direction)` (a fraction of the radius)."""
    x, y, z = (g - c for g, c in zip(grid, centre))
    rho = np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2)
    if wobble is None:
        return rho <= 1
    return rho <= 1 + wobble(np.arctan2(y, x), np.arctan2(z, np.sqrt(x**2 + y**2)))


def _wobble(rng: np.random.Generator, amount: float):
    """A smooth random deformation of a surface: a few low-frequency waves over the two angles."""
    waves = [(rng.integers(1, 4), rng.integers(0, 3), rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.0))
             for _ in range(4)]
    total = sum(w[3] for w in waves)
    return lambda theta, phi: amount * sum(a * np.cos(k * theta + m * phi + p) for k, m, p, a in waves) / total


def make_ct_case(rng: np.random.Generator, site: str, size: int = 512) -> tuple[np.ndarray, np.ndarray, tuple]:
    """One case: (HU volume int16 (size, size, Z), label uint8, spacing (mm)), axes left-right, posterior-anterior,
    inferior-superior (stored with an LPS affine, as CT usually is)."""
    setting = SITES[site]
    pixel = setting["field"] / size
    extent = rng.uniform(160, 200)
    slices = max(8, round(extent / setting["slice"]))
    spacing = (pixel, pixel, setting["slice"])
    xs = (np.arange(size) - size / 2 + 0.5) * pixel
    zs = (np.arange(slices) - slices / 2 + 0.5) * setting["slice"]
    grid = (xs[:, None, None], xs[None, :, None], zs[None, None, :])
    hu = np.full((size, size, slices), -1000.0, np.float32)
    body_a, body_b = rng.uniform(140, 165), rng.uniform(105, 125)
    body = (grid[0] / body_a) ** 2 + (grid[1] / body_b) ** 2 <= 1
    inner = (grid[0] / (body_a - rng.uniform(10, 20))) ** 2 + (grid[1] / (body_b - rng.uniform(10, 20))) ** 2 <= 1
    hu[np.broadcast_to(body, hu.shape)] = -100.0  # subcutaneous fat
    hu[np.broadcast_to(inner, hu.shape)] = rng.uniform(25, 40)  # muscle and soft tissue

    def paint(mask, value):
        hu[mask] = value

    # distractors first, the organ over them where they touch
    for side in (-1, 1):  # kidneys, with a cyst as dark as a lesion in some
        kidney = _ellipsoid(grid, (side * 55, -45, rng.uniform(-30, 10)), (28, 22, 45))
        paint(kidney, rng.uniform(140, 170))
        if rng.random() < 0.4:
            paint(_ellipsoid(grid, (side * 55 + rng.uniform(-8, 8), -45, rng.uniform(-20, 0)), (8, 8, 8)), 8.0)
    paint(_ellipsoid(grid, (0, -75, 0), (20, 16, 400)), rng.uniform(600, 800))  # spine
    paint(_ellipsoid(grid, (-18, -45, 0), (11, 11, 400)), rng.uniform(160, 200))  # aorta, contrast-enhanced
    spleen_hu = rng.uniform(50, 62)
    paint(_ellipsoid(grid, (85, -10, rng.uniform(0, 40)), (35, 55, 50), _wobble(rng, 0.15)), spleen_hu)
    for _ in range(rng.integers(3, 6)):  # bowel loops with gas
        centre = (rng.uniform(-20, 70), rng.uniform(30, 80), rng.uniform(-80, 60))
        paint(_ellipsoid(grid, centre, (rng.uniform(10, 18),) * 2 + (rng.uniform(15, 30),)), rng.uniform(15, 40))
        paint(_ellipsoid(grid, centre, (6, 6, 6)), -850.0)
    organ_hu = spleen_hu + rng.uniform(-6, 6)  # as bright as the spleen: only shape and place tell them apart
    organ_centre = (-65 + rng.uniform(-10, 10), 15 + rng.uniform(-10, 10), rng.uniform(0, 30))
    organ_radii = (rng.uniform(65, 80), rng.uniform(60, 75), rng.uniform(70, 90))
    organ = _ellipsoid(grid, organ_centre, organ_radii, _wobble(rng, 0.12)) & inner
    label = organ.astype(np.uint8)
    paint(organ, organ_hu)
    count = 0 if rng.random() < NO_LESION else (2 if rng.random() < TWO_LESIONS else 1)
    for _ in range(count):
        radius = rng.uniform(*LESION_MM) / 2
        for _ in range(100):  # a centre well inside the organ
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            reach = 1 - (radius + 6) / min(organ_radii)
            centre = [c + r * d * reach * rng.uniform(0, 0.8) for c, r, d in zip(organ_centre, organ_radii, direction)]
            lesion = _ellipsoid(grid, centre, (radius, radius * rng.uniform(0.8, 1.0), radius * rng.uniform(0.8, 1.0)))
            if lesion.any() and organ[lesion].all():
                break
        paint(lesion, organ_hu - rng.uniform(30, 50))
        label[lesion] = 2
    hu = _scanner(hu, rng, setting, spacing)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), label, spacing


def _scanner(hu: np.ndarray, rng: np.random.Generator, setting: dict, spacing: tuple) -> np.ndarray:
    """The site's blur, correlated noise and calibration offset; air stays near -1000."""
    sigma = [setting["kernel"] / s for s in spacing[:2]] + [0.5]
    hu = ndimage.gaussian_filter(hu, sigma)
    noise = rng.standard_normal(hu.shape, dtype=np.float32) * setting["noise"]
    noise = ndimage.gaussian_filter(noise, [0.7, 0.7, 0]) * 2.0  # the kernel's texture, at about the same std
    return hu + noise + setting["offset"]


def write_ct_dataset(out: str | Path, cases: int = 50, size: int = 512, seed: int = 0, workers: int = 1) -> Path:
    """Write `cases` CT-like cases (half from each site, alternating) in the MSD layout, with sites.csv. Case i
    is drawn from its own seed (seed, i), so any number of `workers` writes the same files."""
    if cases < 4:
        raise MedsegError(f"--cases {cases}: a CT-like set needs at least 4 cases")
    if not 32 <= size <= 1024:
        raise MedsegError(f"--size {size}: CT-like slices are 32 to 1024 pixels wide")
    out = Path(out)
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(out, i, size, seed) for i in range(cases)]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            names = pool.map(_write_case, jobs)
    else:
        names = [_write_case(job) for job in jobs]
    training = [{"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"} for name in names]
    sites = [{"case": name[:-7], "site": "AB"[i % 2]} for i, name in enumerate(names)]
    meta = {"name": "medseg CT-like", "description": "synthetic, seeded: two sites, an organ with small hypodense "
            "lesions, distractors", "tensorImageSize": "3D", "labels": dict(enumerate(CLASS_NAMES)),
            "numTraining": cases, "numTest": 0, "seed": seed, "training": training, "test": []}
    meta["labels"] = {str(k): v for k, v in meta["labels"].items()}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    with open(out / "sites.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["case", "site"])
        writer.writeheader()
        writer.writerows(sites)
    return out


def _write_case(job: tuple) -> str:
    import nibabel as nib

    out, i, size, seed = job
    hu, label, spacing = make_ct_case(np.random.default_rng([seed, i]), "AB"[i % 2], size)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS voxel axes, as CT from DICOM
    name = f"ct_{i:03d}.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), str(out / "imagesTr" / name))
    nib.save(nib.Nifti1Image(label, affine), str(out / "labelsTr" / name))
    return name
