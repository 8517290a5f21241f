"""The peer a user would pick instead: nnU-Net v2, default planner and trainer, on the same cases and budget.

    python benchmarks/nnunet.py                         # MSD Hippocampus, 3d_fullres, 30 minutes (about 40 here)
    python benchmarks/nnunet.py --configuration 2d --minutes 30
    python benchmarks/nnunet.py --dataset dsb2018       # DSB 2018 nuclei, nnU-Net's 2d configuration
    python benchmarks/nnunet.py --dataset dsb2018 --probe   # time one short epoch to size the budget trainer
    python benchmarks/nnunet.py --dataset drive         # DRIVE vessels, 2d, scored inside the field of view
    python benchmarks/nnunet.py --dataset isbi2012_em   # ISBI 2012 EM, 2d, with the challenge's pixel error

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
`--probe` trains one epoch of 20 iterations to measure them on another dataset or configuration.

2D images (DSB 2018, DRIVE, ISBI 2012) reach nnU-Net as PNG files it reads itself (RGB or grey, labels 0/1 after
medseg's own reading of the masks: DSB's instance masks with `--binary-masks`, DRIVE's and ISBI's 0/255 maps), written
under the output folder; volumes are linked, not copied. DRIVE is scored inside each image's field of view (its
`mask` folder), as medseg's evaluation scores it; nnU-Net trains on the whole images, as it would for a user. For
ISBI 2012 nnU-Net also saves its probabilities, from which the challenge's pixel error is computed as for medseg's
row.
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
DATASETS = {
    "msd_hippocampus": {"path": SHARED / "msd_hippocampus" / "Task04_Hippocampus", "id": 4,
                        "name": "Dataset004_Hippocampus", "ending": ".nii.gz", "channels": {"0": "MRI"},
                        "classes": ["background", "Anterior", "Posterior"], "binary": False,
                        "configuration": "3d_fullres", "seconds_per_iteration": 5.4,
                        "seconds_per_val_iteration": 1.3},
    "dsb2018": {"path": SHARED / "dsb2018", "id": 518, "name": "Dataset518_DSB2018", "ending": ".png",
                "channels": {"0": "R", "1": "G", "2": "B"}, "classes": ["background", "nucleus"], "binary": True,
                "configuration": "2d", "seconds_per_iteration": None, "seconds_per_val_iteration": None},
    "drive": {"path": SHARED / "drive", "id": 519, "name": "Dataset519_DRIVE", "ending": ".png",
              "channels": {"0": "R", "1": "G", "2": "B"}, "classes": ["background", "vessel"], "binary": False,
              "configuration": "2d", "seconds_per_iteration": None, "seconds_per_val_iteration": None},
    "isbi2012_em": {"path": SHARED / "isbi2012_em", "id": 520, "name": "Dataset520_ISBI2012", "ending": ".png",
                    "channels": {"0": "EM"}, "classes": ["background", "cell"], "binary": False,
                    "configuration": "2d", "seconds_per_iteration": None, "seconds_per_val_iteration": None,
                    "probabilities": True},  # its bar reads the challenge's pixel error from them
}
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


def split(dataset: dict) -> dict:
    """medseg's default split (seed 0), as its accuracy run made it: the cases nnU-Net may train and validate on,
    and the test cases it only predicts."""
    sys.path.insert(0, str(ROOT / "src"))
    from medseg.datasets import find_cases, split_dataset

    found = find_cases(dataset["path"])
    cases = found.cases
    parts = split_dataset(found)  # in blocks for serial sections (ISBI), as medseg's run splits them
    return {**parts, "files": {c.case_id: (str(c.images[0]), str(c.mask)) for c in cases},
            "cases": {c.case_id: c for c in cases}}


def write_raw(raw: Path, parts: dict, dataset: dict) -> None:
    """nnU-Net's raw layout: links to the shared volumes (read in place, never copied); 2D images as the PNG
    files nnU-Net reads (RGB, labels 0/1), converted by medseg's own readers."""
    folder, ending = raw / dataset["name"], dataset["ending"]
    shutil.rmtree(folder, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    place = _link if ending == ".nii.gz" else _png
    for case in parts["train"] + parts["val"]:
        image, mask = parts["files"][case]
        place(image, folder / "imagesTr" / f"{case}_0000{ending}", dataset)
        place(mask, folder / "labelsTr" / f"{case}{ending}", dataset, label=True)
    for case in parts["test"]:
        place(parts["files"][case][0], folder / "imagesTs" / f"{case}_0000{ending}", dataset)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": dataset["channels"], "labels": {n: i for i, n in enumerate(dataset["classes"])},
        "numTraining": len(parts["train"]) + len(parts["val"]), "file_ending": ending}, indent=2))


