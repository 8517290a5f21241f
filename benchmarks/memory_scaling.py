"""Training memory and time against dataset size, cases held in memory and cached on disk (issue 14, item 2).

For each size, a synthetic 3D dataset (--side^3 phantoms) is trained for one short epoch in a fresh process, with
`--cache memory` and `--cache disk` (a fresh cache, so its first run pays the preprocessing, reported apart);
the process's peak resident memory and the seconds of its epoch are recorded.

    python benchmarks/memory_scaling.py [--sizes 50 150 500] [--side 48] [--json OUT] [--docs]

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


def one_run(data: Path, out: Path, cache: str, cache_folder: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", ONE_RUN, str(data), str(out), cache], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "MEDSEG_CACHE": str(cache_folder)})
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
