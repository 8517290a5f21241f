"""Pipeline (d) of benchmarks/throughput.py, run inside nnU-Net's own venv (.venv-nnunet, see benchmarks/nnunet.py):
nnU-Net v2's training data loader and augmentation, built by its default trainer exactly as `nnUNetv2_train` builds
them (its preprocessed arrays, foreground oversampling, its default transforms, its multi-process augmenter with the
worker count nnU-Net allows on this machine), feeding the same network step as the other pipelines.

Only two numbers of nnU-Net's plan are changed, so that every pipeline trains the same batch: the patch size and the
batch size. Deep supervision is off because the shared network has one output. Prints one JSON line:
{"steps_per_s": ..., "workers": ...}.

    PYTHONPATH=src:benchmarks nnUNet_preprocessed=... nnUNet_results=... .venv-nnunet/bin/python \
        benchmarks/nnunet_loader.py --dataset Dataset521_Throughput3d --configuration 3d_fullres --dims 3 \
        --data DATA --channels 1 --classes 3 --steps 20
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from throughput import Trainer, crop, setting, steps_per_second


def nnunet_batches(dataset: str, configuration: str, patch: list[int], batch_size: int):
    """Batches from nnU-Net's default trainer's training augmenter, as (image, class-index) tensors; the augmenter
    (to stop its workers) and its worker count."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    folder = Path(os.environ["nnUNet_preprocessed"]) / dataset
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    plans["configurations"][configuration].update(patch_size=patch, batch_size=batch_size)
    plans["continue_training"] = False  # what nnUNetv2_train adds before it builds the trainer
    dataset_json = json.loads((folder / "dataset.json").read_text())
    trainer = nnUNetTrainer(plans, configuration, 0, dataset_json, torch.device("cpu"))
    trainer.enable_deep_supervision = False  # one output, one target, like the shared network
    trainer._set_batch_size_and_oversample()  # the part of trainer.initialize() the loaders need
    train, validation = trainer.get_dataloaders()
    validation._finish()  # nnU-Net's validation loader would only idle beside this measurement

    def batches():
        while True:
            batch = next(train)
            yield batch["data"].float(), batch["target"][:, 0].long()

    return batches(), train, get_allowed_n_proc_DA()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="nnU-Net dataset name, e.g. Dataset521_Throughput3d")
    parser.add_argument("--configuration", required=True)
    parser.add_argument("--dims", type=int, choices=(2, 3), required=True)
    parser.add_argument("--data", required=True, help="the data folder the other pipelines read (for the setting)")
    parser.add_argument("--channels", type=int, required=True)
    parser.add_argument("--classes", type=int, required=True)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cfg = setting(args.dims, Path(args.data))
    batches, augmenter, workers = nnunet_batches(args.dataset, args.configuration, crop(cfg), cfg.batch_size)
    trainer = Trainer(cfg, args.channels, args.classes, torch.device("cpu"))
    # Warm-up past nnU-Net's queue of 6 prepared batches, so the window times the loader's steady state.
    rate = steps_per_second(batches, trainer, args.steps, warmup=8)
    augmenter._finish()  # its worker processes hold this process's output open until they end
    print(json.dumps({"steps_per_s": rate, "workers": workers}), flush=True)


if __name__ == "__main__":
    main()