def _link(source: str, target: Path, dataset: dict, label: bool = False) -> None:
    os.symlink(source, target)


def _png(source: str, target: Path, dataset: dict, label: bool = False) -> None:
    import numpy as np
    from PIL import Image

    from medseg.io import read_image

    image = read_image(source)
    if label:
        Image.fromarray(_truth(image, dataset)).save(target)
    else:  # (C, H, W) as medseg reads it -> H x W x C (H x W for one channel), 8 bits
        channels = len(dataset["channels"])
        pixels = np.clip(image.array[:channels], 0, 255).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(target)


def _truth(mask, dataset: dict):
    """Class indices of a mask read by `medseg.io.read_image`, as medseg's evaluation reads them."""
    from medseg.datasets import labels_to_classes

    return labels_to_classes(mask.array, mask.path, binary=dataset["binary"])


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


def score(predictions: Path, parts: dict, dataset: dict) -> dict:
    """medseg's metrics on nnU-Net's test predictions, each case at its own grid, summarised as medseg does; with
    saved probabilities (ISBI 2012) also the challenge's pixel error, pooled over the test images."""
    import numpy as np

    from medseg.data import read_roi
    from medseg.evaluate import summarise
    from medseg.io import read_image
    from medseg.metrics import scored_metrics

    names = dataset["classes"]
    rows, pairs = [], []
    for case in parts["test"]:
        mask = read_image(parts["files"][case][1])
        truth = _truth(mask, dataset)
        pred = read_image(predictions / f"{case}{dataset['ending']}")
        roi = read_roi(parts["cases"][case], mask.spatial_shape)  # DRIVE's field of view, as medseg reads it
        scores = scored_metrics(pred.array[0].astype("uint8"), truth, names, roi=roi,
                                spacing=mask.spacing, boundary=True)
        rows += [{"case": case, "class": n, **m} for n, m in scores.items()]
        probabilities = predictions / f"{case}.npz"
        if probabilities.exists():  # (classes, 1, H, W) for a 2D image; class 1 is the cell (non-membrane)
            pairs.append((np.load(probabilities)["probabilities"][1].reshape(truth.shape), truth > 0))
    summary = summarise(rows, names[1:], f"test cases of {dataset['path'].name}", Path("nnunet"))
    if pairs:
        from accuracy import pooled_pixel_error  # the same pooling and thresholds as medseg's own row

        summary["challenge_pixel_error"], summary["challenge_threshold"] = pooled_pixel_error(pairs)
    return summary


