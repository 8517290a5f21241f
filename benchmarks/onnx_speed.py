"""PyTorch eager against onnxruntime: the same networks, the same cases, the same inference path, side by side.

    python benchmarks/onnx_speed.py                  # the runs benchmarks/accuracy.py left in runs/accuracy
    python benchmarks/onnx_speed.py --runs runs/accuracy/isbi2012_em

For each run, its first test cases are predicted through `medseg.infer.ensemble_probabilities` (slicing, TTA,
sliding window, resampling: everything `medseg predict` does before writing) with each engine in turn, alternating
engines per repetition so that both see the same machine load; the network alone is also timed on one batch of
the run's training size. Reported: medians, and their ratio. Run it alone (timings share the cores). Results go to
docs/benchmarks/onnx.json and to docs/benchmarks.md between the ONNX markers.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from docs_section import write_section
from medseg.checkpoint import load_models
from medseg.data import load_case
from medseg.evaluate import evaluation_cases
from medseg.infer import ensemble_probabilities
from medseg.onnx_engine import use_onnxruntime

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(run: Path, cases: int, repeats: int) -> dict:
    eager = load_models(run, device="cpu")
    onnx = use_onnxruntime(load_models(run, device="cpu"), torch.get_num_threads())
    planned, _ = evaluation_cases(eager)
    loaded = [load_case(item.case, eager[0].config, resample=False) for item in planned[:cases]]
    cfg = eager[0].config
    shape = (cfg.batch_size, eager[0].in_channels * cfg.slices_per_input,
             *(cfg.patch_size if cfg.dims == 3 else (cfg.size, cfg.size)))
    batch = torch.randn(*shape)
    result = {"run": str(run.relative_to(ROOT)) if run.is_relative_to(ROOT) else str(run),
              "members": len(eager), "cases": f"{len(loaded)} test cases", "batch": list(shape)}
    per_engine = {"torch": {"case": [], "network": []}, "onnxruntime": {"case": [], "network": []}}
    differences = []
    with torch.no_grad():
        for _ in range(repeats):  # engines alternate, so both meet the same load
            for name, models in (("torch", eager), ("onnxruntime", onnx)):
                seen = batch.numpy() if name == "onnxruntime" else batch  # onnxruntime takes NumPy arrays
                per_engine[name]["network"].append(timed(lambda: models[0].model(seen), 1))
                per_engine[name]["case"].append(sum(timed(lambda c=c: ensemble_probabilities(
                    models, c.image.array, c.image.spacing, c.image.affine), 1) for c in loaded) / len(loaded))
        for case in loaded:
            a = ensemble_probabilities(eager, case.image.array, case.image.spacing, case.image.affine)
            b = ensemble_probabilities(onnx, case.image.array, case.image.spacing, case.image.affine)
            differences.append(float(np.abs(a - b).max()))
    for name, times in per_engine.items():
        result[name] = {"seconds_per_case": statistics.median(times["case"]),
                        "seconds_per_batch": statistics.median(times["network"])}
    result["speedup_case"] = result["torch"]["seconds_per_case"] / result["onnxruntime"]["seconds_per_case"]
    result["speedup_network"] = result["torch"]["seconds_per_batch"] / result["onnxruntime"]["seconds_per_batch"]
    result["max_probability_difference"] = max(differences)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", default=sorted(str(p) for p in (ROOT / "runs" / "accuracy").iterdir()
                                                            if (p / "plan.json").exists()))
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    import onnxruntime

    machine += f", onnxruntime {onnxruntime.__version__}"
    rows = [measure(Path(run), args.cases, args.repeats) for run in args.runs]
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "onnx.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    lines = [f"Machine: {machine}, CPU. Medians of {args.repeats} repetitions, engines alternating; each case "
             "through the whole inference path (slicing or sliding window, TTA, every ensemble member).", "",
             "| run | members | cases | PyTorch eager (s per case) | onnxruntime (s per case) | speed-up | network alone, "
             "one batch (eager / onnxruntime) | max probability difference |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['members']} | {r['cases']} | {r['torch']['seconds_per_case']:.2f} | "
                     f"{r['onnxruntime']['seconds_per_case']:.2f} | {r['speedup_case']:.2f}x | "
                     f"{r['torch']['seconds_per_batch']:.3f} s / {r['onnxruntime']['seconds_per_batch']:.3f} s "
                     f"({r['speedup_network']:.2f}x, batch {'x'.join(map(str, r['batch']))}) | "
                     f"{r['max_probability_difference']:.1e} |")
    lines += ["", "Command: `python benchmarks/onnx_speed.py` (the runs of `benchmarks/accuracy.py`)."]
    write_section("ONNX", "benchmarks/onnx_speed.py", lines, "PyTorch eager against onnxruntime (CPU inference)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
