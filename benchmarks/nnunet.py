"""The peer a user would pick instead: nnU-Net v2, default planner and trainer, on the same cases and budget.

    python benchmarks/nnunet.py                         # MSD Hippocampus, 3d_fullres, 30 minutes (about 40 here)
    python benchmarks/nnunet.py --configuration 2d --minutes 30

What is the same as medseg's accuracy run (benchmarks/accuracy.py): the training cases (medseg's train + validation
split of seed 0, handed to nnU-Net as its fold 0 through splits_final.json, so its checkpoint is chosen on the same
validation cases), the test cases (medseg's 20% test split: nnU-Net never sees them until prediction), the
wall-clock budget on this machine, and the scoring (medseg's metrics on each test case at its own grid).

What is nnU-Net's own: everything else. It is installed in a venv of its own (`.venv-nnunet`, torch pinned to
the same 2.13.0 by constraints.txt; torchvision removed again, since it does not import beside that torch and
timm then skips it; the `primus` trainer folder, whose imports need torchvision, moved out of the trainer search).
The only code added to it is a trainer subclass that sets the number of epochs and iterations per epoch so that the
run fits the budget: EPOCHS x (ITERATIONS x seconds per iteration + 50 validation iterations) + the final
validation, from the per-iteration times given (3d_fullres on the hippocampus, 2 cores: about 4 s per iteration in
a first short try, 5.4 s over the whole 2026-11-28 run, whose 5 x 61 iterations therefore took 35.6 minutes, not 30).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
DOCS = ROOT / "docs" / "benchmarks"
VENV = ROOT / ".venv-nnunet"
HIPPOCAMPUS = SHARED / "msd_hippocampus" / "Task04_Hippocampus"
DATASET_ID, DATASET_NAME = 4, "Dataset004_Hippocampus"
TRAINER_TEMPLATE = '''import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class {name}(nnUNetTrainer):
    """nnU-Net's default trainer with only the training length changed to fit a CPU budget (medseg benchmark)."""

    def __init__({signature}):
        super().__init__({call})
        self.num_epochs = {epochs}
        self.num_iterations_per_epoch = {iterations}