def plan_length(minutes: float, seconds_per_iteration: float, seconds_per_val_iteration: float,
                fixed_seconds: float, max_epochs: int = 5, max_validation_share: float = 0.25) -> tuple[int, int]:
    """Epochs and iterations per epoch that fit the budget: up to 5 epochs (nnU-Net's poly schedule and checkpoint
    choice work per epoch) while its 50 validation iterations per epoch take at most a quarter of the budget (the
    hippocampus keeps 5; DSB's 12 x 256 x 320 validation batches would otherwise take half), then as many
    iterations as fit."""
    budget = minutes * 60 - fixed_seconds
    validation = 50 * seconds_per_val_iteration
    epochs = max(1, min(max_epochs, int(max_validation_share * budget / validation)))
    iterations = max(1, int((budget / epochs - validation) / seconds_per_iteration))
    return epochs, iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="msd_hippocampus")
    parser.add_argument("--configuration", help="nnU-Net configuration (default: the dataset's, above)")
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--seconds-per-iteration", type=float, help="default: the dataset's measured figure")
    parser.add_argument("--seconds-per-val-iteration", type=float)
    parser.add_argument("--fixed-seconds", type=float, default=240,
                        help="start-up and the final validation of the validation cases")
    parser.add_argument("--probe", action="store_true",
                        help="train one epoch of 20 iterations and print the timings to size the budget")
    parser.add_argument("--out", help="default: runs/nnunet/DATASET")
    args = parser.parse_args()
    dataset = DATASETS[args.dataset]
    configuration = args.configuration or dataset["configuration"]
    if not dataset["path"].exists():
        sys.exit(f"{dataset['path']} not found (the shared datasets live beside the repository)")
    python = venv_python()
    out = Path(args.out or ROOT / "runs" / "nnunet" / args.dataset)
    env = {**os.environ, "nnUNet_raw": str(out / "raw"), "nnUNet_preprocessed": str(out / "preprocessed"),
           "nnUNet_results": str(out / "results")}
    parts = split(dataset)
    write_raw(out / "raw", parts, dataset)
    ident = str(dataset["id"])
    preprocess = nnunet(python, "nnUNetv2_plan_and_preprocess", "-d", ident, "-c", configuration,
                        "-np", "2", "--verify_dataset_integrity", env=env)
    folds = [{"train": parts["train"], "val": parts["val"]}]
    (out / "preprocessed" / dataset["name"] / "splits_final.json").write_text(json.dumps(folds, indent=2))
    if args.probe:
        return probe(python, ident, configuration, out, env)
    per_iteration = args.seconds_per_iteration or dataset["seconds_per_iteration"]
    per_val_iteration = args.seconds_per_val_iteration or dataset["seconds_per_val_iteration"]
    if per_iteration is None or per_val_iteration is None:
        sys.exit(f"no iteration timings for {args.dataset}: run with --probe, then pass --seconds-per-iteration "
                 "and --seconds-per-val-iteration")
    epochs, iterations = plan_length(args.minutes, per_iteration, per_val_iteration, args.fixed_seconds)
    trainer = write_trainer(python, epochs, iterations)
    shutil.rmtree(out / "results", ignore_errors=True)
    train_seconds = nnunet(python, "nnUNetv2_train", ident, configuration, "0", "-tr", trainer,
                           "-device", "cpu", env=env)
    predictions = out / "test_predictions"
    shutil.rmtree(predictions, ignore_errors=True)
    probabilities = ["--save_probabilities"] if dataset.get("probabilities") else []
    predict_seconds = nnunet(python, "nnUNetv2_predict", "-i", str(out / "raw" / dataset["name"] / "imagesTs"),
                             "-o", str(predictions), "-d", ident, "-c", configuration, "-f", "0",
                             "-tr", trainer, "-device", "cpu", *probabilities, env=env)
    summary = score(predictions, parts, dataset)
    from accuracy import bar_for  # the accuracy table's bar, read from nnU-Net's predictions the same way

    _, measured, met = bar_for(args.dataset, summary)
    result = {"dataset": args.dataset, "configuration": configuration, "trainer": trainer,
              "epochs": epochs, "iterations_per_epoch": iterations, "budget_min": args.minutes,
              "seconds_per_iteration": per_iteration, "seconds_per_val_iteration": per_val_iteration,
              "preprocess_min": round(preprocess / 60, 1), "train_min": round(train_seconds / 60, 1),
              "predict_s_per_case": round(predict_seconds / len(parts["test"]), 2),
              "test_cases": len(parts["test"]), "train_cases": len(parts["train"]), "val_cases": len(parts["val"]),
              "dice": {k: [v["dice"]["mean"], v["dice"]["std"]] for k, v in summary["per_class"].items()},
              "iou": {k: [v["iou"]["mean"], v["iou"]["std"]] for k, v in summary["per_class"].items()},
              "hd95_mm": {k: [v["hd95"]["mean"], v["hd95"]["std"]] for k, v in summary["per_class"].items()},
              "mean_dice": summary["mean_dice"], "measured": measured, "met": met}
    print(json.dumps(result, indent=2))
    store = DOCS / "nnunet.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    results[f"{args.dataset}/{configuration}"] = result
    store.write_text(json.dumps(results, indent=2))
    write_docs(results)


