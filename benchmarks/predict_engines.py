"""What `medseg predict` costs a user with each engine, compile included: is `--engine auto` a safe default?

    python benchmarks/predict_engines.py            # about 10 minutes on 2 cores; run it alone

A 3D run with the network medseg plans for volumes (U-Net, width 16, depth 3, instance norm, patch 64^3, overlap
0.5, no mirroring TTA) whose weights come from two training steps on phantoms: this measures time, the masks mean
nothing. Then `medseg predict` in a fresh process per engine and workload, the whole command timed as a user
waits for it (start-up, reading, compiling, windows, writing):

  few small: 10 volumes of 64^3 (one window each), where no compile can pay back;
  one medium: one 192 x 192 x 160 volume (100 windows);
  one large: one 384 x 384 x 160 volume (484 windows), the size where compiling should pay.

Each command gets an empty inductor cache (TORCHINDUCTOR_CACHE_DIR), so compiled and auto pay a cold compile, as
on a user's first run. Writes docs/benchmarks/predict_engines.json and the PREDICT_ENGINES section of
docs/benchmarks.md.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from docs_section import write_section
from medseg.compiling import COMPILE_AFTER_SECONDS
from medseg.config import TrainConfig
from medseg.synth import write_synthetic_dataset
from medseg.train import train

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
ENGINES = ("torch", "auto", "compiled")
WORKLOADS = {"few small": [(64, 64, 64)] * 10, "one medium": [(192, 192, 160)], "one large": [(384, 384, 160)]}


def make_run(folder: Path) -> Path:
    phantoms = write_synthetic_dataset(folder / "phantoms", cases=6, dim=3, size=64)
    cfg = TrainConfig(data=str(phantoms), out=str(folder / "run"), dims=3, patch=[64, 64, 64], base_channels=16,
                      depth=3, norm="instance", activation="leaky_relu", normalization="zscore", batch_size=2,
                      steps=2, mirror_tta=False, progress=False, device="cpu")
    return train(cfg)


def write_volumes(folder: Path, shapes: list[tuple[int, ...]]) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, shape in enumerate(shapes):
        nib.save(nib.Nifti1Image(rng.normal(size=shape).astype(np.float32), np.eye(4)), folder / f"v{i:02d}.nii.gz")
    return folder


def predict_seconds(run: Path, inputs: Path, out: Path, engine: str) -> tuple[float, str]:
    """Wall seconds of one `medseg predict` command, and what it printed on stderr about compiling."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        command = [sys.executable, "-m", "medseg", "predict", str(run), str(inputs), "--out", str(out),
                   "--engine", engine, "--quiet", "--device", "cpu"]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - started
    said = " ".join(line for line in done.stderr.splitlines() if "compil" in line)
    return seconds, said


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        run = make_run(folder)
        for name, shapes in WORKLOADS.items():
            inputs = write_volumes(folder / name.replace(" ", "_"), shapes)
            row = {"workload": name, "volumes": [list(s) for s in shapes]}
            for engine in ENGINES:
                seconds, said = predict_seconds(run, inputs, folder / f"out_{engine}_{name.replace(' ', '_')}", engine)
                row[engine] = round(seconds, 1)
                if engine == "auto":
                    row["auto_compiled"] = bool(said)
                print(name, engine, round(seconds, 1), said, flush=True)
            best = min(row["torch"], row["compiled"])
            row["auto_over_best"] = round(row["auto"] / best, 2)
            rows.append(row)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU"
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "predict_engines.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    lines = [f"Machine: {machine}. One `medseg predict` command per cell, in a fresh process with an empty inductor "
             "cache; wall seconds, start-up to the last mask written. 3D U-Net (width 16, depth 3, instance norm), "
             f"patch 64^3, overlap 0.5, no TTA; `auto` compiles a shape after {COMPILE_AFTER_SECONDS:g} s of eager "
             "work on it, or after the first batch where a volume's windows alone would take that long.", "",
             "| workload | torch, eager (s) | auto (s) | compiled (s) | auto compiled? | auto / the better of the other "
             "two |", "|---|---|---|---|---|---|"]
    for r in rows:
        sizes = ", ".join(sorted({"x".join(map(str, v)) for v in r["volumes"]}))
        lines.append(f"| {r['workload']} ({len(r['volumes'])} x {sizes}) | {r['torch']} | {r['auto']} | "
                     f"{r['compiled']} | {'yes' if r['auto_compiled'] else 'no'} | {r['auto_over_best']} |")
    lines += ["", "Command: `python benchmarks/predict_engines.py` (alone on the machine)."]
    write_section("PREDICT_ENGINES", "benchmarks/predict_engines.py", lines, "Prediction engines, compile included")


if __name__ == "__main__":
    main()
