"""What the same code does on a CUDA GPU: throughput of the seed and the planned networks, and the hippocampus
recipe of benchmarks/accuracy.py trained on the GPU for a few minutes (does the recipe reach the bar when the
budget is not the limit?). Run on a machine with a GPU; the CPU figures are in docs/benchmarks.md.

    python benchmarks/gpu.py --out OUT --data PATH/Task04_Hippocampus [--minutes 2.5] [--minutes-3d 1.5]
    python benchmarks/gpu.py --write-docs OUT/gpu.json      # back on the dev machine: the GPU section of the docs
    python benchmarks/gpu.py --out /tmp/g --data ... --device cpu --minutes 0.1 --minutes-3d 0.1   # smoke test

OUT/gpu.json is rewritten after every step, so a run stopped early still leaves what it measured.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import bar_for, train_then_evaluate, with_bar_inputs  # noqa: E402
from recipes import RECIPES, SHARED  # noqa: E402
from medseg.models import count_flops, create_model  # noqa: E402

# (name, model arguments, input size, batch): the seed's full-width U-Net and the networks the CPU recipes use.
NETWORKS = [
    ("seed U-Net 2D (64-1024), 128x128", {"base_channels": 64, "depth": 4}, (128, 128), 16),
    ("planned U-Net 2D (16-256), 64x64 (hippocampus)", {"base_channels": 16, "depth": 4}, (64, 64), 32),
    ("planned U-Net 2D (16-256), 256x256 (EM, DRIVE)", {"base_channels": 16, "depth": 4}, (256, 256), 8),
    ("U-Net 3D (16-256), 64^3", {"base_channels": 16, "depth": 4, "spatial_dims": 3}, (64, 64, 64), 2),
]


# the planned 3D recipe of docs/benchmarks.md (0.838 / 0.829 after 20 CPU minutes)
HIPPOCAMPUS_3D = ("--dims 3 --patch 40,56,40 --base-channels 16 --depth 3 --norm instance --activation leaky_relu "
                  "--optimizer sgd --lr 1e-2 --lr-schedule poly --batch-size 2 --epochs 1000 --steps-per-epoch 100 "
                  "--patience 0 --normalization zscore --mirror-tta")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(args: dict, size: tuple, batch: int, device: torch.device, repeats: int = 5) -> dict:
    """Images per second for a training step (forward, backward, Adam) and for inference, median of `repeats`
    timed bursts after warm-up; fp32, and bf16 autocast where the device is a GPU."""
    model = create_model("unet", in_channels=1, num_classes=2, **args).to(device)
    flops = count_flops(model.cpu(), (1, 1, *size))
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    image = torch.randn(batch, 1, *size, device=device)
    label = torch.randint(0, 2, (batch, *size), device=device)
    result = {"forward_gflop_per_image": round(flops / 1e9, 2), "batch": batch}
    modes = [("fp32", torch.float32)] + ([("bf16_autocast", torch.bfloat16)] if device.type == "cuda" else [])
    for mode, dtype in modes:
        def train_step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = torch.nn.functional.cross_entropy(model(image), label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        @torch.no_grad()
        def infer_step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                model(image)

        for key, step in (("train", train_step), ("infer", infer_step)):
            model.train(key == "train")
            steps = 3 if device.type == "cpu" else 10
            for _ in range(2):
                step()
            rates = []
            for _ in range(repeats):
                sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                sync(device)
                rates.append(steps * batch / (time.perf_counter() - start))
            result[f"{key}_images_per_s_{mode}"] = round(sorted(rates)[len(rates) // 2], 1)
    return result


def train_and_evaluate(data: Path, run: Path, recipe: str, minutes: float, device: str) -> dict:
    """Train with `medseg train DATA RECIPE` on `device` for `minutes`, then evaluate the run's held-out cases."""
    args = [str(data), "--out", str(run), "--overwrite", "--time-budget", f"{minutes:g}", "--quiet",
            "--device", device, "--recipe", "seed", *shlex.split(recipe)]  # the hand recipe's flags on the seed's
    summary, epochs, trained, evaluated = train_then_evaluate(args, run, device)
    steps = int(recipe.split("--steps-per-epoch")[1].split()[0]) if "--steps-per-epoch" in recipe else None
    return {"budget_min": minutes, "train_s": round(trained, 1), "evaluate_s": round(evaluated, 1),
            "epochs": epochs, "steps_per_epoch": steps, "val_cases": summary["cases"],
            "dice": {k: round(v["dice"]["mean"], 4) for k, v in summary["per_class"].items()},
            "hd95_mm": {k: round(v["hd95"]["mean"], 3) for k, v in summary["per_class"].items()},
            "inference_s_per_case": summary.get("inference_seconds_per_case"), "summary": summary,
            "command": "medseg train DATA " + " ".join(shlex.quote(a) for a in args[1:])}


