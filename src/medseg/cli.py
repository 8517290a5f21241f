"""The `medseg` command: a thin shell over the Python API. User errors print one line and exit with code 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from medseg.config import FITS, LOSSES, SCHEDULES, TrainConfig
from medseg.errors import MedsegError
from medseg.io import write_text_atomic
from medseg.onnx_engine import ENGINES

# Training options: (flag, type, help). Each maps onto the TrainConfig field of the same name.
DEFAULT_BUDGET_MINUTES = 30.0  # `medseg train DATA` without --time-budget: what the accuracy bars are measured at

# How data is read: every command that reads a labelled dataset takes these (train, plan, evaluate --data,
# benchmark-architectures).
DATA_OPTIONS = [
    ("--images", str, "image folder inside DATA (overrides detection)"),
    ("--masks", str, "mask folder inside DATA (overrides detection)"),
    ("--binary-masks", bool, "treat every non-zero mask value as foreground (instance masks)"),
    ("--mask-threshold", float, "foreground where the mask value is at least this (masks saved as grey levels; "
                                "default: such masks are thresholded at half their range, said once)"),
    ("--mask-levels", "levels", "the grey levels that code classes 0, 1, 2, ... in the masks, e.g. 0,85,170,255 "
                                "(default: found in the masks when they hold k equally spaced levels, said once)"),
    ("--npy-layout", str, "how a 3D .npy is read: volume (X, Y, Z; the default), hwc or chw (a 2D image with "
                          "channels last or first)"),
    ("--allow-unmatched", bool, "use the matched cases even when more than 10%% of the files have no partner (an "
                                "image without a mask, a mask without an image); they are listed either way"),
]
TRAIN_OPTIONS = DATA_OPTIONS + [
    ("--color", str, "keep RGB channels (keep) or convert to luminance (gray)"),
    ("--class-names", "list", "comma-separated class names, background first"),
    ("--regions", str, "train on label sets with a sigmoid each: 'brats' (whole tumour, tumour core, enhancing) "
                       "or 'NAME=1,2,3;NAME=1,3'"),
    ("--dims", int, "2: train on slices (default); 3: train a 3D U-Net on patches of whole volumes"),
    ("--axis", int, "volumes are cut into 2D slices along this axis (default: last)"),
    ("--context", int, "2D on volumes: neighbouring slices on each side as extra channels (2.5D; default 0)"),
    ("--size", int, "slice size for training (default 128)"),
    ("--normalization", str, "intensities: percentile (seed), zscore (MRI), ct (needs a plan), unit ([0, 1])"),
    ("--fit", str, f"how slices reach that size: {' or '.join(FITS)}"),
    ("--orientation", str, "voxel order the network works in, e.g. RAS; volumes stored otherwise are reoriented "
                           "(default: the first training volume's)"),
    ("--patch", "intlist", "training sample, e.g. 40,56,40 (3D) or 64,48 (2D, not with --rotate90); default: "
                           "size on every side"),
    ("--foreground-fraction", float, "share of each batch centred on a voxel of a class drawn uniformly among the "
     "case's classes, 2D and 3D (default 0.33)"),
    ("--overlap", float, "3D: sliding-window overlap at inference (default 0.5)"),
    ("--mirror-tta", bool, "average predictions over mirrored inputs"),
    ("--model", str, "network: unet (default), attention_unet, resenc_unet, deeplabv3plus, segnet, fcn "
                     "(see 'medseg models')"),
    ("--base-channels", int, "width of the first level (seed: 64)"),
    ("--depth", int, "number of poolings (seed: 4)"),
    ("--dropout", float, "dropout in the bottleneck"),
    ("--norm", str, "batch (seed) or instance (nnU-Net)"),
    ("--activation", str, "relu (seed) or leaky_relu (nnU-Net)"),
    ("--optimizer", str, "adam (seed) or sgd (Nesterov momentum 0.99)"),
    ("--deep-supervision", bool, "add losses on the coarser decoder levels (nnU-Net)"),
    ("--loss", str, f"one of {', '.join(LOSSES)}"),
    ("--border-weight", float, "weigh the cross-entropy up to 1 + W where objects come close (U-Net's weight map)"),
    ("--lr", float, "Adam learning rate (seed: 1e-4)"),
    ("--lr-schedule", str, f"one of {', '.join(SCHEDULES)}"),
    ("--weight-decay", float, "Adam weight decay"),
    ("--batch-size", int, "batch size (seed: 16)"),
    ("--epochs", int, "maximum epochs (seed: 20)"),
    ("--steps-per-epoch", int, "batches per epoch (default: one pass, at least 50)"),
    ("--patience", int, "early stopping patience in epochs; 0 = off"),
    ("--no-augment", bool, "switch augmentation off"),
    ("--flip-axes", "intlist", "mirror training samples only along these axes (2D: 0 rows, 1 columns), "
                               "'none' for no mirroring (default: every axis)"),
    ("--rotate90", bool, "also rotate training samples by multiples of 90 degrees (data with no up, e.g. EM)"),
    ("--affine-p", float, "2D: share of training samples given a random rotation and scaling (default 0.3)"),
    ("--max-rotation", float, "2D: largest random rotation in degrees, either way (default 15)"),
    ("--max-scale", float, "2D: largest random scaling, 1 +- this (default 0.15)"),
    ("--elastic-p", float, "2D: share of training samples bent by a smooth elastic deformation (default 0)"),
    ("--init-from", str, "start from the weights of this run (or .pt) that match by name and shape"),
    ("--freeze-encoder-epochs", int, "hold the encoder still for this many first epochs (with --init-from)"),
    ("--test-fraction", float, "share of cases held out as test cases, used for no choice and reported by "
                               "'medseg evaluate' (default 0.2; 0 when you keep a test set of your own)"),
    ("--val-fraction", float, "share of the other cases for validation: checkpoint, early stopping, "
                              "post-processing (default 0.2)"),
    ("--train-fraction", float, "train on this share of the training cases, same validation (default 1)"),
    ("--folds", int, "k-fold cross-validation: number of folds"),
    ("--fold", int, "k-fold cross-validation: which fold validates"),
    ("--seed", int, "random seed (the split, and the rest unless --init-seed is given)"),
    ("--init-seed", int, "seed of the initial weights and of the training samples' order and augmentation only: "
                         "the split stays --seed's"),
    ("--precision", str, "auto (default: bf16 autocast on GPUs that support it, fp16 on older ones, fp32 on CPUs), "
                         "fp32, bf16 or fp16 (GPU only)"),
    ("--compile", str, "auto (default: torch.compile the training step of time-budgeted CPU runs of 10 min or "
                       "more: a quarter to a third more steps measured here), on or off"),
    ("--cache", str, "memory (cases held in RAM), disk (preprocessed once into $MEDSEG_CACHE, default ~/.cache/medseg, "
                     "and read per batch: datasets larger than memory) or auto (default: disk when the image files "
                     "exceed a tenth of the memory)"),
    ("--time-budget", float, "minutes; turned into a number of steps by timing a few at the start (written to "
                             "config.json, so a re-run repeats them)"),
    ("--steps", int, "total optimiser steps (the schedule runs on them; overrides --time-budget)"),
    ("--device", str, "auto, cpu, cuda, cuda:N or mps"),
    ("--threads", int, "CPU threads for PyTorch"),
    ("--tensorboard", str, "also write TensorBoard scalars under DIR/<run name> (needs tensorboard)"),
    ("--mlflow", str, "also log to this MLflow tracking URI, e.g. sqlite:///mlflow.db (needs mlflow)"),
]


def _add_train_options(parser: argparse.ArgumentParser, options: list = TRAIN_OPTIONS) -> None:
    for flag, kind, text in options:
        dest = flag[2:].replace("-", "_")
        if kind is bool:
            parser.add_argument(flag, dest=dest, action="store_true", default=None, help=text)
        elif kind == "levels":
            parser.add_argument(flag, dest=dest, type=_levels, default=None, help=text)
        else:
            parser.add_argument(flag, dest=dest, type=str if kind in ("list", "intlist") else kind, default=None,
                                help=text)


def _levels(value: str) -> list[int]:
    try:
        levels = [int(v) for v in value.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value}: give the grey levels as whole numbers, e.g. 0,85,170,255") from exc
    if levels != sorted(set(levels)) or len(levels) < 2:
        raise argparse.ArgumentTypeError(f"{value}: give two or more levels in increasing order, class 0's first")
    return levels


def _explicit_settings(args: argparse.Namespace) -> dict:
    """TrainConfig fields the user set with a flag (parsed), and nothing else: they override any plan."""
    names = {f.name for f in fields(TrainConfig)}
    settings = {}
    for key, value in vars(args).items():
        if value is None:
            continue
        if key == "no_augment":
            settings["augment"] = False
        elif key == "regions":
            from medseg.regions import parse_regions

            settings["regions"] = parse_regions(value)
        elif key == "class_names":
            settings["class_names"] = [n.strip() for n in value.split(",")]
        elif key == "flip_axes":
            try:
                settings["flip_axes"] = [] if value.strip().lower() == "none" else [int(v) for v in value.split(",")]
            except ValueError as exc:
                raise MedsegError(f"--flip-axes {value}: give axes like 0 or 0,1, or none") from exc
        elif key == "patch":
            try:
                settings["patch"] = [int(v) for v in value.split(",")]
            except ValueError as exc:
                raise MedsegError(f"--patch {value}: give whole numbers separated by commas, e.g. 40,56,40") from exc
        elif key in names and key not in ("data", "out"):
            settings[key] = value
    return settings


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The seed's recipe (or a saved config, or a plan's single configuration) with the user's flags on top."""
    if args.config and args.plan:
        raise MedsegError("give --config or --plan, not both")
    if args.plan:
        from medseg.plan import config_from_plan

        cfg = config_from_plan(args.plan, args.configuration)
    else:
        cfg = TrainConfig.load(args.config) if args.config else TrainConfig()
    if args.data:
        cfg.data = args.data
    if args.out:
        cfg.out = args.out
    if not cfg.data:
        raise MedsegError("no dataset given; use 'medseg train DATA --out RUN' or --config RUN/config.json")
    cfg.override(_explicit_settings(args))
    cfg.progress = not args.quiet
    return cfg


