"""Training memory and time against dataset size, cases held in memory and cached on disk (issue 14, item 2).

For each size, a synthetic 3D dataset (--side^3 phantoms) is trained for one short epoch in a fresh process, with
`--cache memory` and `--cache disk` (a fresh cache, so its first run pays the preprocessing, reported apart);
the process's peak resident memory and the seconds of its epoch are recorded.

    python benchmarks/memory_scaling.py [--sizes 50 150 500] [--side 48] [--json OUT] [--docs]
    python benchmarks/memory_scaling.py --ct 100 [--json OUT] [--docs]   # 2.5D on CT-sized volumes (issue 32)

With --ct N: N volumes of 512x512x100 int16 (a body and an organ), trained as `medseg train` trains 2D networks on
volumes (axial slices with a neighbour on either side, 128 crops, batch 16) with `--cache auto`, which has to
choose the disk cache from the decoded size (N x 128 MiB as float32 with labels); the peak must stay under 4 GB.

With --docs: docs/benchmarks/memory_scaling.{json,png} and the MEMORY_SCALING section of docs/benchmarks.md.
tests/test_cache.py runs it at 50 and 500 volumes with --cold-only and checks the disk cache's growth (< 20%).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDE = 48  # voxels per side of each phantom volume (tests use 32, to be quicker)

ONE_RUN = """
import json, resource, sys, time
from medseg.config import TrainConfig
from medseg.train import train
started = time.perf_counter()
run = train(TrainConfig(data=sys.argv[1], out=sys.argv[2], dims=3, patch=[24, 24, 24], base_channels=4, depth=2,
                        batch_size=2, epochs=1, steps_per_epoch=8, val_fraction=0.02, test_fraction=0.02,
                        cache=sys.argv[3], threads=1, progress=False))
history = json.loads((run / "history.json").read_text())
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "epoch_seconds": history[-1]["seconds"], "total_seconds": time.perf_counter() - started}))
"""


CT_RUN = """
import json, resource, sys, time
from medseg import cache
from medseg.config import TrainConfig
from medseg.datasets import find_cases
from medseg.train import train
started = time.perf_counter()
cfg = TrainConfig(data=sys.argv[1], out=sys.argv[2], dims=2, axis=2, context=1, fit="pad", size=128, base_channels=8,
                  depth=4, batch_size=16, epochs=1, steps_per_epoch=8, val_fraction=0.02, test_fraction=0.02,
                  cache="auto", normalization="zscore", threads=2, progress=False)
disk = cache.use_disk(cfg, find_cases(sys.argv[1]).cases)
run = train(cfg)
history = json.loads((run / "history.json").read_text())
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cache": "disk" if disk else
                  "memory", "epoch_seconds": history[-1]["seconds"], "total_seconds": time.perf_counter() - started}))
