"""The hand-written recipes of the first sessions, one per shared dataset: fixed flags that the architecture,
transfer and GPU comparisons hold constant between their arms. The accuracy benchmark no longer uses them: it
trains what `medseg train DATA` plans (benchmarks/accuracy.py); docs/benchmarks.md keeps their measurements as
the evidence behind the planner's rules."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"

# One recipe per dataset: a CPU-sized U-Net at native resolution (2D crops for training, whole images for
# validation), Adam 1e-3 with a poly decay over the budget. The reasons for each choice are in docs/benchmarks.md.
RECIPES = {
    "isbi2012_em": {
        "data": SHARED / "isbi2012_em", "minutes": 15,
        "plan": "2D, native 512x512 (256 crops), width 16, depth 4, 90-degree rotations",
        "args": "--fit pad --size 256 --base-channels 16 --depth 4 --batch-size 8 --lr 1e-3 --lr-schedule poly "
                "--epochs 500 --steps-per-epoch 50 --patience 0 --rotate90 --class-names background,cell",
        "reference": "U-Net (Ronneberger 2015): pixel error 0.0611, Rand error 0.0382, warping error 0.000353 "
                     "(hidden test set)",
    },
    "drive": {
        "data": SHARED / "drive", "minutes": 30,
        "plan": "2D RGB, native 584x565 (128 crops, batch 16), per-image z-score, width 16, depth 4, "
                "90-degree rotations",
        "args": "--fit pad --size 128 --base-channels 16 --depth 4 --batch-size 16 --lr 1e-3 --lr-schedule poly "
                "--epochs 500 --steps-per-epoch 100 --patience 0 --rotate90 --normalization zscore",
        "reference": "U-Net baselines: F1 0.81-0.82, AUC 0.979 inside the FOV (DRIVE test set)",
    },
    "dsb2018": {
        "data": SHARED / "dsb2018", "minutes": 60,
        "plan": "2D RGB, nine native sizes (256 crops), per-image z-score, instance masks as foreground, width 16, "
                "depth 4",
        "args": "--binary-masks --class-names background,nucleus --fit pad --size 256 --base-channels 16 --depth 4 "
                "--batch-size 8 --lr 1e-3 --lr-schedule poly --epochs 500 --steps-per-epoch 50 --patience 0 "
                "--rotate90 --normalization zscore",
        "reference": "no standard semantic-IoU figure (the challenge scored instance mAP)",
    },
    "brats2015": {
        "data": SHARED / "brats2015", "minutes": 6,
        "plan": "2D axial slices resized to 128, FLAIR + T1c, regions WT/TC/ET (sigmoid), width 16",
        "args": "--regions brats --size 128 --base-channels 16 --depth 4 --batch-size 16 --lr 1e-3 "
                "--lr-schedule poly --epochs 500 --steps-per-epoch 50 --patience 0",
        "reference": "BraTS 2015 top methods: Dice about 0.85 / 0.70 / 0.65 (WT/TC/ET) on the challenge test set",
    },
    "msd_hippocampus": {
        "data": SHARED / "msd_hippocampus" / "Task04_Hippocampus", "minutes": 30,
        "plan": "two 2D networks averaged, on sagittal slices (padded to 64) and on coronal slices (padded to 48), "
                "z-score, width 16, depth 4, batch 16, mirrored only left-right (coronal) or not at all (sagittal), "
                "trained side by side on one thread each",
        # the sagittal network alone is the best single plane (0.886 / 0.871 against 0.881 / 0.856 axial, same
        # budget). 48x48 holds every coronal slice (at most 43x47) at about half the cost of a 64x64 step; sagittal
        # slices (up to 58x47) lost to 48x48 crops. The base flags are the coronal network's; each member appends
        # its own, and later flags win
        "args": "--fit pad --size 48 --base-channels 16 --depth 4 --batch-size 16 --lr 1e-3 --lr-schedule poly "
                "--epochs 500 --steps-per-epoch 2000 --patience 0 --normalization zscore --mirror-tta "
                "--axis 1 --flip-axes 0",
        "ensemble": {"sagittal": "--axis 0 --flip-axes none --size 64 --steps-per-epoch 1000", "coronal": ""},
        "reference": "nnU-Net: Dice 0.90 / 0.89 (5-fold CV, GPU-days)",
    },
}


def train_side_by_side(arg_lists: list[list[str]]) -> None:
    """`medseg train ARGS` for every argument list at once, one process each; stop if any of them fails."""
    import subprocess
    import sys

    running = [subprocess.Popen([sys.executable, "-m", "medseg.cli", "train", *a]) for a in arg_lists]
    if any(p.wait() for p in running):
        raise SystemExit("a training run failed")