def probe(python: Path, ident: str, configuration: str, out: Path, env: dict,
          iterations: int = 20, val_share: float = 0.25) -> None:
    """One epoch of `iterations` training and nnU-Net's 50 validation iterations, then its final validation:
    prints the seconds per training iteration (a validation iteration counted as `val_share` of one, as measured
    on the hippocampus: 1.3 s against 5.4 s) and the fixed seconds (start-up and final validation)."""
    trainer = write_trainer(python, 1, iterations)
    results = out / "probe_results"
    shutil.rmtree(results, ignore_errors=True)
    total = nnunet(python, "nnUNetv2_train", ident, configuration, "0", "-tr", trainer, "-device", "cpu",
                   env={**env, "nnUNet_results": str(results)})
    log = next(results.rglob("training_log_*.txt")).read_text()
    epoch = float(log.split("Epoch time: ")[1].split(" s")[0])
    per_iteration = epoch / (iterations + 50 * val_share)
    print(json.dumps({"epoch_s": epoch, "total_s": round(total, 1), "seconds_per_iteration": round(per_iteration, 2),
                      "seconds_per_val_iteration": round(per_iteration * val_share, 2),
                      "fixed_seconds": round(total - epoch)}, indent=2))


def write_docs(results: dict) -> None:
    """nnU-Net's rows beside medseg's default run on the same test cases (docs/benchmarks/accuracy.json)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from docs_section import write_section

    ours = json.loads((DOCS / "accuracy.json").read_text())["results"] if (DOCS / "accuracy.json").exists() else {}
    lines = ["Same training and validation cases (medseg's seed-0 split, given to nnU-Net as fold 0), same test "
             "cases (used for no choice by either), same wall-clock budget on this 2-core CPU, scored by medseg's "
             "metrics.", "",
             "| dataset | tool | configuration | budget (min) | trained (min) | epochs x iterations | test cases | "
             "Dice per class (mean ± sd) | IoU per class (mean ± sd) | HD95 (mm, or pixels for 2D images) | "
             "the accuracy table's bar: measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        name = key.split("/")[0]
        mine = ours.get(name)
        if mine:
            lines.append(f"| {name} | medseg (default) | {mine['plan']} | {mine['budget_min']:g} | "
                         f"{mine['train_min']} | - | {mine['test_cases']} | {_cells(mine['dice'])} | "
                         f"{_cells(mine.get('iou'))} | {_cells(mine['hd95'])} | {_verdict(mine)} |")
        lines.append(f"| {name} | nnU-Net v2 | {r['configuration']}, {r['trainer']} | {r['budget_min']:g} | "
                     f"{r['train_min']} | {r['epochs']} x {r['iterations_per_epoch']} | {r['test_cases']} | "
                     f"{_cells(r['dice'])} | {_cells(r.get('iou'))} | {_cells(r['hd95_mm'])} | {_verdict(r)} |")
    write_section("NNUNET", "benchmarks/nnunet.py", lines, "medseg beside nnU-Net v2 (benchmarks/nnunet.py)")


def _verdict(result: dict) -> str:
    if "measured" not in result:
        return "-"
    return f"{result['measured']} ({'met' if result['met'] else 'missed'})"


def _cells(per_class: dict | None) -> str:
    if not per_class:
        return "-"
    return "; ".join(f"{k} {m:.3f} ± {s:.3f}" for k, (m, s) in per_class.items())


if __name__ == "__main__":
    main()