def accuracy_recipe(spec: str, datasets: Path, runs: Path, minutes: float, device: str) -> dict:
    """One recipe of benchmarks/accuracy.py ("NAME [extra flags]") on `device`, judged by the same bar."""
    name, _, extra = spec.partition(" ")
    data = datasets / RECIPES[name]["data"].relative_to(SHARED)
    run = runs / "_".join(spec.split()).replace("-", "")
    result = train_and_evaluate(data, run, f"{RECIPES[name]['args']} {extra}", minutes, device)
    result["summary"] = with_bar_inputs(name, run, result["summary"])
    return judge(result, name)


def judge(result: dict, name: str) -> dict:
    """Add the accuracy benchmark's bar for dataset `name` (and drop the evaluation summary it was read from)."""
    result["bar"], result["measured"], result["met"] = bar_for(name, result.pop("summary"))
    return result


def nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi not available: {exc}"


def measure(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs) if args.runs else out / "runs"
    device = torch.device(args.device)
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "date": time.strftime("%Y-%m-%d"), "throughput": {}}
    (out / "nvidia-smi.txt").write_text(nvidia_smi())

    def save():
        (out / "gpu.json").write_text(json.dumps(result, indent=2))

    torch.backends.cudnn.benchmark = True
    for name, model_args, size, batch in [] if args.skip_throughput else NETWORKS:
        result["throughput"][name] = throughput(model_args, size, batch, device)
        print(name, result["throughput"][name], flush=True)
        save()
    if not args.skip_throughput:  # issue 14's pipeline ratios (benchmarks/throughput.py) on this device
        import tempfile

        import throughput as pipelines
        from medseg.synth import write_synthetic_dataset

        with tempfile.TemporaryDirectory() as folder:
            phantoms = write_synthetic_dataset(Path(folder) / "phantoms", cases=64, dim=2, size=256)
            result["pipelines"] = [pipelines.measure(2, phantoms, 50, 3, args.device)]
        if args.data:
            result["pipelines"].append(pipelines.measure(3, Path(args.data), 50, 3, args.device))
        print("pipelines", result["pipelines"], flush=True)
        save()
    if args.data:
        result["hippocampus_2d"] = train_and_evaluate(Path(args.data), runs / "hippocampus_2d",
                                                      RECIPES["msd_hippocampus"]["args"], args.minutes, args.device)
        judge(result["hippocampus_2d"], "msd_hippocampus")
        print("2D", result["hippocampus_2d"], flush=True)
        save()
        if args.minutes_3d:
            result["hippocampus_3d"] = train_and_evaluate(Path(args.data), runs / "hippocampus_3d", HIPPOCAMPUS_3D,
                                                          args.minutes_3d, args.device)
            judge(result["hippocampus_3d"], "msd_hippocampus")
            print("3D", result["hippocampus_3d"], flush=True)
            save()
    for spec in args.recipe or []:
        result.setdefault("recipes", {})[spec] = accuracy_recipe(spec, Path(args.datasets), runs, args.minutes,
                                                                 args.device)
        print(spec, result["recipes"][spec], flush=True)
        save()


