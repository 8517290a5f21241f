"""medseg's sliding-window inference against MONAI's `sliding_window_inference`, and memory at CT size.

    python benchmarks/sliding_window.py            # about 20 minutes on 2 cores; run it alone

Same network (the 3D U-Net medseg plans: width 16, depth 3, instance norm), same patch (64^3), same overlap (0.5),
Gaussian weighting in both (sigma = patch / 8), probabilities blended in both, same windows per batch (4), no TTA;
volumes of growing size, each timed alternately with the two implementations in PyTorch eager, with medseg's
onnxruntime engine (the same weights as ONNX) and with medseg's compiled engine (`--engine compiled`:
torch.compile with frozen weights), and MONAI's given that same compiled network (what a MONAI user gets by
assembling it); medians of 3, probabilities compared. Then a CT-sized volume
(512 x 512 x 300) through medseg's path in a fresh process, its peak resident memory read from the kernel
(VmHWM), for the same sizes as the timing. Writes docs/benchmarks/sliding_window.json, the plot
docs/benchmarks/sliding_window.png and the section between the SLIDING markers of docs/benchmarks.md.
"""
from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
PATCH, OVERLAP, BATCH = (64, 64, 64), 0.5, 4
SIZES = [(96, 96, 96), (128, 128, 128), (192, 192, 160)]
CT = (512, 512, 300)


def network() -> torch.nn.Module:
    from medseg.models import create_model

    torch.manual_seed(0)
    return create_model("unet", in_channels=1, num_classes=2, base_channels=16, depth=3, spatial_dims=3,
                        norm="instance", activation="leaky_relu").eval()


def ours(model, volume):
    from medseg.infer import sliding_window

    return sliding_window(model, volume, PATCH, OVERLAP, batch_size=BATCH)


def monai(model, volume):
    from monai.inferers import sliding_window_inference

    with torch.no_grad():  # probabilities blended, as medseg blends them
        probs = sliding_window_inference(volume, PATCH, BATCH, lambda x: model(x).softmax(1), overlap=OVERLAP,
                                         mode="gaussian", sigma_scale=0.125)
    return probs[0]


def compiled_network(model):
    """The same network as `medseg predict --engine compiled` runs it."""
    from medseg.compiling import FrozenNetwork

    return FrozenNetwork(model)


def onnx_network(model):
    """The same network, exported to ONNX and run by onnxruntime (`medseg predict --engine onnxruntime`: NumPy
    arrays in and out, PyTorch not involved)."""
    import tempfile
    from types import SimpleNamespace

    from medseg.config import TrainConfig
    from medseg.onnx_engine import OnnxNetwork, export_onnx

    trained = SimpleNamespace(model=model, config=TrainConfig(dims=3, depth=3), in_channels=1)
    path = export_onnx(trained, Path(tempfile.mkdtemp()) / "net.onnx")
    return OnnxNetwork(path, 2**3, torch.get_num_threads())


