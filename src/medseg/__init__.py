"""medseg: medical image segmentation with U-Nets, from files to trained model, metrics, figures and masks.

The Python API mirrors the `medseg` command:

    from medseg import plan_and_train, TrainConfig, train, evaluate_run, predict_files
    run = plan_and_train("Task04_Hippocampus", "runs/hippo", time_budget=30)  # what `medseg train DATA` does
    run = train(TrainConfig(data="Task04_Hippocampus", out="runs/h64", size=64, fit="pad"))  # settings by hand
    summary = evaluate_run(run)  # on the run's test cases
    predict_files(run, ["new_scan.nii.gz"], out="masks")
"""
from medseg.autotrain import plan_and_train
from medseg.config import TrainConfig
from medseg.datasets import Case, find_cases, split_cases
from medseg.errors import MedsegError
from medseg.evaluate import evaluate_run
from medseg.io import Image, read_image, write_mask
from medseg.predict import predict_files
from medseg.synth import write_synthetic_dataset
from medseg.train import train

__version__ = "0.1.0"
__all__ = ["Case", "Image", "MedsegError", "TrainConfig", "evaluate_run", "find_cases", "plan_and_train", "predict_files",
           "read_image", "split_cases", "train", "write_mask", "write_synthetic_dataset"]
