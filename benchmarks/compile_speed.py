"""What torch.compile (inductor, CPU) buys medseg's networks here: the 3D U-Net of the sliding-window benchmark on one
batch of windows (inference, not compiled by medseg) and the default 2D U-Net on one training step (compiled by
`--compile auto` in time-budgeted CPU runs, see medseg.compiling).

    python benchmarks/compile_speed.py [--repeats 7]

Same module, same inputs; eager and compiled alternate after a warm-up, medians reported, and the one-off compile
time beside them (it is what a short job would pay). Writes docs/benchmarks/compile_speed.json and the
COMPILE_SPEED section of docs/benchmarks.md. Run it alone.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from medseg.models import create_model  # noqa: E402


def inference_case():
    model = create_model("unet", in_channels=1, num_classes=2, base_channels=16, depth=3, spatial_dims=3,
                         norm="instance", activation="leaky_relu").eval()
    windows = torch.randn(4, 1, 64, 64, 64)

    def run(network):
        with torch.inference_mode():
            network(windows)
    return "3D U-Net width 16, depth 3, instance norm: 4 windows of 64^3, inference", model, run


def training_case():
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=2, base_channels=16, depth=4, spatial_dims=2).train()
    optimiser = torch.optim.Adam(model.parameters(), 1e-3)
    image, label = torch.randn(16, 1, 128, 128), torch.randint(0, 2, (16, 128, 128))

    def run(network):
        loss = F.cross_entropy(network(image), label)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return "2D U-Net width 16, depth 4, batch norm: one training step, 16 x 128^2", model, run


def measure(case, repeats: int) -> dict:
    what, model, run = case()
    run(model)  # warm-up
    started = time.perf_counter()
    compiled = torch.compile(model)
    run(compiled)
    compile_seconds = time.perf_counter() - started
    eager, fast = [], []
    for _ in range(repeats):
        for network, times in ((model, eager), (compiled, fast)):
            started = time.perf_counter()
            run(network)
            times.append(time.perf_counter() - started)
    e, c = statistics.median(eager), statistics.median(fast)
    return {"what": what, "eager_s": round(e, 3), "compiled_s": round(c, 3), "ratio": round(c / e, 3),
            "compile_s": round(compile_seconds, 1), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rows = [measure(inference_case, args.repeats), measure(training_case, args.repeats)]
    machine = (f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU, "
               f"inductor with the system C++ compiler")
    (ROOT / "docs" / "benchmarks" / "compile_speed.json").write_text(
        json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    lines = [f"Machine: {machine}. Medians of {args.repeats}, eager and compiled alternating after a warm-up.", "",
             "| what | eager (s) | torch.compile (s) | compiled / eager | one-off compile (s) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['eager_s']} | {r['compiled_s']} | {r['ratio']} | {r['compile_s']} |" for r in rows]
    lines += ["", "Command: `python benchmarks/compile_speed.py` (alone on the machine)."]
    sys.path.insert(0, str(Path(__file__).parent))
    from docs_section import write_section

    write_section("COMPILE_SPEED", "benchmarks/compile_speed.py", lines, "torch.compile on this CPU")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