"""


def one_run(data: Path, out: Path, cache: str, cache_folder: Path, script: str = ONE_RUN) -> dict:
    done = subprocess.run([sys.executable, "-c", script, str(data), str(out), cache], capture_output=True, text=True,
                          timeout=3600, env={**os.environ, "MEDSEG_CACHE": str(cache_folder)})
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(sizes: list[int], side: int = SIDE, warm: bool = True) -> list[dict]:
    """Without `warm`, the disk-cache run is only the first one, which also writes the cache (quicker)."""
    from medseg.synth import write_synthetic_dataset

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for cases in sizes:
            data = write_synthetic_dataset(folder / f"data{cases}", cases=cases, dim=3, size=side)
            cache = folder / f"cache{cases}"
            row = {"volumes": cases, "memory": one_run(data, folder / f"m{cases}", "memory", cache),
                   "disk_first": one_run(data, folder / f"d{cases}", "disk", cache)}  # preprocesses into the cache
            row["disk"] = one_run(data, folder / f"e{cases}", "disk", cache) if warm else row["disk_first"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def ct_sized(volumes: int, slices: int = 100) -> dict:
    """Peak memory of 2.5D training on `volumes` CT-sized volumes (512x512x`slices`) with --cache auto."""
    import nibabel as nib
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for sub in ("imagesTr", "labelsTr"):
            (folder / "data" / sub).mkdir(parents=True)
        rng = np.random.default_rng(0)
        y, x = np.mgrid[:512, :512]
        body = ((x - 256) / 200) ** 2 + ((y - 256) / 150) ** 2 <= 1
        for i in range(volumes):
            organ = np.zeros((512, 512, slices), bool)
            cx, cy = rng.integers(150, 250, 2)
            organ[cx:cx + 120, cy:cy + 100, 20:80] = True
            hu = np.where(body[..., None], 40, -1000).astype(np.int16) + (organ * 20).astype(np.int16)
            hu += rng.integers(-20, 20, size=(512, 512, 1), dtype=np.int16)
            affine = np.diag([0.8, 0.8, 2.5, 1.0])
            nib.save(nib.Nifti1Image(hu, affine), folder / "data" / "imagesTr" / f"ct_{i:03d}.nii.gz")
            nib.save(nib.Nifti1Image(organ.astype(np.uint8), affine), folder / "data" / "labelsTr" / f"ct_{i:03d}.nii.gz")
        row = one_run(folder / "data", folder / "run", "auto", folder / "cache", CT_RUN)
        row.update(volumes=volumes, shape=[512, 512, slices])
        print(json.dumps(row), flush=True)
        return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["volumes"] for r in rows]
    figure, (memory, seconds) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label in (("memory", "--cache memory"), ("disk", "--cache disk")):
        memory.plot(sizes, [r[key]["peak_mib"] for r in rows], "o-", label=label)
        seconds.plot(sizes, [r[key]["epoch_seconds"] for r in rows], "o-", label=label)
    memory.set(xlabel="volumes in the dataset", ylabel="peak memory of training (MiB)", xscale="log")
    seconds.set(xlabel="volumes in the dataset", ylabel="seconds per epoch (8 steps + validation)", xscale="log")
    memory.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 150, 500])
    parser.add_argument("--side", type=int, default=SIDE, help="voxels per side of each volume")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--docs", action="store_true")
    parser.add_argument("--cold-only", action="store_true",
                        help="time the disk cache only on its first run, which also writes it (the test's quick mode)")
    parser.add_argument("--ct", type=int, help="instead: this many CT-sized volumes, 2.5D, --cache auto")
    args = parser.parse_args()
    if args.ct:
        return ct_docs(ct_sized(args.ct), args)
    rows = measure(args.sizes, args.side, warm=not args.cold_only)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.docs:
        import platform

        sys.path.insert(0, str(Path(__file__).parent))
        from docs_section import write_section

        docs = ROOT / "docs" / "benchmarks"
        (docs / "memory_scaling.json").write_text(json.dumps(rows, indent=2))
        plot(rows, docs / "memory_scaling.png")
        lines = [f"Machine: {platform.machine()}, CPU, one thread. Synthetic {args.side}^3 volumes, 3D U-Net (width "
                 "4), patches 24^3, batch 2, one epoch of 8 steps; peak resident memory of the training process.", "",
                 "| volumes | memory: peak MiB | memory: s/epoch | disk: peak MiB | disk: s/epoch | disk, first run "
                 "(preprocessing): total s |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['volumes']} | {r['memory']['peak_mib']:.0f} | {r['memory']['epoch_seconds']:.1f} | "
                         f"{r['disk']['peak_mib']:.0f} | {r['disk']['epoch_seconds']:.1f} | "
                         f"{r['disk_first']['total_seconds']:.0f} |")
        lines += ["", "![memory and time per epoch against dataset size](benchmarks/memory_scaling.png)", "",
                  "Command: `python benchmarks/memory_scaling.py --docs` (alone on the machine)."]
        write_section("MEMORY_SCALING", "benchmarks/memory_scaling.py", lines,
                      "Training memory against dataset size: cases in memory or cached on disk")


def ct_docs(row: dict, args: argparse.Namespace) -> None:
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))
    if not args.docs:
        return
    import platform

    sys.path.insert(0, str(Path(__file__).parent))
    from docs_section import write_section

    (ROOT / "docs" / "benchmarks" / "memory_scaling_ct.json").write_text(json.dumps(row, indent=2))
    lines = [f"Machine: {platform.machine()}, CPU, 2 threads. {row['volumes']} volumes of "
             f"{'x'.join(map(str, row['shape']))} int16 (about {row['volumes'] * 128 / 1024:.1f} GiB as float32 "
             "images with labels), a 2D U-Net (width 8) on axial slices with a neighbour on either side (2.5D), 128 "
             "crops, batch 16, one epoch of 8 steps and the validation of 2 volumes, `--cache auto`.", "",
             "| volumes | --cache auto chose | peak MiB | s/epoch | total s (preprocessing included) |",
             "|---|---|---|---|---|",
             f"| {row['volumes']} | {row['cache']} | {row['peak_mib']:.0f} | {row['epoch_seconds']:.1f} | "
             f"{row['total_seconds']:.0f} |", "",
             f"Command: `python benchmarks/memory_scaling.py --ct {row['volumes']} --docs` (alone on the machine)."]
    write_section("MEMORY_SCALING_CT", "benchmarks/memory_scaling.py --ct", lines,
                  "Training memory on CT-sized volumes (2.5D, --cache auto)")


if __name__ == "__main__":
    main()
