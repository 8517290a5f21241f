"""The CT-like set's default on a lent GPU: what `medseg train DATA` plans and reaches when compute is not the limit,
and how fast it predicts a CT-sized volume. Run on the device machine (benchmarks/README-free: see the docs).

    python benchmarks/gpu_ct.py --out OUT [--work /tmp/gpu_ct] [--cases 24] [--minutes 3]
    python benchmarks/gpu_ct.py --write-docs OUT/gpu_ct.json    # back on the dev machine: the docs section

Steps, each saved to OUT/gpu_ct.json as it ends: nvidia-smi; training steps per second of the default's CT network
(2.5D, width 16) at 128 crops and whole 512 slices, fp32 and bf16 autocast, and slices per second predicted; a
CT-like set written on the machine (`medseg synth --kind ct`, seed 0, its first CASES cases); `medseg train DATA
--time-budget MINUTES --device cuda` with no other flag; `medseg evaluate` on its test cases; `medseg predict` of
one 512x512x300 volume on the GPU.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def steps_per_second(side: int, batch: int, dtype, device, train: bool = True, repeats: int = 20) -> float:
    import torch

    from medseg.models import UNet

    model = UNet(3, 3, 16, 4, spatial_dims=2).to(device)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    image = torch.randn(batch, 3, side, side, device=device)
    label = torch.randint(0, 3, (batch, side, side), device=device)
    model.train(train)

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            if train:
                loss = torch.nn.functional.cross_entropy(model(image), label)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            else:
                with torch.no_grad():
                    model(image)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return repeats / (time.perf_counter() - started)


def medseg(*args: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "medseg", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"medseg {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - started, done.stdout + done.stderr


def measure(out: Path, work: Path, cases: int, minutes: float) -> None:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d")}

    def save():
        (out / "gpu_ct.json").write_text(json.dumps(result, indent=2))

    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
    (out / "nvidia-smi.txt").write_text(smi)
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    result["throughput"] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for side in (128, 512):
            result["throughput"][f"train_steps_per_s_{side}_{name}"] = round(
                steps_per_second(side, 16, dtype, device), 1)
        result["throughput"][f"predict_slices_per_s_512_{name}"] = round(
            16 * steps_per_second(512, 16, dtype, device, train=False), 1)
    save()
    from medseg.synth_ct import write_ct_dataset

    started = time.perf_counter()
    data = write_ct_dataset(work / "data", cases=cases, workers=16)
    result["data"] = {"cases": cases, "seconds": round(time.perf_counter() - started, 1)}
    save()
    run = work / "run"
    train_s, log = medseg("train", str(data), "--out", str(run), "--time-budget", f"{minutes:g}", "--device", "cuda",
                          "--quiet")
    (out / "train.log").write_text(log)
    plan = json.loads((run / "plan.json").read_text())
    member = next(iter(plan["configurations"]["auto"]["members"].values()))
    summary = json.loads((run / "train_summary.json").read_text())
    result["train"] = {"seconds": round(train_s), "minutes": minutes, "steps": summary["steps"],
                       "budget": summary["budget"], "plan": {k: member.get(k) for k in (
                           "target_spacing", "size", "patch", "base_channels", "axis")},
                       "resolution_reason": plan["reasons"].get("axial_resolution")}
    save()
    evaluate_s, _ = medseg("evaluate", str(run), "--quiet", "--device", "cuda", "--figures", "0")
    evaluated = json.loads((run / "evaluation" / "summary.json").read_text())
    result["evaluate"] = {"seconds": round(evaluate_s), "cases": evaluated["cases_role"],
                          "dice": {k: v["dice"]["mean"] for k, v in evaluated["per_class"].items()},
                          "lesions": evaluated.get("lesions")}
    save()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ct import ct_volume

    volume = ct_volume(work / "volume_300.nii.gz")
    predict_s, _ = medseg("predict", str(run), str(volume), "--out", str(work / "predicted"), "--device", "cuda",
                          "--quiet")
    result["predict_300_slices_s"] = round(predict_s, 1)
    save()


def write_docs(path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from docs_section import write_section

    r = json.loads(path.read_text())
    (ROOT / "docs" / "benchmarks" / "gpu_ct.json").write_text(json.dumps(r, indent=2) + "\n")
    t = r["throughput"]
    lines = [f"Device: {r['device']}, torch {r['torch']}, measured {r['date']} on a lent machine (CI has no GPU).", "",
             "| the default's CT network (2.5D, width 16, batch 16) | fp32 | bf16 autocast |", "|---|---|---|",
             f"| training steps/s, 128 crops | {t['train_steps_per_s_128_fp32']} | {t['train_steps_per_s_128_bf16']} |",
             f"| training steps/s, whole 512 slices | {t['train_steps_per_s_512_fp32']} | "
             f"{t['train_steps_per_s_512_bf16']} |",
             f"| slices/s predicted, 512 | {t['predict_slices_per_s_512_fp32']} | {t['predict_slices_per_s_512_bf16']} |"]
    if "evaluate" in r:
        e, tr = r["evaluate"], r["train"]
        lesions = (e.get("lesions") or {}).get("lesion", {})
        lines += ["", f"`medseg train DATA --time-budget {tr['minutes']:g} --device cuda` with no other flag on the "
                      f"first {r['data']['cases']} cases of the CT-like set (seed 0): plan {tr['plan']} "
                      f"({tr['resolution_reason']}); {tr['steps']} steps; {e['cases']}: organ Dice "
                      f"{e['dice']['organ']:.4f}, lesion Dice {e['dice']['lesion']:.4f}, lesion F1 "
                      f"{lesions.get('f1', float('nan')):.3f}. Budget (s): {tr['budget']}."]
    if "predict_300_slices_s" in r:
        lines += ["", f"`medseg predict RUN volume.nii.gz --device cuda` on one 512x512x300 volume: "
                      f"{r['predict_300_slices_s']} s (process start and reading included)."]
    lines += ["", "Command: `python benchmarks/gpu_ct.py --out OUT` on the device, then `--write-docs`."]
    write_section("GPU_CT", "benchmarks/gpu_ct.py", lines, "The CT-like set on a GPU (benchmarks/gpu_ct.py)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="where gpu_ct.json, nvidia-smi.txt and train.log go")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_ct"), help="the data and the run")
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--write-docs", type=Path)
    args = parser.parse_args()
    if args.write_docs:
        write_docs(args.write_docs)
    else:
        measure(args.out, args.work, args.cases, args.minutes)


if __name__ == "__main__":
    main()