def write_docs(path: Path) -> None:
    from docs_section import write_section

    result = json.loads(path.read_text())
    (ROOT / "docs" / "benchmarks" / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Device: {result['device']}, torch {result['torch']}, measured {result['date']} on a lent machine "
             "(CI has no GPU). Median of five timed bursts after warm-up.", "",
             "| network, input | forward GFLOP/image | batch | train img/s fp32 | train img/s bf16 | "
             "infer img/s fp32 | infer img/s bf16 |", "|---|---|---|---|---|---|---|"]
    for name, r in result["throughput"].items():
        lines.append(f"| {name} | {r['forward_gflop_per_image']} | {r['batch']} | {r['train_images_per_s_fp32']} | "
                     f"{r.get('train_images_per_s_bf16_autocast', '-')} | {r['infer_images_per_s_fp32']} | "
                     f"{r.get('infer_images_per_s_bf16_autocast', '-')} |")
    if result.get("pipelines"):
        lines += ["", "Training pipelines side by side on the GPU (benchmarks/throughput.py; steps per second, bf16 "
                      "autocast):", "", "| data | bare loop | medseg | MONAI, 0 workers | MONAI, 2 workers | "
                      "medseg / bare (bar 0.90) | medseg / best MONAI (bar 1.3) |", "|---|---|---|---|---|---|---|"]
        for r in result["pipelines"]:
            lines.append(f"| {'2D phantoms' if r['dims'] == 2 else 'MSD hippocampus'} | {r['bare_steps_per_s']} | "
                         f"{r['medseg_steps_per_s']} | {r['monai_workers0_steps_per_s']} | "
                         f"{r['monai_workers2_steps_per_s']} | {r['medseg_over_bare']:.2f} | "
                         f"{r['medseg_over_monai']:.2f} |")
    lines += ["", "The CPU recipes of benchmarks/accuracy.py, unchanged but for `--device cuda` and the budget "
                  "(steps per minute are set by the data sampler, which runs on the CPU):", "",
              "| recipe | GPU minutes | epochs x steps | Dice per class | bar | measured | met |",
              "|---|---|---|---|---|---|---|"]
    runs = {"msd_hippocampus (2D)": result.get("hippocampus_2d"), "msd_hippocampus (3D, planned)":
            result.get("hippocampus_3d"), **result.get("recipes", {})}
    for name, r in runs.items():
        if r:
            dice = " / ".join(f"{k} {v:.3f}" for k, v in r["dice"].items())
            lines.append(f"| {name} | {r['budget_min']:g} | {r['epochs']} x {r['steps_per_epoch']} | {dice} | "
                         f"{r['bar']} | {r['measured']} | {'yes' if r['met'] else 'NO'} |")
    lines += ["", "Commands (DATA is the dataset's folder):", ""]
    lines += [f"- {name}: `{r['command']}`" for name, r in runs.items() if r]
    write_section("GPU", "benchmarks/gpu.py", lines, "On a GPU (benchmarks/gpu.py)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    parser.add_argument("--data", help="Task04_Hippocampus folder (skip the training runs when absent)")
    parser.add_argument("--minutes", type=float, default=2.5)
    parser.add_argument("--minutes-3d", type=float, default=1.5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--recipe", action="append",
                        help="also train a recipe of benchmarks/accuracy.py, 'NAME [extra flags]' (repeatable)")
    parser.add_argument("--datasets", default=str(SHARED), help="the folder that holds the shared datasets")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--runs", help="where the training runs go (default OUT/runs)")
    parser.add_argument("--write-docs", help="a gpu.json to put into docs/benchmarks.md")
    args = parser.parse_args()
    if args.write_docs:
        write_docs(Path(args.write_docs))
    elif args.out:
        measure(args)
    else:
        parser.error("give --out (measure) or --write-docs")


if __name__ == "__main__":
    main()