def _planned_members(args: argparse.Namespace) -> tuple[dict[str, TrainConfig], dict]:
    """`medseg train DATA` with no recipe: fingerprint and plan the data here (or read --plan), then each
    network's settings with the user's flags on top; returns them and the plan."""
    from medseg.autotrain import configs_from_plan, planned_members
    from medseg.plan import read_plan

    explicit = _explicit_settings(args)
    if args.plan:
        plan = read_plan(args.plan)
        return configs_from_plan(plan, args.configuration, args.data, explicit, not args.quiet, args.plan), plan
    if not args.data:
        raise MedsegError("no dataset given; use 'medseg train DATA --out RUN'")
    budget = explicit.setdefault("time_budget", DEFAULT_BUDGET_MINUTES)
    return planned_members(args.data, budget, explicit, progress=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description="Medical image segmentation with U-Nets.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="phantoms -> trained U-Net -> metrics and figures, in under 3 minutes")
    demo.add_argument("--out", default="medseg-demo", help="folder for the demo's data and run")

    synth = sub.add_parser("synth", help="write a seeded phantom or CT-like dataset in the MSD layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--kind", default="phantoms", choices=("phantoms", "ct"),
                       help="phantoms (default), or ct: 512x512 CT-like volumes in HU from two sites' spacings, an "
                            "organ with small hypodense lesions (some cases none) and look-alike structures")
    synth.add_argument("--dim", type=int, default=2, choices=(2, 3))
    synth.add_argument("--cases", type=int, default=None, help="cases (default 100 phantoms, 50 CT)")
    synth.add_argument("--size", type=int, default=None, help="pixels per side (default 64 phantoms, 512 CT)")
    synth.add_argument("--classes", type=int, default=2, help="structures per phantom family, 1 to 3")
    synth.add_argument("--seed", type=int, default=0)

    train = sub.add_parser("train", help="train a U-Net on DATA (a folder or CSV manifest)")
    _voxel_limit(train)
    train.add_argument("data", nargs="?", help="dataset folder or CSV manifest")
    train.add_argument("--out", help="run folder to create")
    train.add_argument("--config", help="re-run from a saved RUN/config.json (flags override it)")
    train.add_argument("--recipe", choices=("auto", "seed"), default="auto",
                       help="auto (default): fingerprint the data and train what the plan chooses (printed, and "
                            "kept as RUN/plan.json); seed: the seed's recipe (128x128 resized slices, U-Net 64..1024, "
                            "Adam 1e-4, batch 16, 20 epochs). Every flag overrides either")
    train.add_argument("--plan", help="train with a configuration of a plan.json from 'medseg plan'")
    train.add_argument("--configuration", help="which configuration of the plan (default: the plan's default)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    train.add_argument("--resume", metavar="RUN",
                       help="continue a stopped run (or ensemble) from its last completed epoch, as configured")
    train.add_argument("--all-folds", action="store_true", help="with --folds K: train every fold into OUT/fold_i")
    train.add_argument("--nproc", type=int, default=1,
                       help="train one network on N processes of this machine (DistributedDataParallel under "
                            "torchrun: gloo on CPU, NCCL on GPUs); --batch-size stays the global batch")
    _add_train_options(train)

    bench = sub.add_parser("benchmark-architectures",
                           help="train every network on DATA under one split and time budget, then compare them")
    bench.add_argument("data", help="dataset folder or CSV manifest")
    bench.add_argument("--models", default="unet,attention_unet,resenc_unet,deeplabv3plus,segnet,fcn",
                       help="comma-separated model names (default: all); the first is the reference")
    bench.add_argument("--budget", type=float, default=5.0, help="training minutes per model (default 5)")
    bench.add_argument("--out", default="runs/architectures", help="folder for the runs and the comparison")
    bench.add_argument("--overwrite", action="store_true", help="replace existing run folders")
    bench.set_defaults(config=None, plan=None, configuration=None)
    _add_train_options(bench)

    plan = sub.add_parser("plan", help="fingerprint a dataset and write a readable training plan (JSON)")
    _voxel_limit(plan)
    plan.add_argument("data", help="dataset folder or CSV manifest")
    plan.add_argument("--out", default="plan.json", help="where to write the plan (default: plan.json)")
    plan.add_argument("--budget", type=float, default=15.0, help="training minutes the plan is sized for")
    plan.add_argument("--device", default="auto", help="device to calibrate on (auto, cpu, cuda, mps)")
    plan.add_argument("--no-calibrate", action="store_true", help="skip timing; use width 16")
    plan.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    plan.add_argument("--seed", type=int, default=0, help="the split seed of the runs this plan is for: their test "
                      "cases are held out and never read (default 0, as medseg train)")
    plan.add_argument("--test-fraction", type=float, default=0.2, help="their share of test cases (default 0.2)")
    _add_train_options(plan, DATA_OPTIONS)

    models = sub.add_parser("models", help="list the networks with parameters and FLOPs at an input size")
    models.add_argument("--size", type=int, default=128, help="input side in pixels/voxels (default 128)")
    models.add_argument("--dims", type=int, default=2, choices=(2, 3))
    models.add_argument("--in-channels", type=int, default=1)
    models.add_argument("--classes", type=int, default=2, help="output classes, background included")
    models.add_argument("--base-channels", type=int, default=16)
    models.add_argument("--depth", type=int, default=4)

    compare = sub.add_parser("compare", help="evaluated runs side by side: Dice with CI, paired test, costs")
    compare.add_argument("runs", nargs="+", help="two or more evaluated run folders; the first is the reference")
    compare.add_argument("--out", help="also write the table to this Markdown file")

    ensemble = sub.add_parser("ensemble", help="average several trained runs (e.g. sagittal and coronal 2D networks)")
    ensemble.add_argument("runs", nargs="+", help="two or more run folders with the same classes and inputs")
    ensemble.add_argument("--out", required=True, help="folder for ensemble.json; predict and evaluate take it as RUN")

    download = sub.add_parser("download", help="fetch a Medical Segmentation Decathlon task (resumable, verified)")
    download.add_argument("task", help="e.g. Task04_Hippocampus, Task04, 4 or hippocampus")
    download.add_argument("--out", default="data", help="folder to unpack into (default: data)")
    download.add_argument("--url", help="base URL of a mirror holding TASK.tar")

    evaluate = sub.add_parser("evaluate", help="metrics per case and class, summary and figures")
    _voxel_limit(evaluate)
    evaluate.add_argument("run")
    evaluate.add_argument("--data", help="labelled dataset to evaluate on; cases the run trained or selected on are "
                                         "marked and left out of the means (default: the run's test cases)")
    evaluate.add_argument("--cases", default="test", choices=("test", "val"),
                          help="test (default): cases used for no choice; val: the validation cases the checkpoint "
                               "and post-processing were chosen on (labelled as selection cases; optimistic)")
    _add_train_options(evaluate, DATA_OPTIONS)
    evaluate.add_argument("--out", help="output folder (default: RUN/evaluation)")
    evaluate.add_argument("--figures", type=int, default=4, help="number of case panels to draw")
    evaluate.add_argument("--groups", help="CSV of case id -> attributes (site, scanner, sex, ...): metrics per group")
    evaluate.add_argument("--lesion-metrics", action="store_true", help="lesion-wise detection (F1, Dice per "
                          "lesion, detection by size) for every class, not only those the run marked lesion-like")
    evaluate.add_argument("--cldice", action="store_true", help="clDice for every class, not only tubular ones")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--threads", type=int, help="CPU threads for PyTorch")

    report = sub.add_parser("report", help="one self-contained HTML page (and a Markdown twin) about a run")
    report.add_argument("run")
    report.add_argument("--out", help="HTML file to write (default: RUN/report.html; the .md beside it)")
    report.add_argument("--device", default="auto")
    report.add_argument("--threads", type=int, help="CPU threads for PyTorch")

    predict = sub.add_parser("predict", help="write masks for new images or volumes")
    _voxel_limit(predict)
    predict.add_argument("run")
    predict.add_argument("inputs", nargs="+", help="files or folders")
    predict.add_argument("--out", required=True)
    predict.add_argument("--overlay", action="store_true", help="also write overlay PNGs to OUT/overlays")
    predict.add_argument("--series", help="DICOM series UID or description, where a folder holds several")
    predict.add_argument("--overwrite", action="store_true", help="replace masks already in --out")
    predict.add_argument("--format", default="auto", choices=("auto", "nifti", "png", "npz", "dicom-seg"),
                         help="auto (default): the input's own format (NIfTI for DICOM series); nifti (volumes); "
                              "png (2D); npz: the probabilities; dicom-seg: a DICOM Segmentation referencing the "
                              "input series")
    predict.add_argument("--uncertainty", action="store_true",
                         help="also write NAME_uncertainty (.nii.gz or .png): the entropy of the mean probability, "
                              "0 certain to 1 undecided")
    predict.add_argument("--workers", type=int, default=1,
                         help="predict in N processes sharing the cores (default 1)")
    predict.add_argument("--shard", metavar="I/N",
                         help="predict only the I-th of N deterministic shares of the inputs (0 <= I < N), for "
                              "arrays of jobs on several machines")
    predict.add_argument("--engine", default="auto", choices=ENGINES,
                         help="auto (default): PyTorch, and on a CPU an input shape is compiled with frozen weights "
                              "once its eager work reaches 75 s, or at once where a volume's windows alone would "
                              "take that long (large volumes, many images of one size); torch: always eager; "
                              "onnxruntime: as ONNX (a package exported with --onnx carries them; otherwise "
                              "exported on the spot); compiled: torch.compile from the first input (about 40 s "
                              "once per input shape with a cold cache here, then 0.5-0.7 of the eager time)")

    serve = sub.add_parser("serve", help="a web page (and REST API) that segments uploads and shows the masks")
    _voxel_limit(serve)
    serve.add_argument("run", help="a run, ensemble or model package")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="auto")
    serve.add_argument("--token", default=os.environ.get("MEDSEG_TOKEN"),
                       help="require 'Authorization: Bearer TOKEN' for every API call, results included (default: the "
                            "MEDSEG_TOKEN environment variable, which keeps it out of the process list); needed, "
                            "of at least 22 characters, to listen beyond 127.0.0.1")
    serve.add_argument("--allowed-host", action="append", default=[],
                       help="a name browsers reach this server by (a reverse proxy's, a DNS name); repeatable. "
                            "Requests for other hosts get 400 (DNS rebinding)")
    serve.add_argument("--audit-log", default=os.environ.get("MEDSEG_AUDIT_LOG"),
                       help="append one JSON line per API call and per job (time, client, token hash, job id, "
                            "action, outcome, sizes, durations; never names, UIDs or pixels) to this file "
                            "(default: the MEDSEG_AUDIT_LOG environment variable, else none)")
    serve.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM, chain included)")
    serve.add_argument("--tls-key", help="the certificate's private key (PEM)")
    serve.add_argument("--max-upload-mb", type=float, default=1024.0, help="larger uploads get 413 (default 1024)")
    serve.add_argument("--max-queued", type=int, default=8, help="jobs waiting at once; more get 429 (default 8)")
    serve.add_argument("--max-uploads", type=int, default=4, help="uploads arriving at once; more get 429 (default 4)")
    serve.add_argument("--uploads-per-minute", type=float, default=120.0,
                       help="per client address, in bursts of up to 20; more get 429 with Retry-After (default 120)")
    serve.add_argument("--job-memory-mb", type=float, default=8192.0,
                       help="a job's process may grow this far beyond the loaded model (default 8192); past it the "
                            "job fails in one line and the server carries on")
    serve.add_argument("--job-minutes", type=float, default=30.0,
                       help="a job running longer is stopped and reported failed (default 30)")
    serve.add_argument("--max-disk-mb", type=float, default=None,
                       help="uploads in progress on disk at once; more get 507 (default: twice --max-upload-mb)")
    serve.add_argument("--keep-minutes", type=float, default=60.0,
                       help="a finished job's results are deleted after this (default 60)")

    pacs = sub.add_parser("pacs", help="pull a series from a DICOMweb server, segment it, store the DICOM SEG back")
    _voxel_limit(pacs)
    pacs.add_argument("run", help="a run, ensemble or model package")
    pacs.add_argument("--url", required=True, help="the DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    pacs.add_argument("--study", required=True, help="StudyInstanceUID")
    pacs.add_argument("--series", help="SeriesInstanceUID or description (needed where the study has several)")
    pacs.add_argument("--out", help="keep the SEG in this folder")
    pacs.add_argument("--store", action="store_true",
                      help="store the SEG into the study on the server (marked as an unvalidated research model's)")
    pacs.add_argument("--credentials", help="a file holding user:password or token:TOKEN (else the environment: "
                                            "MEDSEG_PACS_TOKEN, or MEDSEG_PACS_USER and MEDSEG_PACS_PASSWORD)")
    pacs.add_argument("--ca-bundle", help="check the server's TLS certificate against these CA certificates (PEM)")
    pacs.add_argument("--client-cert", help="present this client certificate (PEM) to the server")
    pacs.add_argument("--client-key", help="the client certificate's private key (PEM)")
    pacs.add_argument("--device", default="auto")

    export = sub.add_parser("export", help="write a model package: weights, settings, metrics and a model card")
    export.add_argument("run", help="a run, ensemble or cross-validation folder")
    export.add_argument("--out", required=True, help="the package: NAME.zip (one file) or a folder")
    export.add_argument("--onnx", action="store_true", help="also put each network in as ONNX (for --engine "
                                                            "onnxruntime, or any ONNX runtime)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing package")
    export.add_argument("--sign", metavar="KEY", help="sign the package's manifest with this Ed25519 private key "
                                                      "(PEM; 'medseg keygen' makes one)")
    keygen = sub.add_parser("keygen", help="make an Ed25519 key pair to sign model packages (PATH and PATH.pub)")
    keygen.add_argument("path", help="where the private key goes (mode 0600); the public key goes to PATH.pub")
    for reader in (predict, evaluate, serve, pacs):
        reader.add_argument("--trust", metavar="PUBKEY", help="use only model packages signed with this Ed25519 "
                                                              "public key (default: MEDSEG_TRUST_KEY)")
    predict.add_argument("--strict", action="store_true",
                         help="stop at the first input that cannot be segmented (default: write every good one, "
                              "then list the broken ones and exit 2)")
    predict.add_argument("--device", default="auto")
    predict.add_argument("--threads", type=int, help="CPU threads for the networks (PyTorch or onnxruntime)")

    for p in (demo, train, evaluate, predict, download, report, bench):
        p.add_argument("--quiet", action="store_true",
                       help="no progress bars (epoch lines, a line every 5 minutes inside a long epoch, and results "
                            "still print)")
    return parser


def _data_options(args: argparse.Namespace) -> dict:
    return {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"), None) for flag, _, _ in DATA_OPTIONS}


def _train_command(args: argparse.Namespace) -> None:
    from medseg import distributed
    from medseg.train import train, train_folds

    if args.nproc > 1 and distributed.world_size() == 1:
        return _launch_processes(args)
    if distributed.world_size() > 1 and (args.all_folds or not _network_given(args)):
        raise MedsegError("several processes train one configured network: plan first ('medseg plan DATA --out "
                          "plan.json', then --plan plan.json), or use --config or --recipe seed ('medseg train DATA "
                          "--nproc N' does the planning for you)")
    if args.resume:
        from medseg.autotrain import resume

        given = [flag for flag, value in (("DATA", args.data), ("--out", args.out), ("--config", args.config),
                                          ("--plan", args.plan), ("--overwrite", args.overwrite)) if value]
        if given:
            raise MedsegError(f"--resume continues RUN exactly as it was configured; drop {', '.join(given)}")
        runs = [resume(args.resume, progress=not args.quiet)]
    elif args.config or args.recipe == "seed" or (args.plan and _single_configuration(args)):
        cfg = _config_from_args(args).validate()
        runs = train_folds(cfg, args.overwrite) if args.all_folds else [train(cfg, overwrite=args.overwrite)]
    else:
        from medseg.autotrain import train_members

        members, plan = _planned_members(args)
        if args.all_folds and len(members) > 1:
            raise MedsegError(f"--all-folds trains one network per fold, and the plan is an ensemble of "
                              f"{', '.join(members)}: add --recipe seed, or train the folds of one member with --plan")
        if args.all_folds:
            (cfg,) = members.values()
            cfg.out = args.out or cfg.out
            runs = train_folds(cfg.validate(), args.overwrite)
        else:
            runs = [train_members(members, args.out or next(iter(members.values())).out, plan, args.overwrite)]
    if not distributed.is_main():
        return  # rank 0 reports
    for run in runs:
        for member in sorted(run.glob("*/train_summary.json")) or [run / "train_summary.json"]:
            summary = json.loads(member.read_text())
            if "full_validation_dice" in summary:  # epochs were scored on samples: their average chose
                print(f"validation Dice {summary['full_validation_dice']:.4f} (every validation case, at the end) "
                      f"with the checkpoint of epoch {summary['best_epoch']}, chosen on validation samples "
                      f"({summary['stopped']}); run: {member.parent}")
            else:
                print(f"best validation Dice {summary['best_val_dice']:.4f} at epoch {summary['best_epoch']} "
                      f"({summary['stopped']}); run: {member.parent}")
        if (run / "ensemble.json").exists():
            print(f"ensemble: {run}")
        print(f"validation Dice chose the checkpoint (optimistic); 'medseg evaluate {run}' scores the test cases")


def _launch_processes(args: argparse.Namespace) -> None:
    """`medseg train ... --nproc N`: plan here where the plan is medseg's to make (once, not once per process),
    then run the same command on N processes under torchrun with the plan's one network."""
    import tempfile

    from medseg import distributed

    argv = _without_nproc(args.argv)
    if args.all_folds:
        raise MedsegError("--nproc trains one network; train the folds one after another instead of --all-folds")
    plan_file = None
    if not _network_given(args):
        members, plan = _planned_members(args)
        if len(members) > 1:
            raise MedsegError(f"the plan is an ensemble of {', '.join(members)}, trained side by side on the cores "
                              "already; --nproc trains one network (add --recipe seed, or --plan with one member)")
        handle, plan_file = tempfile.mkstemp(prefix="medseg-plan-", suffix=".json")
        with open(handle, "w") as stream:
            json.dump(plan, stream)
        argv += ["--plan", plan_file]
    try:
        code = distributed.launch(argv, args.nproc)
    finally:
        if plan_file:
            Path(plan_file).unlink(missing_ok=True)
    if code != 0:
        raise MedsegError(f"training on {args.nproc} processes failed (exit code {code}); see the lines above")
    if plan_file:  # kept beside the run, as a run trained in one process keeps its plan
        run = Path(args.out or next(iter(members.values())).out)
        write_text_atomic(run / "plan.json", json.dumps(plan, indent=2))


def _network_given(args: argparse.Namespace) -> bool:
    """Whether the command names its network (a config, the seed recipe, a plan, a run to resume) rather than
    asking medseg to plan one: planning times the machine, so it happens once, never once per process."""
    return bool(args.config or args.recipe == "seed" or args.plan or args.resume)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out


def _single_configuration(args: argparse.Namespace) -> bool:
    from medseg.plan import plan_members, read_plan

    return len(plan_members(read_plan(args.plan), args.configuration, args.plan)) == 1


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as exc:
        raise MedsegError(f"--shard {text}: write it as I/N, e.g. 0/4") from exc
    if not 0 <= index < count:
        raise MedsegError(f"--shard {text}: need 0 <= I < N")
    return index, count


def _has_torch() -> bool:
    """Whether PyTorch is installed (a model package with ONNX networks predicts without it)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _voxel_limit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-voxels", type=int, default=None,
                        help="refuse images whose header declares more voxels x channels than this, before reading "
                             "them (default 2^31: a 1024x1024x2000 CT passes; env MEDSEG_MAX_VOXELS)")


def run_command(args: argparse.Namespace) -> None:
    from medseg.limits import set_max_voxels

    set_max_voxels(getattr(args, "max_voxels", None))
    if getattr(args, "trust", None):  # read where packages are opened, in this process and the ones it starts
        from medseg.signing import TRUST_ENV, trusted_key

        trusted_key(args.trust)  # a bad key file is refused before any work
        os.environ[TRUST_ENV] = str(Path(args.trust).resolve())
    if getattr(args, "threads", None) and args.command != "train" and _has_torch():
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "demo":
        from medseg.demo import run_demo

        summary = run_demo(args.out, progress=not args.quiet)
        print(f"Dice {summary['mean_dice']:.3f} on {summary['cases_role']}; {summary['seconds']:.0f} s in all")
        print(f"results: {Path(summary['run']).resolve()}")
    elif args.command == "synth" and args.kind == "ct":
        from medseg.synth_ct import write_ct_dataset

        workers = min(8, os.cpu_count() or 1)  # each case is drawn from its own seed: the same files either way
        print(write_ct_dataset(args.out, args.cases or 50, args.size or 512, args.seed, workers))
    elif args.command == "synth":
        from medseg.synth import write_synthetic_dataset

        print(write_synthetic_dataset(args.out, args.cases or 100, args.dim, args.size or 64, args.classes,
                                      args.seed))
    elif args.command == "train":
        _train_command(args)
    elif args.command == "plan":
        from medseg.checkpoint import resolve_device
        from medseg.plan import make_plan

        device = str(resolve_device(args.device))
        result = make_plan(args.data, args.budget, device, calibrate=not args.no_calibrate,
                           data_options=_data_options(args), seed=args.seed, test_fraction=args.test_fraction)
        write_text_atomic(args.out, json.dumps(result, indent=2))
        print(f"configurations {', '.join(result['configurations'])} (default {result['default']}); plan: {args.out}")
    elif args.command == "models":
        from medseg.models import describe_models

        rows = describe_models(args.size, args.dims, args.in_channels, args.classes, args.base_channels, args.depth)
        shape = "x".join([str(args.size)] * args.dims)
        print(f"{'name':<16}{'parameters':>12}{'GFLOPs':>10}  (forward, one {shape} input, width "
              f"{args.base_channels}, depth {args.depth})")
        for row in rows:
            print(f"{row['name']:<16}{row['parameters']:>12,}{row['gflops']:>10.2f}  {row['description']}")
    elif args.command == "benchmark-architectures":
        from medseg.architectures import benchmark_architectures
        from medseg.compare import comparison_table

        if args.model or args.time_budget:
            raise MedsegError("benchmark-architectures takes --models and --budget (not --model, --time-budget)")
        cfg = _config_from_args(args)
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        rows = benchmark_architectures(cfg, models, args.budget, args.out, args.overwrite)
        print(comparison_table(rows), end="")
        print(f"comparison: {(Path(args.out) / 'comparison.md').resolve()}")
    elif args.command == "compare":
        from medseg.compare import compare_runs, comparison_table

        table = comparison_table(compare_runs(args.runs))
        print(table, end="")
        if args.out:
            write_text_atomic(args.out, table)
    elif args.command == "ensemble":
        from medseg.ensemble import create_ensemble

        out = create_ensemble(args.runs, args.out)
        print(f"ensemble of {len(args.runs)} runs: {out.resolve()} (medseg predict/evaluate {args.out})")
    elif args.command == "download":
        from medseg.download import MSD_URL, download_task

        print(download_task(args.task, args.out, args.url or MSD_URL, progress=not args.quiet))
    elif args.command == "report":
        from medseg.report import write_report

        page, markdown = write_report(args.run, args.out, args.device, not args.quiet)
        print(f"report: {page.resolve()} (Markdown: {markdown.resolve()})")
    elif args.command == "evaluate":
        from medseg.evaluate import evaluate_run

        if not args.data and any(v is not None for v in _data_options(args).values()):
            raise MedsegError("--images, --masks and the mask flags describe --data; the run's own cases are read as "
                              "it read them")
        summary = evaluate_run(args.run, args.data, args.out, args.figures, args.device, not args.quiet, args.groups,
                               args.cases, _data_options(args), args.lesion_metrics, args.cldice)
        print(f"mean foreground Dice {summary['mean_dice']:.4f} on {summary['cases_role']}; "
              f"results: {Path(args.out) if args.out else Path(args.run) / 'evaluation'}")
        for name, lesions in summary.get("lesions", {}).items():
            print(f"{name}: lesion F1 {lesions['f1']:.4f} ({lesions['tp']} found, {lesions['fn']} missed, "
                  f"{lesions['fp']} false alarms)")
    elif args.command == "serve":
        from medseg.serve import Limits, serve

        serve(args.run, args.host, args.port, args.device,
              Limits(args.token, args.max_upload_mb, args.max_queued, args.keep_minutes, args.max_uploads,
                     args.uploads_per_minute, args.max_disk_mb, args.job_memory_mb, args.job_minutes),
              tuple(args.allowed_host), args.tls_cert, args.tls_key, args.audit_log)
    elif args.command == "pacs":
        from medseg.pacs import segment_from_pacs

        from medseg.pacs import credentials

        stored = segment_from_pacs(args.run, args.url, args.study, args.series, args.out, args.device, args.store,
                                   credentials(args.credentials), args.ca_bundle, args.client_cert, args.client_key)
        where = f"stored SEG {stored['seg_instance']} in study {stored['study']}" if stored["stored"] else \
            f"SEG {stored['seg_instance']} not stored (no --store)"
        print(f"segmented series {stored['series']} ({stored['slices']} slices); {where}"
              + (f"; local copy: {stored['local']}" if stored["local"] else ""))
    elif args.command == "export":
        from medseg.package import export_package

        out = export_package(args.run, args.out, args.onnx, args.overwrite, args.sign)
        print(f"package: {out} (model card inside: model_card.md{'; signed' if args.sign else ''})")
    elif args.command == "keygen":
        from medseg.signing import keygen

        private, public = keygen(args.path)
        print(f"private key: {private} (keep it; mode 0600); public key: {public} (give it to --trust)")
    elif args.command == "predict":
        from medseg.predict import SomeInputsFailed, predict_files

        try:
            written = predict_files(args.run, args.inputs, args.out, args.overlay, args.device, not args.quiet,
                                    args.series, args.strict, args.overwrite, args.engine, args.format,
                                    args.uncertainty, args.workers, _shard(args.shard), args.threads)
        except SomeInputsFailed as failure:
            print(f"{len(failure.written)} masks written to {args.out}; {len(failure.failed)} inputs failed:")
            for line in failure.lines():
                print(f"  {line}", file=sys.stderr)
            raise MedsegError(f"{len(failure.failed)} of {len(failure.written) + len(failure.failed)} inputs could "
                              "not be segmented (listed above); the other masks were written") from failure
        print(f"{len(written)} masks written to {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc N` runs it again on N processes
    try:
        run_command(args)
    except MedsegError as exc:
        print(f"medseg: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever it quotes
        return 2
    except OSError as exc:
        if not exc.filename:  # not about a file of the user's: a bug, shown in full
            raise
        # a folder that cannot be made or written (read-only, no permission, no space): the machine, not medseg
        print(f"medseg: error: {exc.filename}: {exc.strerror or exc}; choose another place, or fix its "
              "permissions or free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medseg: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
