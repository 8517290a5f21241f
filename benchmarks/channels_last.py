"""What holding 2D networks channels-last (NHWC) on a CPU buys (`medseg.models.place`): training steps and
prediction in the shapes medseg's defaults use, eager and compiled, and the demo end to end.

    python benchmarks/channels_last.py [--repeats 7] [--demos 3]

Each row times one module in PyTorch's default layout and in channels-last on the same inputs, alternating
after a warm-up, medians reported, on the threads the default gives that shape (2 for one network, 1 for each
member of the hippocampus pair). The demo (eager: its two-minute budget is under torch.compile's threshold) runs
`--demos` times per layout, alternating, with `place` reduced to a plain move for the default-layout runs.
Writes docs/benchmarks/channels_last.json and the CHANNELS_LAST section of docs/benchmarks.md. Run it alone.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from medseg import models  # noqa: E402

# (what, threads, batch, input channels, classes, height, width): the default's shapes on the shared sets
TRAINING = [
    ("ISBI / DRIVE / DSB: 16 x 128^2, 1 channel", 2, 16, 1, 2, 128, 128),
    ("hippocampus sagittal member: 16 x 64x48, 3 channels (2.5D)", 1, 16, 3, 3, 64, 48),
    ("hippocampus coronal member: 16 x 48x48, 3 channels (2.5D)", 1, 16, 3, 3, 48, 48),
]
PREDICTION = [
    ("one ISBI section, 512^2, 8 TTA views as a batch", 2, 8, 1, 2, 512, 512),
    ("a hippocampus volume's sagittal slices: 36 x 64x48, 3 channels", 1, 36, 3, 3, 64, 48),
]


def network(channels: int, classes: int, layout: torch.memory_format) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.create_model("unet", in_channels=channels, num_classes=classes, base_channels=16, depth=4)
    return model.to(memory_format=layout)


def time_layouts(make_run, repeats: int) -> dict:
    """Median seconds of make_run(layout)() per layout, alternating after one warm-up call each."""
    runs = {layout: make_run(layout) for layout in (torch.contiguous_format, torch.channels_last)}
    for run in runs.values():
        run()
    times = {layout: [] for layout in runs}
    for _ in range(repeats):
        for layout, run in runs.items():
            started = time.perf_counter()
            run()
            times[layout].append(time.perf_counter() - started)
    default, nhwc = (statistics.median(times[layout]) for layout in runs)
    return {"default_s": round(default, 4), "channels_last_s": round(nhwc, 4), "speedup": round(default / nhwc, 3)}


def training_row(shape, compiled: bool, repeats: int) -> dict:
    what, threads, batch, channels, classes, h, w = shape
    image, label = torch.randn(batch, channels, h, w), torch.randint(0, classes, (batch, h, w))

    def make_run(layout):
        model = network(channels, classes, layout).train()
        step = torch.compile(model, dynamic=False) if compiled else model
        optimiser = torch.optim.Adam(model.parameters(), 1e-3)

        def run():
            loss = F.cross_entropy(step(image), label)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        return run
    torch.set_num_threads(threads)
    row = {"what": f"training step, {what}", "engine": "compiled" if compiled else "eager", "threads": threads,
           **time_layouts(make_run, repeats)}
    torch._dynamo.reset()
    return row


def prediction_row(shape, repeats: int) -> dict:
    what, threads, batch, channels, classes, h, w = shape
    image = torch.randn(batch, channels, h, w)

    def make_run(layout):
        model = network(channels, classes, layout).eval()

        def run():
            with torch.inference_mode():
                model(image)
        return run
    torch.set_num_threads(threads)
    return {"what": f"prediction, {what}", "engine": "eager", "threads": threads, **time_layouts(make_run, repeats)}


def demo_row(demos: int) -> dict:
    """The demo end to end per layout: training seconds (train_summary.json) and test Dice."""
    from medseg.demo import run_demo

    def plain(model, device):
        return model.to(device)
    torch.set_num_threads(2)
    results = {"default": [], "channels_last": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(demos):
            for name in results:
                with contextlib.ExitStack() as stack:
                    if name == "default":  # training and evaluation place the network in the default layout
                        for where in ("medseg.train.place", "medseg.checkpoint.place"):
                            stack.enter_context(mock.patch(where, plain))
                    summary = run_demo(Path(tmp) / name, progress=False)
                trained = json.loads((Path(tmp) / name / "run" / "train_summary.json").read_text())
                results[name].append((trained["seconds"], summary["mean_dice"]))
    default = statistics.median(s for s, _ in results["default"])
    nhwc = statistics.median(s for s, _ in results["channels_last"])
    return {"what": "the demo's training (320 steps, 16 x 64^2)", "engine": "eager", "threads": 2,
            "default_s": round(default, 1), "channels_last_s": round(nhwc, 1), "speedup": round(default / nhwc, 3),
            "dice_default": [round(d, 4) for _, d in results["default"]],
            "dice_channels_last": [round(d, 4) for _, d in results["channels_last"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--demos", type=int, default=3)
    args = parser.parse_args()
    rows = [training_row(shape, compiled, args.repeats) for shape in TRAINING for compiled in (False, True)]
    rows += [prediction_row(shape, args.repeats) for shape in PREDICTION]
    if args.demos:
        rows.append(demo_row(args.demos))
    machine = f"{platform.machine()}, 2 cores, torch {torch.__version__}, CPU"
    (ROOT / "docs" / "benchmarks" / "channels_last.json").write_text(
        json.dumps({"machine": machine, "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    lines = [f"Machine: {machine}. Medians of {args.repeats} (the demo: of {args.demos} runs per layout), the two "
             "layouts alternating after a warm-up; width 16, depth 4 (the demo: its own 16-32-64 / 128).", "",
             "| what | engine | threads | default layout (s) | channels-last (s) | speedup |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['engine']} | {r['threads']} | {r['default_s']} | {r['channels_last_s']} | "
              f"{r['speedup']}x |" for r in rows]
    demo = rows[-1] if args.demos else None
    if demo:
        lines += ["", f"The demo's test Dice (24 phantoms, chose nothing), per run: default layout "
                      f"{', '.join(map(str, demo['dice_default']))}; channels-last "
                      f"{', '.join(map(str, demo['dice_channels_last']))}."]
    lines += ["", "Command: `python benchmarks/channels_last.py` (alone on the machine)."]
    sys.path.insert(0, str(Path(__file__).parent))
    from docs_section import write_section

    write_section("CHANNELS_LAST", "benchmarks/channels_last.py", lines, "Channels-last 2D networks on this CPU")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