def timed(function, *args) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def peak_kib() -> int:
    """This process's peak resident memory in KiB: the kernel's high-water mark of its own address space (VmHWM).
    Not `ru_maxrss`, which Linux carries across fork and exec: a child started by this benchmark's process, which
    holds several networks and volumes, would report at least that process's size (the 2026-11-28 and first
    2026-11-29 figures did: 1.7-2.2 GiB for every size)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory(size: tuple[int, ...]) -> float:
    """GiB of peak resident memory of a fresh process predicting one volume of `size` with medseg's path."""
    code = (f"import torch, sys; sys.path.insert(0, {str(Path(__file__).parent)!r});"
            "from sliding_window import network, ours, peak_kib;"
            f"v = torch.randn(1, 1, *{size!r}); p = ours(network(), v); del p;"
            "print(peak_kib())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1]) / 2**20  # kilobytes -> GiB


def main() -> None:
    model = network()
    onnx, frozen = onnx_network(model), compiled_network(network())
    compile_s, _ = timed(ours, frozen, torch.randn(1, 1, 96, 96, 64))  # one-off: the graph for 4 windows
    pipelines = {"medseg": lambda v: ours(model, v), "monai": lambda v: monai(model, v),
                 "medseg_onnx": lambda v: torch.from_numpy(ours(onnx, v.numpy())),
                 "medseg_compiled": lambda v: ours(frozen, v), "monai_compiled": lambda v: monai(frozen, v)}
    rows = []
    for size in SIZES:
        volume = torch.randn(1, 1, *size)
        monai(model, volume)  # MONAI's first call pays a warm-up the others do not
        monai(frozen, volume)
        times, probs = {name: [] for name in pipelines}, {}
        for _ in range(3):
            for name, run in pipelines.items():
                seconds, probs[name] = timed(run, volume)
                times[name].append(seconds)
        row = {"size": list(size), **{f"{k}_s": statistics.median(v) for k, v in times.items()},
               "max_difference": float((probs["medseg"] - probs["monai"]).abs().max()),
               "onnx_difference": float((probs["medseg"] - probs["medseg_onnx"]).abs().max()),
               "compiled_difference": float((probs["medseg"] - probs["medseg_compiled"]).abs().max()),
               "medseg_peak_gib": peak_memory(size)}
        for name in ("medseg", "medseg_onnx", "medseg_compiled"):
            row[f"ratio{name[6:]}"] = row[f"{name}_s"] / row["monai_s"]
        row["ratio_compiled_both"] = row["medseg_compiled_s"] / row["monai_compiled_s"]
        rows.append(row)
        print(row, flush=True)
    started = time.perf_counter()
    ct = {"size": list(CT), "medseg_peak_gib": peak_memory(CT), "seconds": None}
    ct["seconds"] = time.perf_counter() - started
    print(ct, flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU"
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "sliding_window.json").write_text(json.dumps({"machine": machine, "rows": rows, "ct": ct,
                                                          "compile_s": compile_s}, indent=2))
    plot(rows, ct)
    sys.path.insert(0, str(Path(__file__).parent))
    from docs_section import write_section

    lines = [f"Machine: {machine}. 3D U-Net width 16, depth 3, instance norm; patch {PATCH}, overlap {OVERLAP}, "
             f"Gaussian weights, {BATCH} windows per batch, no TTA; medians of 3 runs, the five alternating. "
             f"Compiled: `--engine compiled` (torch.compile, frozen weights), its one-off compile {compile_s:.0f} s "
             "not in the times.", "",
             "| volume | medseg, eager (s) | MONAI sliding_window_inference, eager (s) | ratio | medseg, onnxruntime "
             "(s) | ratio | medseg, compiled (s) | ratio (bar 0.8) | MONAI with medseg's compiled network (s) | "
             "medseg / MONAI, both compiled | max probability difference to MONAI | medseg peak memory (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'x'.join(map(str, r['size']))} | {r['medseg_s']:.2f} | {r['monai_s']:.2f} | "
                     f"{r['ratio']:.2f} | {r['medseg_onnx_s']:.2f} | {r['ratio_onnx']:.2f} | "
                     f"{r['medseg_compiled_s']:.2f} | {r['ratio_compiled']:.2f} | {r['monai_compiled_s']:.2f} | "
                     f"{r['ratio_compiled_both']:.2f} | {r['max_difference']:.1e} | {r['medseg_peak_gib']:.2f} |")
    lines += ["", f"CT-sized volume {'x'.join(map(str, CT))}: peak resident memory {ct['medseg_peak_gib']:.2f} GiB "
              f"(whole process: Python, PyTorch, the volume, the probabilities; eager engine), {ct['seconds']:.0f} s.",
              "", "![time and memory against volume size](benchmarks/sliding_window.png)", "",
              "Command: `python benchmarks/sliding_window.py` (alone on the machine)."]
    write_section("SLIDING", "benchmarks/sliding_window.py", lines, "Sliding-window inference against MONAI's")
    print("\n".join(lines))


def plot(rows: list[dict], ct: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    voxels = [r["size"][0] * r["size"][1] * r["size"][2] / 1e6 for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(voxels, [r["medseg_s"] for r in rows], "o-", label="medseg, eager")
    left.plot(voxels, [r["monai_s"] for r in rows], "s-", label="MONAI, eager")
    left.plot(voxels, [r["medseg_compiled_s"] for r in rows], "^-", label="medseg, --engine compiled")
    left.set_xlabel("million voxels")
    left.set_ylabel("seconds per volume")
    left.legend()
    right.plot(voxels + [CT[0] * CT[1] * CT[2] / 1e6], [r["medseg_peak_gib"] for r in rows] + [ct["medseg_peak_gib"]],
               "o-")
    right.set_xlabel("million voxels")
    right.set_ylabel("peak resident memory (GiB)")
    fig.tight_layout()
    fig.savefig(DOCS / "sliding_window.png", dpi=100)


if __name__ == "__main__":
    main()