'''


def venv_python() -> Path:
    """nnU-Net's own venv, made on first use."""
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-c", str(ROOT / "constraints.txt"),
                        "nnunetv2"], check=True)
        subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", "torchvision"], check=True)
        package = Path(subprocess.run([str(python), "-c", "import nnunetv2, os; print(os.path.dirname("
                                       "nnunetv2.__file__))"], check=True, capture_output=True,
                                      text=True).stdout.strip())
        primus = package / "training" / "nnUNetTrainer" / "primus"
        if primus.exists():
            shutil.move(str(primus), str(VENV / "primus-needs-torchvision"))
    return python


def split() -> dict:
    """medseg's default split of the hippocampus (seed 0): the cases nnU-Net may train and validate on, and the
    test cases it only predicts."""
    sys.path.insert(0, str(ROOT / "src"))
    from medseg.datasets import find_cases, split_cases

    cases = find_cases(HIPPOCAMPUS).cases
    parts = split_cases([c.case_id for c in cases])
    return {**parts, "files": {c.case_id: (str(c.images[0]), str(c.mask)) for c in cases}}


def write_raw(raw: Path, parts: dict) -> None:
    """nnU-Net's raw layout as links to the shared files (read in place, never copied)."""
    folder = raw / DATASET_NAME
    shutil.rmtree(folder, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    for case in parts["train"] + parts["val"]:
        image, mask = parts["files"][case]
        os.symlink(image, folder / "imagesTr" / f"{case}_0000.nii.gz")
        os.symlink(mask, folder / "labelsTr" / f"{case}.nii.gz")
    for case in parts["test"]:
        os.symlink(parts["files"][case][0], folder / "imagesTs" / f"{case}_0000.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": len(parts["train"]) + len(parts["val"]), "file_ending": ".nii.gz"}, indent=2))


def write_trainer(python: Path, epochs: int, iterations: int) -> str:
    """The budget trainer, with the installed nnUNetTrainer's own constructor signature; returns its name."""
    name = f"nnUNetTrainerBudget_{epochs}ep_{iterations}it"
    probe = ("import inspect, os, torch, nnunetv2\n"
             "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
             "s = inspect.signature(nnUNetTrainer.__init__)\n"
             "def text(p):\n"
             "    if p.default is inspect.Parameter.empty: return p.name\n"
             "    d = p.default\n"
             "    return f'{p.name}=torch.device({str(d)!r})' if isinstance(d, torch.device) else f'{p.name}={d!r}'\n"
             "print(os.path.dirname(nnunetv2.__file__))\n"
             "print(', '.join(text(p) for p in s.parameters.values()))\n"
             "print(', '.join(p for p in s.parameters if p != 'self'))")
    package, signature, call = subprocess.run([str(python), "-c", probe], check=True, capture_output=True,
                                              text=True).stdout.strip().split("\n")
    target = Path(package) / "training" / "nnUNetTrainer" / "variants" / "medseg_budget.py"
    target.write_text(TRAINER_TEMPLATE.format(name=name, signature=signature, call=call, epochs=epochs,
                                              iterations=iterations))
    return name


def nnunet(python: Path, command: str, *args: str, env: dict) -> float:
    """Run one nnU-Net command from its venv; returns the seconds it took."""
    started = time.monotonic()
    subprocess.run([str(python.parent / command), *args], check=True, env=env)
    return time.monotonic() - started


def score(predictions: Path, parts: dict) -> dict:
    """medseg's metrics on nnU-Net's test predictions, each case at its own grid, summarised as medseg does."""
    from medseg.datasets import labels_to_classes
    from medseg.evaluate import summarise
    from medseg.io import read_image
    from medseg.metrics import scored_metrics

    names = ["background", "Anterior", "Posterior"]
    rows = []
    for case in parts["test"]:
        label = read_image(parts["files"][case][1])
        pred = read_image(predictions / f"{case}.nii.gz")
        truth = labels_to_classes(label.array, label.path)
        scores = scored_metrics(pred.array[0].astype("uint8"), truth, names, spacing=label.spacing, boundary=True)
        rows += [{"case": case, "class": n, **m} for n, m in scores.items()]
    return summarise(rows, names[1:], f"test cases of {HIPPOCAMPUS.name}", Path("nnunet"))


def plan_length(minutes: float, seconds_per_iteration: float, seconds_per_val_iteration: float,
                fixed_seconds: float) -> tuple[int, int]:
    """Epochs and iterations per epoch that fit the budget, keeping at least 5 epochs (nnU-Net's poly schedule
    and checkpoint choice work per epoch) and as many iterations as then fit."""
    budget = minutes * 60 - fixed_seconds
    epochs = 5
    per_epoch = budget / epochs - 50 * seconds_per_val_iteration
    iterations = max(1, int(per_epoch / seconds_per_iteration))
    return epochs, iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--seconds-per-iteration", type=float, default=5.4)
    parser.add_argument("--seconds-per-val-iteration", type=float, default=1.3)
    parser.add_argument("--fixed-seconds", type=float, default=240,
                        help="start-up and the final validation of the 32 validation cases")
    parser.add_argument("--out", default=str(ROOT / "runs" / "nnunet"))
    args = parser.parse_args()
    if not HIPPOCAMPUS.exists():
        sys.exit(f"{HIPPOCAMPUS} not found (the shared datasets live beside the repository)")
    python = venv_python()
    out = Path(args.out)
    env = {**os.environ, "nnUNet_raw": str(out / "raw"), "nnUNet_preprocessed": str(out / "preprocessed"),
           "nnUNet_results": str(out / "results")}
    parts = split()
    write_raw(out / "raw", parts)
    preprocess = nnunet(python, "nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", args.configuration,
                        "-np", "2", "--verify_dataset_integrity", env=env)
    folds = [{"train": parts["train"], "val": parts["val"]}]
    (out / "preprocessed" / DATASET_NAME / "splits_final.json").write_text(json.dumps(folds, indent=2))
    epochs, iterations = plan_length(args.minutes, args.seconds_per_iteration, args.seconds_per_val_iteration,
                                     args.fixed_seconds)
    trainer = write_trainer(python, epochs, iterations)
    shutil.rmtree(out / "results", ignore_errors=True)
    train_seconds = nnunet(python, "nnUNetv2_train", str(DATASET_ID), args.configuration, "0", "-tr", trainer,
                           "-device", "cpu", env=env)
    predictions = out / "test_predictions"
    shutil.rmtree(predictions, ignore_errors=True)
    predict_seconds = nnunet(python, "nnUNetv2_predict", "-i", str(out / "raw" / DATASET_NAME / "imagesTs"),
                             "-o", str(predictions), "-d", str(DATASET_ID), "-c", args.configuration, "-f", "0",
                             "-tr", trainer, "-device", "cpu", env=env)
    summary = score(predictions, parts)
    result = {"dataset": "msd_hippocampus", "configuration": args.configuration, "trainer": trainer,
              "epochs": epochs, "iterations_per_epoch": iterations, "budget_min": args.minutes,
              "preprocess_min": round(preprocess / 60, 1), "train_min": round(train_seconds / 60, 1),
              "predict_s_per_case": round(predict_seconds / len(parts["test"]), 2),
              "test_cases": len(parts["test"]), "train_cases": len(parts["train"]), "val_cases": len(parts["val"]),
              "dice": {k: [v["dice"]["mean"], v["dice"]["std"]] for k, v in summary["per_class"].items()},
              "hd95_mm": {k: [v["hd95"]["mean"], v["hd95"]["std"]] for k, v in summary["per_class"].items()},
              "mean_dice": summary["mean_dice"]}
    print(json.dumps(result, indent=2))
    store = DOCS / "nnunet.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    results[f"msd_hippocampus/{args.configuration}"] = result
    store.write_text(json.dumps(results, indent=2))
    write_docs(results)


def write_docs(results: dict) -> None:
    """nnU-Net's rows beside medseg's default run on the same test cases (docs/benchmarks/accuracy.json)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from docs_section import write_section

    ours = json.loads((DOCS / "accuracy.json").read_text())["results"] if (DOCS / "accuracy.json").exists() else {}
    lines = ["Same training and validation cases (medseg's seed-0 split, given to nnU-Net as fold 0), same test "
             "cases (used for no choice by either), same wall-clock budget on this 2-core CPU, scored by medseg's "
             "metrics.", "",
             "| dataset | tool | configuration | budget (min) | trained (min) | epochs x iterations | test cases | "
             "Dice per class (mean ± sd) | HD95 mm |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        name = key.split("/")[0]
        mine = ours.get(name)
        if mine:
            lines.append(f"| {name} | medseg (default) | {mine['plan']} | {mine['budget_min']:g} | "
                         f"{mine['train_min']} | - | {mine['test_cases']} | {_cells(mine['dice'])} | "
                         f"{_cells(mine['hd95'])} |")
        lines.append(f"| {name} | nnU-Net v2 | {r['configuration']}, {r['trainer']} | {r['budget_min']:g} | "
                     f"{r['train_min']} | {r['epochs']} x {r['iterations_per_epoch']} | {r['test_cases']} | "
                     f"{_cells(r['dice'])} | {_cells(r['hd95_mm'])} |")
    write_section("NNUNET", "benchmarks/nnunet.py", lines, "medseg beside nnU-Net v2 (benchmarks/nnunet.py)")


def _cells(per_class: dict) -> str:
    return "; ".join(f"{k} {m:.3f} ± {s:.3f}" for k, (m, s) in per_class.items())


if __name__ == "__main__":
    main()
