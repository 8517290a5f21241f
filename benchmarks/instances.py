"""Instances from a semantic mask: connected components against a distance-transform watershed, on a trained run.

    python benchmarks/instances.py RUN          # RUN: a run on instance masks (--binary-masks), e.g. DSB 2018

Connected components of the predicted foreground merge touching nuclei into one object, which then misses at
every IoU threshold. A watershed on the distance transform (`medseg.lesions.watershed_instances`, markers at
local maxima at least d pixels apart) splits them, and may split single nuclei too. Each way training chooses
among (`medseg.lesions.instance_methods`) is scored with the DSB 2018 metric (mean average precision over IoU
0.5-0.95) on the run's validation cases, where training makes the choice, and on its test cases, which choose
nothing. Figures go to
docs/benchmarks/instances.json and are quoted in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from medseg.checkpoint import load_models
from medseg.data import load_case
from medseg.evaluate import evaluation_cases
from medseg.io import read_image
from medseg.lesions import instance_ap, instance_methods, instances_of
from medseg.scoring import score_case

ROOT = Path(__file__).resolve().parents[1]


def score(run: Path, which: str) -> dict:
    """Mean instance AP per method over the run's `which` cases (images with objects in truth or prediction)."""
    models = load_models(run)
    methods = instance_methods()  # what training chooses among, on the validation cases
    aps = {name: [] for name in methods}
    for item in evaluation_cases(models, which=which)[0]:
        loaded = load_case(item.case, models[0].config, resample=False)
        foreground = score_case(item.models or models, loaded).pred > 0
        truth = read_image(item.case.mask, npy_layout=models[0].config.npy_layout).array[0]
        for name, method in methods.items():
            ap = instance_ap(instances_of(foreground, method), truth)["ap"]
            if not np.isnan(ap):
                aps[name].append(ap)
    return {name: {"mean_ap": round(float(np.mean(v)), 4), "images": len(v)} for name, v in aps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "instances.json")
    args = parser.parse_args()
    started = time.monotonic()
    validation, test = score(args.run, "val"), score(args.run, "test")
    chosen = max(validation, key=lambda name: validation[name]["mean_ap"])
    result = {"machine": f"{platform.machine()}, {time.strftime('%Y-%m-%d')}", "run": str(args.run),
              "validation": validation, "test": test, "chosen_on_validation": chosen,
              "seconds": round(time.monotonic() - started, 1)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
