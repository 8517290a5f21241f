"""One process against several (`medseg train --nproc N`) on the same cores: what DistributedDataParallel costs or
gains, side by side, for the same run (same global batch, same steps).

    python benchmarks/ddp_speed.py [--data DIR] [--steps 40] [--nproc 2]

Without --data, 2D phantoms (medseg synth, 64 of 128x128). Each configuration trains the same fixed number of
steps (no time budget) and reports its training seconds (epochs only, from history.json). One process uses every
core as threads; N processes use one thread each. Writes docs/benchmarks/ddp_speed.json and the DDP_SPEED section
of docs/benchmarks.md. Run it alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_seconds(data: Path, out: Path, steps: int, nproc: int) -> float:
    cores = os.cpu_count() or 1
    args = [sys.executable, "-m", "medseg", "train", str(data), "--out", str(out), "--recipe", "seed", "--size", "128",
            "--fit", "pad", "--base-channels", "16", "--depth", "4", "--norm", "instance", "--batch-size", "16",
            "--epochs", "1", "--steps-per-epoch", str(steps), "--quiet", "--overwrite",
            "--threads", str(cores if nproc == 1 else max(1, cores // nproc))]
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    subprocess.run(args, check=True, capture_output=True, text=True)
    history = json.loads((out / "history.json").read_text())
    return sum(row["seconds"] for row in history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if args.data is None:
            from medseg.synth import write_synthetic_dataset

            args.data = write_synthetic_dataset(folder / "phantoms", cases=64, dim=2, size=128)
        times = {1: [], args.nproc: []}
        for _ in range(args.repeats):  # alternating, so both meet the same machine
            for nproc in times:
                times[nproc].append(train_seconds(args.data, folder / f"run{nproc}", args.steps, nproc))
                print(nproc, times[nproc][-1], flush=True)
    one, many = statistics.median(times[1]), statistics.median(times[args.nproc])
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU", "steps": args.steps,
              "one_process_s": one, "processes": args.nproc, "several_processes_s": many, "speedup": one / many}
    sys.path.insert(0, str(Path(__file__).parent))
    from docs_section import write_section

    (ROOT / "docs" / "benchmarks" / "ddp_speed.json").write_text(json.dumps({**result, "times": times}, indent=2))
    write_section("DDP_SPEED", "benchmarks/ddp_speed.py", [
        f"Machine: {result['machine']}. 2D U-Net (width 16, depth 4, instance norm), global batch 16 of 128x128 "
        f"phantom crops, {args.steps} steps; training seconds (epochs only), median of {args.repeats}, alternating.",
        "", f"| one process, {os.cpu_count()} threads | {args.nproc} processes (DDP, gloo), one thread each | speed-up |",
        "|---|---|---|", f"| {one:.1f} s | {many:.1f} s | {result['speedup']:.2f}x |", "",
        "Command: `python benchmarks/ddp_speed.py` (alone on the machine)."],
        "One process or several on the same CPU (`--nproc`)")
    print(result)


if __name__ == "__main__":
    main()
